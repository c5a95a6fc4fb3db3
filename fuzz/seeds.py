"""(Re)write the seed corpus in ``fuzz/corpus/``: ``python fuzz/seeds.py``.

Seeds are valid inputs of each target's kind (real messages, frames, config
images from ``tests/data/pcidata``, a ring holding records, access scripts),
so the fuzzer starts from the shapes that matter instead of from nothing.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import REPO, corpus_dir

from shared.errors import DumpFormatError, ErrorCode
from shared.pci import parse_dump
from shared.protocol import (
    BarReadRequest,
    ConfigReadRequest,
    ConfigWriteRequest,
    DmaCallResult,
    DmaMapRequest,
    Goodbye,
    Hello,
    InterruptEnableRequest,
    Limits,
    PingRequest,
    SnapshotRequest,
    encode,
    encode_frame,
)
from shared.ring import RingProducer, RingSpec, initialise_ring


def _write(name: str, blobs: list[bytes]) -> None:
    out = corpus_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    for blob in blobs:
        (out / hashlib.sha1(blob).hexdigest()[:16]).write_bytes(blob)


def main() -> None:
    messages = [
        encode(Hello(1, 0, ("ping", "dma"), Limits(), "guest1")),
        encode(Goodbye(ErrorCode.OK, "bye")),
        encode(PingRequest(1)),
        encode(SnapshotRequest(2, True)),
        encode(ConfigReadRequest(3, 0, 0x10, 4)),
        encode(ConfigWriteRequest(4, 8, 0x04, 2, 0x7)),
        encode(BarReadRequest(5, 0, 0, 0x80, 8)),
        encode(InterruptEnableRequest(6, 0, 2, 16, True)),
        encode(DmaMapRequest(7, 4096, True, False)),
        encode(DmaCallResult(9, ErrorCode.OK, b"data")),
    ]
    _write("codec", messages)
    _write("frames", [bytes([7]) + b"".join(encode_frame(m) for m in messages[i:i + 3])
                      for i in range(0, len(messages), 3)])
    images = []
    for path in sorted((REPO / "tests/data/pcidata").glob("*.txt")):
        if "vvv" in path.name:
            continue
        try:
            entries = parse_dump(path.read_text())
        except DumpFormatError:
            continue
        images.extend(bytes(entry.data) for entry in entries)
    _write("caps", images)
    spec = RingSpec.standalone(4096, 1024)
    seeds = []
    for records in ([b"hello"], [b"x" * 100, b"y" * 7], [b""] * 5):
        buf = bytearray(spec.end)
        initialise_ring(buf, spec)
        producer = RingProducer(buf, spec)
        for record in records:
            producer.send_nowait(record)
        producer.release()
        seeds.append(bytes([1]) + bytes(buf[: 128 + 256]) + bytes(range(0, 64, 3)))
        seeds.append(bytes([0]) + bytes(buf[: 128 + 256]) + bytes(range(1, 64, 5)))
    _write("ring", seeds)
    op = struct.Struct("<BHI")
    scripts = []
    for device in range(6):
        body = b"".join(
            op.pack(kind, offset, value)
            for kind, offset, value in [
                (2, 0x04, 0xFFFF), (0x82, 0x04, 0), (2, 0x10, 0xFFFFFFFF), (0x82, 0x10, 0),
                (2, 0x30, 0xFFFFFFFF), (1, 0x52, 0xFFFF), (2, 0x70, 0xFFFFFFFF), (0, 0x3C, 0xFF),
            ]
        )
        scripts.append(bytes([device]) + body)
    _write("policy", scripts)
    _write("vfio_user", _vfio_user_seeds())


def _vfio_user_seeds() -> list[bytes]:
    """Streams of real vfio-user messages, prefixed by the target's mode byte."""
    from shared.protocol import vfio_user as vu

    client = vu.VfioUserConnection(vu.Role.CLIENT)
    hello = client.send_command(vu.Version(0, 0, client.advertised()))[1]
    server = vu.VfioUserConnection(vu.Role.SERVER)
    server.receive_data(hello)
    proposal = server.next_event()
    assert proposal is not None and isinstance(proposal.body, vu.Version)
    client.receive_data(server.send_reply(
        proposal.header, vu.negotiate(proposal.body, server.advertised())))
    client.next_event()
    commands = b"".join(client.send_command(body)[1] for body in (
        vu.DeviceInfoRequest(), vu.RegionInfoRequest(7), vu.IrqInfoRequest(0),
        vu.SetIrqs(0, vu.IRQ_DATA_NONE | vu.IRQ_ACTION_UNMASK, 0, 1),
        vu.RegionAccess(7, 0, 4), vu.RegionData(2, 0, b"\x01"), vu.DmaMap(0x10000, 0x1000),
        vu.DmaUnmap(0, 0, vu.DMA_UNMAP_ALL), vu.MigDataRead(16),
    ))
    # Replies to the commands fuzz_vfio_user's client has outstanding (ids 1, 2, 3).
    header = vu.Header(2, vu.Command.DEVICE_GET_INFO, 32, vu.MessageType.REPLY)
    replies = (
        vu.Header(1, vu.Command.REGION_READ, 36, vu.MessageType.REPLY).pack()
        + vu.RegionData(7, 0, b"\x4f\x49\xc8\x0d").encode()
        + header.pack() + vu.DeviceInfo(3, 9, 5).encode()
        + vu.Header(2, vu.Command.DMA_WRITE, 36, vu.MessageType.COMMAND).pack()
        + vu.DmaData(0x1000, b"abcd").encode()
    )
    region = vu.RegionInfo(0, 0xF, 0x4000, 0, (vu.SparseArea(0x1000, 0x1000),), (1, 2)).encode()
    region_reply = (
        vu.Header(3, vu.Command.DEVICE_GET_REGION_INFO, 16 + len(region), vu.MessageType.REPLY)
        .pack() + region
    )
    return [bytes([0]) + hello, bytes([1]) + commands, bytes([5]) + commands,
            bytes([2]) + replies, bytes([6]) + region_reply, bytes([4 * 7 + 1]) + commands]


if __name__ == "__main__":
    main()
