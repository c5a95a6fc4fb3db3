"""Property tests: hostile bytes never make the walker, dump parser or BAR decoder misbehave.

Every test is derandomized, so a run is reproducible; hypothesis still explores
hundreds of shapes, including the adversarial chains built by ``_chains``.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import CapabilityError, DumpFormatError
from shared.pci import (
    Capability,
    CapabilityWalk,
    ConfigSpace,
    DumpEntry,
    PciAddress,
    decode_bars,
    format_dump,
    parse_dump,
    unlink_capability,
    walk_capabilities,
)

FUZZ = settings(
    derandomize=True,
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_SIZES = st.sampled_from([64, 256, 4096])
_random_images = _SIZES.flatmap(lambda n: st.binary(min_size=n, max_size=n))


@st.composite
def _chains(draw: st.DrawFn) -> bytes:
    """An image whose lists are built from pointers designed to hurt: cycles,
    self-loops, pointers into the header, to 0xff, misaligned and out of range."""
    size = draw(st.sampled_from([256, 4096, 4096]))
    raw = bytearray(draw(st.sampled_from([b"\x00", b"\xff"])) * size)
    raw[6] = draw(st.sampled_from([0x10, 0x10, 0x00, 0xFF]))
    raw[0x0E] = draw(st.sampled_from([0, 1, 2, 0x80]))
    std_nodes = draw(st.lists(st.integers(0x10, 0x3F).map(lambda n: n * 4), max_size=12))
    std_targets = st.one_of(
        st.sampled_from(std_nodes or [0x40]),
        st.sampled_from([0, 0xFF, 0x3C, 0x00, 0x41, 0xFE]),
        st.integers(0, 0xFF),
    )
    anchor = 0x14 if raw[0x0E] & 0x7F == 2 else 0x34
    raw[anchor] = draw(std_targets)
    for node in std_nodes:
        raw[node] = draw(st.sampled_from([0x01, 0x05, 0x10, 0x11, 0xFF, 0x00]))
        raw[node + 1] = draw(std_targets)
    if size == 4096:
        more_nodes = draw(st.lists(st.integers(0x40, 0x3FF).map(lambda n: n * 4), max_size=20))
        ext_nodes = [0x100, *more_nodes]
        ext_targets = st.one_of(
            st.sampled_from(ext_nodes),
            st.sampled_from([0, 0x100, 0xFFC, 0xFFF, 0x0FC, 0x102]),
            st.integers(0, 0xFFF),
        )
        for node in ext_nodes:
            cap_id = draw(st.sampled_from([0x0000, 0x0001, 0x000B, 0xFFFF, 0x0010]))
            version = draw(st.integers(0, 15))
            header = cap_id | version << 16 | draw(ext_targets) << 20
            if draw(st.integers(0, 9)) == 0:
                header = draw(st.sampled_from([0, 0xFFFF_FFFF]))
            raw[node : node + 4] = header.to_bytes(4, "little")
    return bytes(raw)


@st.composite
def _linear_chains(draw: st.DrawFn) -> bytes:
    """A well-formed image with long lists in shuffled order, optionally with one
    pointer corrupted into a cycle (so deep chains and late loops are covered)."""
    raw = bytearray(4096)
    raw[6] = 0x10
    std = draw(st.lists(st.integers(0x10, 0x3F).map(lambda n: n * 4), unique=True, max_size=20))
    later = draw(st.lists(st.integers(0x41, 0x3FF).map(lambda n: n * 4), unique=True, max_size=40))
    ext = [0x100, *later]
    raw[0x34] = std[0] if std else 0
    for node, nxt in zip(std, [*std[1:], 0][: len(std)], strict=True):
        raw[node] = draw(st.integers(0, 0xFE))
        raw[node + 1] = nxt
    for node, nxt in zip(ext, [*ext[1:], 0], strict=True):
        header = draw(st.integers(1, 0xFFFF)) | draw(st.integers(0, 15)) << 16 | nxt << 20
        raw[node : node + 4] = header.to_bytes(4, "little")
    if draw(st.booleans()):
        victim = draw(st.sampled_from(ext))
        header = int.from_bytes(raw[victim : victim + 4], "little") & 0xFFFFF
        loop_to = draw(st.sampled_from(ext))
        raw[victim : victim + 4] = (header | loop_to << 20).to_bytes(4, "little")
    corrupt_std: bool = draw(st.booleans())
    if std and corrupt_std:
        raw[draw(st.sampled_from(std)) + 1] = draw(st.sampled_from(std))
    return bytes(raw)


def _reference_offsets(raw: bytes) -> tuple[list[int], list[int]]:
    """An independent, deliberately naive walker: a step budget instead of a visited set."""
    std: list[int] = []
    if len(raw) >= 0x40 and raw[6] & 0x10:
        anchor = 0x14 if raw[0x0E] & 0x7F == 2 else 0x34
        ptr = raw[anchor] & 0xFC
        for _ in range(1000):
            if ptr == 0 or ptr < 0x40 or ptr + 2 > len(raw) or ptr in std or raw[ptr] == 0xFF:
                break
            std.append(ptr)
            ptr = raw[ptr + 1] & 0xFC
    ext: list[int] = []
    if len(raw) >= 0x104:
        ptr = 0x100
        for _ in range(10000):
            header = int.from_bytes(raw[ptr : ptr + 4], "little")
            if header in (0, 0xFFFF_FFFF) or ptr in ext:
                break
            ext.append(ptr)
            ptr = (header >> 20) & 0xFFC
            if ptr < 0x100 or ptr + 4 > len(raw):
                break
    return std, ext


def _check_invariants(raw: bytes, walk: CapabilityWalk) -> None:
    size = len(raw)
    for chain, low, high in ((walk.standard, 0x40, min(size, 0x100)), (walk.extended, 0x100, size)):
        offsets = [c.offset for c in chain]
        assert len(offsets) == len(set(offsets)), "an offset was listed twice"
        assert all(low <= o < high and o % 4 == 0 for o in offsets)
        assert all(c.next % 4 == 0 for c in chain)
        for cap, following in itertools.pairwise(chain):
            assert cap.next == following.offset
        if chain and chain[-1].next != 0:
            assert walk.problems, "the walk stopped early without saying why"
    assert len(walk.standard) <= 48
    if size > 0x100:
        assert len(walk.extended) <= (size - 0x100) // 4
    else:
        assert not walk.extended
    assert all(isinstance(p, str) and p for p in walk.problems)
    assert all(not c.extended for c in walk.standard)
    assert all(c.extended for c in walk.extended)


@FUZZ
@given(_random_images)
def test_random_images_never_raise_or_loop(raw: bytes) -> None:
    walk = walk_capabilities(raw)
    _check_invariants(raw, walk)
    assert walk == walk_capabilities(ConfigSpace(raw))
    std, ext = _reference_offsets(raw)
    assert [c.offset for c in walk.standard] == std
    assert [c.offset for c in walk.extended] == ext


@FUZZ
@given(st.one_of(_chains(), _linear_chains()))
def test_malicious_chains_never_raise_or_loop(raw: bytes) -> None:
    walk = walk_capabilities(raw)
    _check_invariants(raw, walk)
    std, ext = _reference_offsets(raw)
    assert [c.offset for c in walk.standard] == std
    assert [c.offset for c in walk.extended] == ext


@FUZZ
@given(st.one_of(_chains(), _linear_chains()), st.data())
def test_unlinking_from_a_well_formed_walk_removes_only_that_capability(
    raw: bytes, data: st.DataObject
) -> None:
    walk = walk_capabilities(raw)
    caps = list(walk)
    if not caps or not walk.ok:
        return
    cap: Capability = data.draw(st.sampled_from(caps))
    space = ConfigSpace(raw)
    try:
        unlink_capability(space, cap)
    except CapabilityError as exc:  # only the documented refusal is allowed
        assert cap.extended and cap.offset == 0x100 and (cap.id, cap.version) == (0, 0), exc
        return
    after = walk_capabilities(space)
    assert after.ok
    chain = walk.extended if cap.extended else walk.standard
    new_chain = after.extended if cap.extended else after.standard
    other = walk.standard if cap.extended else walk.extended
    assert (after.standard if cap.extended else after.extended) == other
    expected = [c.offset for c in chain if c.offset != cap.offset]
    got = [c.offset for c in new_chain]
    if cap.extended and cap.offset == 0x100 and cap.next:
        assert got[0] == 0x100 and (new_chain[0].id, new_chain[0].version) == (0, 0)
        got = got[1:]
    assert got == expected


_HEADER_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=60
)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.builds(
                PciAddress,
                st.integers(0, 0xFFFF),
                st.integers(0, 0xFF),
                st.integers(0, 0x1F),
                st.integers(0, 7),
            ),
            _HEADER_TEXT,
            _random_images,
        ),
        max_size=4,
    )
)
def test_format_then_parse_is_identity(devices: list[tuple[PciAddress, str, bytes]]) -> None:
    entries = [DumpEntry.for_device(addr, text, data) for addr, text, data in devices]
    text = format_dump(entries)
    assert parse_dump(text) == entries
    assert format_dump(parse_dump(text)) == text


@FUZZ
@given(st.data())
def test_mutated_dumps_only_raise_dump_format_errors(data: st.DataObject) -> None:
    base = format_dump(
        [DumpEntry.for_device(PciAddress(0, 0, 0x14, 0), "USB controller", bytes(range(256)))]
    )
    chars = list(base)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(chars) - 1))
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        new = data.draw(st.sampled_from(list("0123456789abcdefxg: \n\t\r.")))
        if action == "replace":
            chars[pos] = new
        elif action == "delete":
            del chars[pos]
        else:
            chars.insert(pos, new)
    mutated = "".join(chars)
    try:
        entries = parse_dump(mutated)
    except DumpFormatError as exc:
        assert str(exc).startswith("line ")
        return
    for entry in entries:
        assert len(entry.data) in (64, 256, 4096)


@FUZZ
@given(_random_images, st.sampled_from([0x00, 0x01, 0x02, 0x80, 0x81]))
def test_bar_decoding_partitions_the_slots(raw: bytes, header_type: int) -> None:
    image = bytearray(raw)
    image[0x0E] = header_type
    bars = decode_bars(bytes(image))
    slots = [slot for bar in bars for slot in bar.slots]
    assert slots == list(range({0: 6, 1: 2, 2: 1}[header_type & 0x7F]))
    for bar in bars:
        assert bar.index == bar.slots[0]
        assert bar.offset == 0x10 + 4 * bar.index
        assert bar.base & bar.flags == 0
