"""`coopt-hub ARGV` run in the test's own process, through the console script's error handling
(exit codes, the error table), with its output captured."""

from __future__ import annotations

from dataclasses import dataclass

from click.testing import CliRunner

from coopt_hub.cli import main


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_main(argv: list[str], env: dict[str, str | None] | None = None) -> Outcome:
    """`env` adds to (or with None, removes from) the environment for the run; it is put back after."""
    with CliRunner().isolation(env={"COOPT_HUB_DEBUG": None, "COOPT_HUB_REPO": None, **(env or {})}) as (out, err, _):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Outcome(code, out.getvalue().decode(), err.getvalue().decode())
