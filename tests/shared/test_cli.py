"""shared.cli: the one error path of both commands (one line, exit codes, bugs, -v)."""

from __future__ import annotations

import argparse
import errno
import io

import pytest
import trio

from shared.cli import BUG_REPORT, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Cli, package_version
from shared.errors import ConfigFileError, PcisplitError, UsageError, did_you_mean, reason


def _cli(handler: object) -> Cli:
    cli = Cli("tool", "a test tool")
    cli.common_option("--timeout", type=float, default=5.0)
    sub = cli.command("go", handler, "do it")  # type: ignore[arg-type]
    sub.add_argument("--n", type=int, default=1)
    return cli


def _run(cli: Cli, *argv: str) -> tuple[int, list[str]]:
    err = io.StringIO()
    code = cli.main(list(argv), stderr=err)
    return code, err.getvalue().splitlines()


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (ConfigFileError("x.toml: listen[0]: bad"), EXIT_USAGE, "tool: x.toml: listen[0]: bad"),
        (UsageError("--n: bad"), EXIT_USAGE, "tool: --n: bad"),
        (PcisplitError("no backend at unix:/x"), EXIT_FAILURE, "tool: no backend at unix:/x"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "server.pem"),
            EXIT_FAILURE,
            "tool: server.pem: No such file or directory",
        ),
        (
            trio.BrokenResourceError(),
            EXIT_FAILURE,
            "tool: the connection was lost (BrokenResourceError)",
        ),
        (trio.TooSlowError(), EXIT_FAILURE, "tool: timed out"),
        (KeyboardInterrupt(), EXIT_FAILURE, "tool: interrupted"),
        (PcisplitError("two\nlines"), EXIT_FAILURE, "tool: two lines"),
    ],
)
def test_an_expected_failure_is_one_line_with_its_exit_code(
    exc: BaseException, code: int, line: str
) -> None:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    assert _run(_cli(handler), "go") == (code, [line])


def test_a_failure_inside_a_trio_nursery_is_looked_through() -> None:
    async def handler(args: argparse.Namespace) -> int:
        async def fail() -> None:
            raise ConfigFileError("listen[1]: unknown transport scheme 'http'")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
        return 0

    code, lines = _run(_cli(handler), "go")
    assert (code, lines) == (EXIT_USAGE, ["tool: listen[1]: unknown transport scheme 'http'"])


def test_a_bug_shows_its_traceback_and_asks_for_a_report() -> None:
    def handler(args: argparse.Namespace) -> int:
        return {}["missing"]  # type: ignore[no-any-return]

    code, lines = _run(_cli(handler), "go")
    assert code == EXIT_FAILURE
    assert lines[0] == "Traceback (most recent call last):"
    assert "KeyError: 'missing'" in lines
    assert lines[-1] == f"tool: internal error: {BUG_REPORT}"


def test_a_bug_among_expected_failures_is_still_a_bug() -> None:
    async def handler(args: argparse.Namespace) -> int:
        async def fail(exc: Exception) -> None:
            raise exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, PcisplitError("expected"))
            nursery.start_soon(fail, ZeroDivisionError("unexpected"))
        return 0

    code, lines = _run(_cli(handler), "go")
    assert code == EXIT_FAILURE and lines[-1].startswith("tool: internal error:")


@pytest.mark.parametrize("argv", [("-v", "go"), ("go", "-v")])
def test_verbose_before_or_after_the_subcommand_shows_the_traceback(argv: tuple[str, ...]) -> None:
    def handler(args: argparse.Namespace) -> int:
        assert args.verbose == 1
        raise UsageError("--n: bad")

    code, lines = _run(_cli(handler), *argv)
    assert code == EXIT_USAGE
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "tool: --n: bad"


def test_common_options_work_on_either_side_of_the_subcommand() -> None:
    seen: list[float] = []

    def handler(args: argparse.Namespace) -> None:
        seen.append(args.timeout)

    cli = _cli(handler)
    assert _run(cli, "go")[0] == EXIT_OK
    assert _run(cli, "--timeout", "2", "go")[0] == EXIT_OK
    assert _run(cli, "go", "--timeout", "3")[0] == EXIT_OK
    assert seen == [5.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), "tool: the following arguments are required: COMMAND (see tool --help)"),
        (("go", "--n", "x"), "tool: argument --n: invalid int value: 'x' (see tool go --help)"),
        (("og",), "tool: argument COMMAND: invalid choice: 'og' (choose from "),
        (("go", "--bogus"), "tool: unrecognized arguments: --bogus (see tool --help)"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: tuple[str, ...], expected: str) -> None:
    code, lines = _run(_cli(lambda args: 0), *argv)
    assert code == EXIT_USAGE and len(lines) == 1
    assert lines[0].startswith(expected) and lines[0].endswith("--help)")


def test_version_comes_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    assert package_version() == importlib.metadata.version("pcisplit")
    assert _run(_cli(lambda args: 0), "--version") == (EXIT_OK, [])
    assert capsys.readouterr().out == f"tool {package_version()}\n"


def test_an_async_handler_runs_under_trio_and_its_status_is_the_exit_code() -> None:
    async def handler(args: argparse.Namespace) -> int:
        await trio.sleep(0)
        return args.n

    assert _run(_cli(handler), "go", "--n", "0") == (EXIT_OK, [])
    assert _run(_cli(handler), "go", "--n", "1") == (EXIT_FAILURE, [])


def test_reason_is_never_empty() -> None:
    assert reason(PcisplitError("")) == "PcisplitError"
    assert reason(OSError()) == "OSError"
    assert reason(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == (
        "Connection refused"
    )


def test_did_you_mean_names_the_closest_never_a_long_list() -> None:
    names = [f"reg{i}.field" for i in range(500)] + ["command.bus_master"]
    assert did_you_mean("comand.bus_master", names) == "did you mean 'command.bus_master'?"
    hint = did_you_mean("zzzz", names, listing="the names are in docs/policy.md")
    assert hint == "the names are in docs/policy.md"
    assert did_you_mean("zzzz", names) == "none of the 501 known names is close"
    assert did_you_mean("x", ["a", "b"]) == "known: a, b"
    assert did_you_mean("devctl", ["pcie.devctl", "command"]) == "did you mean 'pcie.devctl'?"
