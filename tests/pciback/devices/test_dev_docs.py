"""The device-model example in docs/devices.md runs and its assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "devices.md"


def test_docs_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/devices.md has no python example"
    namespace: dict[str, object] = {"__name__": "devices_doc_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    timer = namespace["dev"]
    assert type(timer).__name__ == "Timer"
