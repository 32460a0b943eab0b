"""The one place where exceptions become a short message, the next step, and an exit code.

Tracebacks are shown only with `coopt-hub --debug` (or COOPT_HUB_DEBUG=1).
"""

from __future__ import annotations

import os
import sys

import click

from coopt_hub.errors import CoOptError

# (exception class path, exit code, message prefix, next step). Looked up by class path so this
# module does not import huggingface_hub or httpx just to print `--help`. First match wins, so
# subclasses come before their bases.
ERROR_TABLE: list[tuple[str, int, str, str]] = [
    ("huggingface_hub.errors.RevisionNotFoundError", 3, "Revision not found",
     "List the repo's branches and tags with `hf repos refs`, or pass an existing --revision."),
    ("huggingface_hub.errors.RemoteEntryNotFoundError", 3, "File not found in the repo",
     "Check the path and revision; `coopt-hub status REPO` shows what each branch holds."),
    ("huggingface_hub.errors.LocalEntryNotFoundError", 5, "Cannot reach the Hub and the file is not cached",
     "Check HF_ENDPOINT and your network (or start `coopt-hub hub serve`), then retry."),
    ("huggingface_hub.errors.EntryNotFoundError", 3, "File not found",
     "Check the path and revision; `coopt-hub status REPO` shows what each branch holds."),
    ("huggingface_hub.errors.GatedRepoError", 4, "Access to this repo is gated",
     "Request access on the Hub, then set HF_TOKEN to a token of the account that has it."),
    ("huggingface_hub.errors.RepositoryNotFoundError", 3, "Repository not found",
     "Check the repo id and HF_ENDPOINT; private repos need HF_TOKEN set to a token that can read them."),
    ("huggingface_hub.errors.HFValidationError", 2, "Invalid repo id",
     "Name repos ORG/NAME: letters, digits, '-', '_' and '.', at most 96 characters, no '--' or '..'."),
    ("huggingface_hub.errors.HfHubHTTPError", 5, "The Hub refused the request",
     "Read the server's message above; 401 means HF_TOKEN is missing or wrong, 412 that someone "
     "committed first (rerun the command)."),
    ("httpx2.ConnectError", 5, "Cannot connect to the Hub endpoint",
     "Check HF_ENDPOINT (is `coopt-hub hub serve` running?) and your network, then retry."),
    ("httpx2.TransportError", 5, "The connection to the Hub failed",
     "Check the network and HF_ENDPOINT, then rerun: finished work is kept and not redone."),
    ("ConnectionError", 5, "Cannot connect",
     "Check HF_ENDPOINT and your network, then retry."),
]


def _class_path(cls: type) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__] + [c.__qualname__ for c in cls.__mro__]


def describe_error(err: BaseException) -> tuple[int, str, str | None]:
    """Map an exception to (exit code, message, next step)."""
    if isinstance(err, CoOptError):
        return err.exit_code, str(err), err.hint
    names = _class_path(type(err))
    for path, code, prefix, hint in ERROR_TABLE:
        if path in names:
            detail = str(err).strip().splitlines()
            detail_text = f": {detail[0]}" if detail else ""
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status == 412:
                hint = "Someone committed to that branch first. Rerun the command; it starts from the new state."
            elif status == 401:
                hint = "Set HF_TOKEN to a token the endpoint accepts (`coopt-hub hub serve` prints one)."
            return code, f"{prefix}{detail_text}", hint
    return 1, f"Unexpected error: {type(err).__name__}: {err}", (
        "Rerun with --debug for the traceback, and report it if the input looks right."
    )


def run_with_error_table(command: click.Command, argv: list[str] | None = None) -> None:
    debug = os.environ.get("COOPT_HUB_DEBUG", "").lower() in {"1", "true", "yes"} or (
        "--debug" in (argv if argv is not None else sys.argv[1:])
    )
    try:
        command.main(args=argv, standalone_mode=False, prog_name="coopt-hub")
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        # A usage error ends like every other error: with the next step.
        command = err.ctx.command_path if getattr(err, "ctx", None) else "coopt-hub"
        click.echo(f"Next step: correct the command line; `{command} --help` lists every option and its values.",
                   err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted. Finished work is kept; rerun the same command to continue.", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place every error is turned into a message
        if debug:
            raise
        code, message, hint = describe_error(err)
        click.secho(f"Error: {message}", fg="red", err=True)
        if hint:
            click.echo(f"Next step: {hint}", err=True)
        sys.exit(code)
