"""The CLI through the typer app, for the CLI tests (imported as `_cli`)."""

from __future__ import annotations

from typer.testing import CliRunner

from msabank.cli.main import app

runner = CliRunner()


def run(*args: object, ok: bool = True, env: dict[str, str] | None = None):  # noqa: ANN201
    """Invoke `msabank ARGS`; with ok, exit 0. Never a raw exception or a traceback, whatever the exit."""
    res = runner.invoke(app, [str(a) for a in args], env=env)
    if ok:
        assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res
