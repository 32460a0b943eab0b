"""Runs the command line: every exception becomes a short message, the next step and an exit code
through the one error table (coopt_hub.errors). Tracebacks only with --debug, before or after the
command, or COOPT_HUB_DEBUG=1."""

from __future__ import annotations

import os
import sys

import click

from coopt_hub.cli.options import Settings
from coopt_hub.errors import describe_error

DEBUG_ENV = "COOPT_HUB_DEBUG"


def run_with_error_table(command: click.Command, argv: list[str] | None = None) -> None:
    settings = Settings(debug=os.environ.get(DEBUG_ENV, "").lower() in {"1", "true", "yes"})
    try:
        command.main(args=argv, standalone_mode=False, prog_name="coopt-hub", obj=settings)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
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
        click.echo("Interrupted. Finished work is kept; rerun the same command to continue.", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place every error is turned into a message
        if settings.debug:
            raise
        code, message, hint = describe_error(err)
        click.secho(f"Error: {message}", fg="red", err=True)
        if hint:
            click.echo(f"Next step: {hint}", err=True)
        sys.exit(code)
