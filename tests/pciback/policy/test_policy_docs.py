"""docs/policy.md documents every rule the code defines (the tables were generated from it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pciback.policy import CAPABILITY_NAMES, known_register_names

DOC = Path(__file__).resolve().parents[3] / "docs" / "policy.md"
GENERIC = ("header", "body")  # per-capability names, documented once as <cap>.header / <cap>.body


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in known_register_names()
        if n.split(".")[0] not in CAPABILITY_NAMES
        or (
            n.split(".")[0] in {"pm", "msi", "msix", "pcie", "vpd", "aer"}
            and not n.endswith(GENERIC)
        )
    ],
)
def test_every_rule_is_in_the_policy_doc(name: str) -> None:
    text = DOC.read_text()
    assert f"`{name}" in text, f"docs/policy.md does not mention {name!r}"
