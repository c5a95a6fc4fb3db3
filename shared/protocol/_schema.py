"""How a message is declared: its base classes, its fields' checks, the wire's bounds.

Every message of the catalogue (``_messages``, ``_messages_irq_dma``) derives
from :class:`Message` (through :class:`Request`, :class:`Reply` or
:class:`Event` where it has that role) and validates its fields when built,
with the checks here. Integer fields declared with :class:`IntField`
annotations are checked by code generated from those declarations, and the
codec (``_codec``) generates its fast path from the same declarations: the
rule for a field is written once.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar

from shared.errors import ErrorCode, LocalProtocolError

__all__ = [
    "IntField",
    "declared_fields",
    "Message",
    "Request",
    "Reply",
    "Event",
    "U8",
    "U16",
    "U32",
    "U64",
    "MAX_NAME_LEN",
    "MAX_TEXT_LEN",
    "MAX_FEATURES",
    "MAX_TOKEN_LEN",
    "MAX_DEVICES",
    "MAX_BAR_INDEX",
]

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

MAX_NAME_LEN = 64
MAX_TEXT_LEN = 1024
MAX_FEATURES = 64
#: Longest guest token a Hello may carry (a token file holds one secret line).
MAX_TOKEN_LEN = 256
MAX_DEVICES = 256
MAX_BAR_INDEX = 5


def _int(
    owner: object,
    name: str,
    value: object,
    top: int,
    bottom: int = 0,
    *,
    code: ErrorCode | None = None,
) -> None:
    # ``code`` lets a range error map to a precise wire code (INVALID_OFFSET ...)
    # when the backend answers a request that failed this check.
    if not isinstance(value, int) or isinstance(value, bool) or not bottom <= value <= top:
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} must be an integer in {bottom}..{top:#x}, "
            f"got {value!r}",
            code=code,
        )


def _str(owner: object, name: str, value: object, max_len: int) -> None:
    if not isinstance(value, str) or len(value) > max_len:
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} must be a string of at most {max_len} characters, "
            f"got {value!r:.80}"
        )


def _name(owner: object, name: str, value: object) -> None:
    _str(owner, name, value, MAX_NAME_LEN)
    assert isinstance(value, str)
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise LocalProtocolError(
            f"{type(owner).__name__}.{name} {value!r} must be 1-{MAX_NAME_LEN} characters "
            "of letters, digits, '-', '_' or '.'"
        )


def _access_size(owner: object, value: object, allowed: tuple[int, ...]) -> None:
    if value not in allowed or isinstance(value, bool):
        raise LocalProtocolError(
            f"{type(owner).__name__}.size must be one of {allowed}, got {value!r}",
            code=ErrorCode.INVALID_SIZE,
        )


def _features(owner: object, value: object) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_FEATURES:
        raise LocalProtocolError(
            f"{type(owner).__name__}.features must be a tuple of at most {MAX_FEATURES} names"
        )
    for item in value:
        _name(owner, "features[]", item)


def _code(owner: object, value: object) -> None:
    if not isinstance(value, ErrorCode):
        raise LocalProtocolError(f"{type(owner).__name__}.code must be an ErrorCode, got {value!r}")


@dataclass(frozen=True, slots=True)
class IntField:
    """How one integer field of a message is checked, declared once in its annotation.

    ``Annotated[int, IntField(top, bottom, code=...)]``: an integer in
    ``bottom..top`` (``code`` is the wire code a backend answers with when a
    request breaks it). ``IntField(sizes=(1, 2, 4))``: one of these access
    sizes (``INVALID_SIZE``). ``IntField(width_of="size")``: fits in as many
    bytes as the field ``size`` says. A message whose fields are all declared
    this way is validated by code generated from the declarations, and the
    codec decodes it through a fast path generated from the same declarations
    (``shared.protocol._codec``), so the rule is written once.
    """

    top: int = 0
    bottom: int = 0
    code: ErrorCode | None = None
    sizes: tuple[int, ...] = ()
    width_of: str | None = None

    def accepts(self, var: str, other: Callable[[str], str]) -> str:
        """A Python expression, true when ``var`` (known to be an exact int) passes.

        ``other(name)`` is the expression for another field (for ``width_of``).
        """
        if self.sizes:
            return f"{var} in {self.sizes!r}"
        if self.width_of is not None:
            return f"0 <= {var} <= (1 << (8 * {other(self.width_of)})) - 1"
        return f"{self.bottom} <= {var} <= {self.top}"

    def refuse(self, owner: str, name: str, var: str, code: str) -> str:
        """A statement raising this field's error for ``var`` (or passing, if it is valid)."""
        if self.sizes:
            return f"_access_size({owner}, {var}, {self.sizes!r})"
        if self.width_of is not None:
            return f"_int({owner}, {name!r}, {var}, (1 << (8 * {owner}.{self.width_of})) - 1)"
        return f"_int({owner}, {name!r}, {var}, {self.top}, {self.bottom}, code={code})"


def declared_fields(cls: type) -> tuple[tuple[str, IntField], ...]:
    """The ``(name, IntField)`` declarations of ``cls``'s fields, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in fields(cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(meta, IntField):
                out.append((f.name, meta))
                break
    return tuple(out)


_CHECKS: dict[type, Callable[[Any], None]] = {}


def _make_check(cls: type) -> Callable[[Any], None]:
    """Generate the validation of ``cls``'s declared fields (in order, first error wins).

    Each field costs one inline comparison when it is valid; only an invalid
    value reaches ``_int``/``_access_size``, which raise the error text.
    """
    env: dict[str, Any] = {"_int": _int, "_access_size": _access_size}
    lines = ["def check(self):"]
    for i, (name, spec) in enumerate(declared_fields(cls)):
        env[f"_c{i}"] = spec.code
        test = spec.accepts("v", lambda other: f"self.{other}")
        lines.append(f"    v = self.{name}")
        lines.append(f"    if not (type(v) is int and {test}):")
        lines.append(f"        {spec.refuse('self', name, 'v', f'_c{i}')}")
    lines.append("    return None")
    exec("\n".join(lines), env)  # generated from the declarations above, not from input
    check: Callable[[Any], None] = env["check"]
    return check


def _check_declared(msg: Any) -> None:
    cls = type(msg)
    check = _CHECKS.get(cls)
    if check is None:
        check = _CHECKS[cls] = _make_check(cls)
    check(msg)


_U32_FIELD = IntField(U32)
_U64_FIELD = IntField(U64)
_CONFIG_OFFSET = IntField(0xFFF, code=ErrorCode.INVALID_OFFSET)
_BAR_INDEX = IntField(MAX_BAR_INDEX, code=ErrorCode.NOT_FOUND)
_VALUE = IntField(width_of="size")


@dataclass(frozen=True, slots=True)
class Message:
    """Base class. ``TAG`` is the wire type; subclasses validate in ``__post_init__``."""

    TAG: ClassVar[int] = 0

    def wire_fields(self) -> list[Any]:
        """Field values in declaration order (what the codec puts on the wire)."""
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True, slots=True)
class Request(Message):
    request_id: Annotated[int, _U32_FIELD]

    def __post_init__(self) -> None:
        # The declared fields of type(self); subclasses with more rules call this first.
        _check_declared(self)


@dataclass(frozen=True, slots=True)
class Reply(Message):
    request_id: Annotated[int, _U32_FIELD]

    def __post_init__(self) -> None:
        _check_declared(self)


@dataclass(frozen=True, slots=True)
class Event(Message):
    """Backend-to-frontend notification. Later issues add interrupts, hot-plug, faults."""
