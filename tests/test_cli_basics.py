import subprocess
import sys

from click.testing import CliRunner

from coopt_hub.cli import COMMANDS, cli
from coopt_hub.errors import PlanError, describe_error


def test_help_lists_every_command_without_importing_them():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_error_table_gives_message_and_next_step():
    code, message, hint = describe_error(PlanError("no plan in org/x", hint="run `coopt-hub init` first"))
    assert (code, message, hint) == (1, "no plan in org/x", "run `coopt-hub init` first")


def test_unknown_error_points_to_debug():
    code, message, hint = describe_error(ValueError("boom"))
    assert code == 1 and "ValueError: boom" in message and "--debug" in hint


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "coopt_hub", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "coopt-hub" in out.stdout
