"""Fuzz target: the stream frame decoder (``shared.protocol.FrameDecoder``).

The input is cut into chunks (first byte: chunk size) and fed as a peer would
send them. The decoder must only return frames within the limit or raise
``RemoteProtocolError``, and never hold more than one frame's worth of bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["shared.protocol"]):
    from shared.errors import RemoteProtocolError
    from shared.protocol import FrameDecoder, encode_frame

LIMIT = 1024


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 64 + 1
    decoder = FrameDecoder(LIMIT)
    frames: list[bytes] = []
    try:
        for i in range(1, len(data), step):
            decoder.feed(data[i : i + step])
            while (frame := decoder.next_frame()) is not None:
                if len(frame) > LIMIT:
                    raise AssertionError(f"decoder returned a {len(frame)}-byte frame")
                frames.append(frame)
            if decoder.buffered > LIMIT + 4 + step:
                raise AssertionError(f"decoder holds {decoder.buffered} bytes")
    except RemoteProtocolError:
        return
    # Re-encoding what came out is a prefix of what went in.
    out = b"".join(encode_frame(f) for f in frames)
    if not data[1:].startswith(out):
        raise AssertionError("decoded frames do not re-encode to the input")


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
