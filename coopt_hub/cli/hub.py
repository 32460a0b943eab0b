"""`coopt-hub hub serve`: run the embedded Hub-compatible server in the foreground."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from coopt_hub.errors import ConfigError

SERVE_EXAMPLES = """
\b
Examples:
  coopt-hub hub serve --root ./hub-data
  coopt-hub hub serve --root ./hub-data --port 8765 --token-file ./tokens.txt
  coopt-hub hub serve --root ./hub-data > hub.env &   # then, in any shell: source hub.env
"""


@click.group()
def hub() -> None:
    """Run the embedded Hugging Face Hub-compatible server."""


@hub.command(epilog=SERVE_EXAMPLES)
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding every repo (created if missing); restart on it to serve the same data.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--token", "tokens", multiple=True,
              help="A token allowed to write (repeatable). Without --token/--token-file one is generated.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with one token per line (blank lines and '#' comments ignored).")
@click.option("--max-body-mb", default=1024, show_default=True, type=click.IntRange(1),
              help="Largest API request body accepted (413 above); LFS uploads are bounded by their declared size.")
@click.option("--quiet", is_flag=True, help="Do not log each request on stderr.")
def serve(root: Path, host: str, port: int, tokens: tuple[str, ...], token_file: Path | None,
          max_body_mb: int, quiet: bool) -> None:
    """Serve the Hub API for the real huggingface_hub and datasets clients.

    Prints the environment a client needs on stdout, then logs requests on stderr until Ctrl+C.
    """
    from coopt_hub.server import HubServer

    all_tokens = list(tokens) + (_read_token_file(token_file) if token_file else [])
    server = HubServer(root, tokens=all_tokens or None, host=host, port=port,
                       max_body_bytes=max_body_mb * 1024 * 1024)
    try:
        server.bind()
    except OSError as err:
        raise ConfigError(f"Cannot listen on {host}:{port}: {err.strerror or err}.",
                          hint="Pick another --port (or 0 for any free port).") from None
    for name, value in server.env().items():
        click.echo(f"export {name}={shlex.quote(value)}")
    sys.stdout.flush()  # a redirected stdout (`> hub.env`) must hold the lines while we serve
    click.echo(f"# serving {root.resolve()} at {server.endpoint}; Ctrl+C to stop", err=True)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("Stopped.", err=True)


def _read_token_file(path: Path) -> list[str]:
    tokens = [line.strip() for line in path.read_text().splitlines()]
    tokens = [token for token in tokens if token and not token.startswith("#")]
    if not tokens:
        raise ConfigError(f"No token in {path}.", hint="Put one token per line in the file.")
    return tokens
