"""```toml blocks in the docs are checked the way `pciback check` checks a config file.

Each test runs a small Markdown page through the docs runner (the same sybil
`make test` uses for README.md and docs/*.md) and looks at what each block did.
"""

from __future__ import annotations

from pathlib import Path

from tests.docs.docsrunner import DOCS_STATE, _setup, _teardown, make_sybil

DUMP_BLOCK = '[[guest]]\nname = "g"\n[[device]]\nid = "nic"\nkind = "snapshot"\ndump = "nic.txt"\n'
TLS_BLOCK = (
    'listen = ["tls://127.0.0.1:7071"]\n[tls]\ncert = "server.pem"\nkey = "server.key"\n'
    'ca = "ca.pem"\n'
)
HOST_BLOCK = '[[device]]\nid = "disk"\nkind = "host"\naddress = "0000:7f:1e.3"\n'


def _block(text: str, marker: str = "") -> str:
    return (f"<!-- stand-ins: {marker} -->\n" if marker else "") + f"```toml\n{text}```\n\n"


def run_page(tmp_path: Path, *blocks: str) -> tuple[list[str | None], list[str]]:
    """Evaluate every block of a page: None or the failure, and the scratch files after."""
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n" + "".join(blocks))
    document = make_sybil(["page.md"], tmp_path).parse(page)
    _setup(document.namespace)
    scratch = document.namespace[DOCS_STATE].scratch
    results: list[str | None] = []
    try:
        for example in document.examples():
            try:
                example.evaluate()
            except Exception as exc:  # noqa: BLE001 - what the test looks at
                results.append(f"{type(exc).__name__}: {exc}")
            else:
                results.append(None)
        left = sorted(p.name for p in scratch.iterdir())
    finally:
        _teardown(document.namespace)
    return results, left


def test_files_a_block_names_must_exist(tmp_path: Path) -> None:
    results, _ = run_page(tmp_path, _block(DUMP_BLOCK), _block(TLS_BLOCK), _block(HOST_BLOCK))
    dump, tls, host = results
    assert dump is not None and "cannot read the dump file" in dump and "nic.txt" in dump
    assert tls is not None and "tls.cert" in tls and "no such file" in tls
    assert host is not None and "0000:7f:1e.3" in host and "cannot open" in host


def test_stand_ins_are_made_for_the_check_and_removed(tmp_path: Path) -> None:
    results, left = run_page(
        tmp_path,
        _block(DUMP_BLOCK, "nic.txt"),
        _block(TLS_BLOCK, "server.pem server.key ca.pem"),
        _block(HOST_BLOCK, "0000:7f:1e.3"),
    )
    assert results == [None, None, None]
    assert left == []  # no stand-in, no checked copy of a block outlives its check


def test_a_stand_in_the_block_does_not_name_fails(tmp_path: Path) -> None:
    results, _ = run_page(tmp_path, _block(DUMP_BLOCK, "nic.txt other.txt"))
    assert results[0] is not None and "stand-in 'other.txt': the block names no such" in results[0]


def test_what_check_adds_to_the_parser_is_checked_too(tmp_path: Path) -> None:
    """Listen addresses and device models: the parser alone accepts both of these."""
    results, _ = run_page(
        tmp_path,
        _block('listen = ["bogus:/x"]\n'),
        _block('[[device]]\nid = "e"\nmodel = "edux"\n'),
    )
    listen, model = results
    assert listen is not None and "listen[0] 'bogus:/x'" in listen
    assert model is not None and "unknown device model 'edux'" in model


def test_a_file_the_page_made_is_used_not_stood_in_for(tmp_path: Path) -> None:
    made = "<!-- file: nic.txt -->\n```text\nnot a dump\n```\n\n"
    results, _ = run_page(tmp_path, made, _block(DUMP_BLOCK), _block(DUMP_BLOCK, "nic.txt"))
    _write, used, stale = results
    assert _write is None
    assert used is not None and "'not a dump'" in used  # the page's own file was checked
    assert stale is not None and "the page already made" in stale
