"""Runs the command line: every exception becomes a short message, the next step and an exit code
through the one error table (coopt_hub.errors). Tracebacks only with --debug, before or after the
command, or COOPT_HUB_DEBUG=1. Ctrl-C ends every command the same way: exit code 130 and a note that
a rerun continues (finished work is written atomically, so it is kept whatever the moment)."""

from __future__ import annotations

import os
import sys

import click

from coopt_hub.cli.options import Settings
from coopt_hub.errors import describe_error

DEBUG_ENV = "COOPT_HUB_DEBUG"
INTERRUPTED = "Interrupted. Finished work is kept; rerun the same command to continue."
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a job stopped with Ctrl-C


def run_with_error_table(command: click.Command, argv: list[str] | None = None) -> None:
    settings = Settings(debug=os.environ.get(DEBUG_ENV, "").lower() in {"1", "true", "yes"})
    try:
        command.main(args=argv, standalone_mode=False, prog_name="coopt-hub", obj=settings)
    except click.exceptions.Abort as err:
        # click turns Ctrl-C into Abort before it reaches us; the KeyboardInterrupt is its cause.
        if isinstance(err.__cause__, KeyboardInterrupt):
            _interrupted()
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        # A usage error ends like every other error: with the next step.
        command_path = err.ctx.command_path if getattr(err, "ctx", None) else "coopt-hub"
        click.echo(f"Next step: correct the command line; `{command_path} --help` lists every option and its values.",
                   err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as err:  # noqa: BLE001 - the one place every error is turned into a message
        if settings.debug:
            raise
        code, message, hint = describe_error(err)
        click.secho(f"Error: {message}", fg="red", err=True)
        if hint:
            click.echo(f"Next step: {hint}", err=True)
        sys.exit(code)


def _interrupted() -> None:
    click.echo(INTERRUPTED, err=True)
    sys.exit(INTERRUPTED_EXIT_CODE)
