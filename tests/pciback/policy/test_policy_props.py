"""Property tests: no sequence of guest writes breaks what the policy protects."""

from __future__ import annotations

from _policy_support import DUMP_NAMES, dump_device, synthetic_device
from hypothesis import given, settings
from hypothesis import strategies as st

from pciback.policy import AccessDeniedError, AuditLog, PolicedDevice, PolicyConfig, Preset
from shared.pci import Access, FieldTable, walk_capabilities

#: BARs and expansion ROM of a type 0 header: never written on the device.
BAR_BYTES = frozenset([*range(0x10, 0x28), *range(0x30, 0x34)])


@st.composite
def guest_write(draw: st.DrawFn, limit: int) -> tuple[int, int, int]:
    size = draw(st.sampled_from([1, 2, 4]))
    # Bias towards the header and the capability area, where the rules are.
    offset = draw(
        st.one_of(st.integers(0, 0x3F), st.integers(0x40, 0xFF), st.integers(0, limit - 1))
    )
    offset -= offset % size
    offset = min(offset, limit - size)
    value = draw(
        st.one_of(st.just((1 << (8 * size)) - 1), st.just(0), st.integers(0, (1 << (8 * size)) - 1))
    )
    return offset, size, value


def device_writable_mask(table: FieldTable) -> bytes:
    """Per byte, the bits a guest write may change on the device under this table."""
    out = bytearray(table.size)
    for offset in range(table.size):
        field = table.field_at(offset)
        if field is None:
            if table.unlisted.allowed and table.unlisted.access.reaches_device:
                out[offset] = 0xFF
            continue
        shift = 8 * (offset - field.offset)
        for group in field.groups:
            if group.allowed and group.access.reaches_device:
                out[offset] |= (group.mask >> shift) & 0xFF
    return bytes(out)


def run(dev: PolicedDevice, writes: list[tuple[int, int, int]]) -> None:
    for offset, size, value in writes:
        try:
            dev.config_write(offset, size, value)
        except AccessDeniedError:
            pass  # refused writes are the point; the invariant is checked afterwards


PRESETS = st.sampled_from([Preset.DEFAULT, Preset.PERMISSIVE, Preset.TRANSPARENT_READONLY])


@settings(max_examples=200, deadline=None)
@given(preset=PRESETS, writes=st.lists(guest_write(4096), max_size=40))
def test_no_write_sequence_changes_a_protected_bit_or_moves_a_bar(
    preset: Preset, writes: list[tuple[int, int, int]]
) -> None:
    provider = synthetic_device()
    dev = PolicedDevice(provider, PolicyConfig(preset=preset), guest="g", device="d")
    allowed = device_writable_mask(dev.table)
    run(dev, writes)
    for offset, (before, after) in enumerate(zip(provider.initial, provider.memory, strict=True)):
        assert (before ^ after) & ~allowed[offset] == 0, f"protected bit changed at {offset:#x}"
    for offset, size, _ in provider.writes:
        assert not BAR_BYTES & set(range(offset, offset + size)), "a BAR write reached the device"
        assert any(allowed[offset : offset + size]), "a write reached a non-writable byte"


@settings(max_examples=150, deadline=None)
@given(
    preset=PRESETS,
    hide=st.lists(
        st.sampled_from(["msi", "msix", "pm", "vpd", "aer", "dsn", "sriov"]), unique=True
    ),
    writes=st.lists(guest_write(4096), max_size=40),
)
def test_no_write_sequence_changes_which_capabilities_the_guest_sees(
    preset: Preset, hide: list[str], writes: list[tuple[int, int, int]]
) -> None:
    dev = PolicedDevice(
        synthetic_device(), PolicyConfig(preset=preset, hide=tuple(hide)), guest="g", device="d"
    )
    before = walk_capabilities(dev.guest_config_image())
    run(dev, writes)
    assert walk_capabilities(dev.guest_config_image()) == before


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(DUMP_NAMES),
    preset=PRESETS,
    writes=st.lists(guest_write(256), max_size=30),
)
def test_real_dumps_keep_bars_and_capabilities(
    name: str, preset: Preset, writes: list[tuple[int, int, int]]
) -> None:
    provider = dump_device(name)
    dev = PolicedDevice(
        provider, PolicyConfig(preset=preset), guest="g", device=name, audit=AuditLog()
    )
    allowed = device_writable_mask(dev.table)
    before = walk_capabilities(dev.guest_config_image())
    run(dev, writes)
    assert walk_capabilities(dev.guest_config_image()) == before
    for offset, (old, new) in enumerate(zip(provider.initial, provider.memory, strict=True)):
        assert (old ^ new) & ~allowed[offset] == 0
    layout = provider.initial[0x0E] & 0x7F
    bars = range(0x10, 0x28) if layout == 0 else range(0x10, 0x18)
    assert all(provider.memory[i] == provider.initial[i] for i in bars)


@settings(max_examples=200, deadline=None)
@given(
    image=st.binary(min_size=256, max_size=256),
    writes=st.lists(guest_write(256), max_size=10),
)
def test_arbitrary_config_bytes_never_crash_the_compiler(
    image: bytes, writes: list[tuple[int, int, int]]
) -> None:
    """Hostile or broken devices: any 256 bytes compile and serve without crashing."""
    from _policy_support import RecordingDevice

    image = bytearray(image)
    image[0x0E] &= 0x81  # header types 0 and 1 (the walker handles type 2 too)
    provider = RecordingDevice(bytes(image))
    dev = PolicedDevice(provider, guest="g", device="d", audit=AuditLog())
    assert len(dev.guest_config_image()) == 256
    run(dev, writes)
    assert all(
        g.access is not Access.RW or g.name.startswith(("command.", "cache_line_size"))
        for f in dev.table
        for g in f.groups
    )
