"""The guest-side scripts in ``_guest_scripts.py`` parse as POSIX shell and report as documented.

They run inside a guest against pciback's vfio-user front door; here the host's ``sh -n``
checks their syntax (busybox sh is a POSIX shell), which catches a brace lost in their
Python f-strings before any guest boots.
"""

from __future__ import annotations

import subprocess

import pytest
from _guest_scripts import BUS, DMA_BUFFER, EDU, EDU_CMDLINE, EDU_RESET, fields


@pytest.mark.parametrize("script", [EDU, EDU_RESET, BUS], ids=["edu", "edu_reset", "bus"])
def test_the_script_is_valid_shell(script: str) -> None:
    result = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_the_dma_buffer_is_reserved_below_edus_dma_mask() -> None:
    assert f"memmap=64K${DMA_BUFFER:#x}" in EDU_CMDLINE
    assert DMA_BUFFER + 0x10000 <= 1 << 28
    assert f"buf={DMA_BUFFER:#x}" in EDU


def test_fields_reads_key_value_pairs() -> None:
    assert fields("a=1 b=0x2\nnoise\nc=x y=z\na=3\n") == {"a": "3", "b": "0x2", "c": "x",
                                                          "y": "z"}
