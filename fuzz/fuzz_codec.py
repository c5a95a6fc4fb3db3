"""Fuzz target: the message codec (``shared.protocol.decode``/``encode``).

Any bytes decode to a valid message or raise ``MalformedMessageError``; a
decoded message re-encodes and decodes to itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import instrumented

with instrumented(__name__, ["shared.protocol"]):
    from shared.protocol import MalformedMessageError, decode, encode

LIMIT = 65536


def test_one_input(data: bytes) -> None:
    try:
        msg = decode(data, max_size=LIMIT)
    except MalformedMessageError:
        return
    again = decode(encode(msg), max_size=LIMIT)
    if again != msg:
        raise AssertionError(f"{msg!r} re-decoded as {again!r}")


if __name__ == "__main__":
    from _common import run

    run(test_one_input)
