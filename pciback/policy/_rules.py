"""Policy-level register descriptions: the rules a preset, allow/deny lists and quirks act on.

A :class:`Rule` is a named bit group together with everything the policy
compiler needs to know about it: its default access kind and write decision,
what it becomes when a configuration allows it (``allow_access``), whether it
stays virtual even in the ``transparent-readonly`` preset, and the initial
value of its virtual state. A :class:`Register` is a named run of bytes
partitioned into rules. The compiler (``_compile.py``) turns registers into
the engine's :class:`~shared.pci.FieldTable`.

A rule is *protected* when no configuration can make a guest's write to it
reach the device: its ``allow_access`` is ``None`` (it can never be allowed)
or a virtual kind (allowing it only keeps the write in the virtual state).
Protected rules are exactly what ``permissive`` never passes through and what
quirks may not cover.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from shared.pci import Access, BitGroup, Field

__all__ = [
    "Rule",
    "Register",
    "ro",
    "ro_optional",
    "passthrough",
    "rw1c",
    "shadow",
    "fixed",
    "follows",
    "hidden",
    "register",
]


@dataclass(frozen=True, slots=True)
class Rule:
    """One named bit group of a register, with its policy metadata.

    ``mask`` and ``init`` are relative to the register. ``follows`` marks a
    read-only group whose write permission follows its register: it ignores
    writes when a sibling accepts them and refuses them otherwise.
    """

    name: str
    mask: int
    access: Access
    allowed: bool
    allow_access: Access | None = None
    virtual: bool = False
    init: int | None = None
    follows: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        # IntFlag masks complement within their flags only; keep plain ints.
        object.__setattr__(self, "mask", int(self.mask))
        if self.init is not None:
            object.__setattr__(self, "init", int(self.init))

    @property
    def protected(self) -> bool:
        """True when no policy can make a guest write to these bits reach the device."""
        return self.allow_access is None or not self.allow_access.reaches_device

    def with_policy(self, access: Access, allowed: bool) -> Rule:
        return replace(self, access=access, allowed=allowed, follows=False)


@dataclass(frozen=True, slots=True)
class Register:
    """A named register: ``width`` bytes at absolute ``offset``, partitioned into rules."""

    name: str
    offset: int
    width: int
    rules: tuple[Rule, ...]
    doc: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.width

    @property
    def full_mask(self) -> int:
        return (1 << (8 * self.width)) - 1

    def to_field(self) -> Field:
        """The engine field, after resolving ``follows`` groups against their siblings."""
        accepting = any(r.allowed and not r.follows for r in self.rules)
        groups = tuple(
            BitGroup(
                r.name,
                r.mask,
                r.access,
                (accepting and r.access is not Access.HIDDEN) if r.follows else r.allowed,
                r.doc,
            )
            for r in self.rules
        )
        return Field(self.name, self.offset, self.width, groups, self.doc)


# ----------------------------------------------------------------------------------------------
# Rule constructors: one word per behaviour, so the tables below read like the docs.
# ----------------------------------------------------------------------------------------------


def ro(name: str, mask: int, doc: str = "") -> Rule:
    """Read from the device; writes refused; no configuration can allow it."""
    return Rule(name, mask, Access.RO, False, None, doc=doc)


def ro_optional(name: str, mask: int, allow: Access = Access.RW, doc: str = "") -> Rule:
    """Read from the device; writes refused by default; an allow entry makes it ``allow``."""
    return Rule(name, mask, Access.RO, False, allow, doc=doc)


def passthrough(name: str, mask: int, doc: str = "") -> Rule:
    """Read from and written to the device (the guest controls these bits)."""
    return Rule(name, mask, Access.RW, True, Access.RW, doc=doc)


def rw1c(name: str, mask: int, doc: str = "") -> Rule:
    """Write-one-to-clear status bits, cleared on the device."""
    return Rule(name, mask, Access.RW1C, True, Access.RW1C, doc=doc)


def shadow(
    name: str,
    mask: int,
    *,
    allow: Access = Access.EMULATED,
    init: int | None = None,
    virtual: bool = False,
    doc: str = "",
) -> Rule:
    """Kept in the virtual state; ``allow=Access.RW`` lets a configuration pass it through."""
    return Rule(name, mask, Access.EMULATED, True, allow, virtual=virtual, init=init, doc=doc)


def fixed(
    name: str, mask: int, *, init: int | None = None, virtual: bool = True, doc: str = ""
) -> Rule:
    """Read from the virtual state, never writable (capability links, BAR flags)."""
    return Rule(name, mask, Access.EMULATED_RO, False, None, virtual=virtual, init=init, doc=doc)


def follows(
    name: str,
    mask: int,
    access: Access = Access.RO,
    *,
    init: int | None = None,
    virtual: bool = False,
    doc: str = "",
) -> Rule:
    """Read-only bits inside a writable register: a write to the register ignores them."""
    return Rule(name, mask, access, False, None, virtual=virtual, init=init, follows=True, doc=doc)


def hidden(name: str, mask: int, doc: str = "") -> Rule:
    """Reads as zero; writes refused (capability filtering)."""
    return Rule(name, mask, Access.HIDDEN, False, None, virtual=True, doc=doc)


def register(name: str, offset: int, width: int, *rules: Rule, doc: str = "") -> Register:
    """A register; with no rules it is a single read-only rule named like the register."""
    if not rules:
        rules = (ro(name, (1 << (8 * width)) - 1, doc),)
    return Register(name, offset, width, tuple(rules), doc)
