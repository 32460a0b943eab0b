"""`coopt-hub hub serve`: run the embedded Hub-compatible server in the foreground;
`coopt-hub hub token add`: give someone a token for it, with a role;
`coopt-hub hub import-model`: put a model repo into a hub (the embedded one, typically)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from coopt_hub.cli.options import json_option, token_option
from coopt_hub.errors import ConfigError

SERVE_EXAMPLES = """
\b
Examples:
  coopt-hub hub serve --root ./hub-data
  coopt-hub hub serve --root ./hub-data --port 8765 --token-file ./tokens.txt
  coopt-hub hub serve --root ./hub-data > hub.env &   # then, in any shell: source hub.env
  coopt-hub hub serve --root ./hub-data --host 0.0.0.0 --public-url https://hub.example.org
"""

TOKEN_EXAMPLES = """
\b
Examples:
  coopt-hub hub token add --token-file tokens.txt --role contribute --repo org/cats --user alice
  coopt-hub hub token add --token-file tokens.txt --role write --repo 'org/*' --main --user ci
  coopt-hub hub token add --token-file tokens.txt --role admin --user owner
"""

IMPORT_EXAMPLES = """
\b
Examples:
  coopt-hub hub import-model timm/vit_base_patch32_clip_224.openai      # from this machine's hf cache
  coopt-hub hub import-model timm/vit_base_patch32_clip_224.openai --from ./vit-b-32 --endpoint http://127.0.0.1:8765
  coopt-hub optimize --shard 3 --model ViT-B-32 --pretrained openai --weights-endpoint http://127.0.0.1:8765
"""


@click.group()
def hub() -> None:
    """Run the embedded Hugging Face Hub-compatible server, and put model repos into a hub."""


@hub.command(epilog=SERVE_EXAMPLES)
@click.option("--root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding every repo (created if missing); restart on it to serve the same data.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--token", "tokens", multiple=True,
              help="A token that may write everywhere, main included (repeatable). "
                   "Without --token/--token-file one admin token is generated.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Tokens, one per line with a role and repo patterns (see `coopt-hub hub token add`); "
                   "re-read when it changes.")
@click.option("--max-body-mb", default=1024, show_default=True, type=click.IntRange(1),
              help="Largest API request body accepted (413 above); LFS uploads are bounded by their declared size.")
@click.option("--public-url", metavar="URL", default=None,
              help="The address clients reach the server at (behind a reverse proxy): the base of every link in "
                   "its answers and of the printed HF_ENDPOINT. Default: the address it listens on.")
@click.option("--quiet", is_flag=True, help="Do not log each request on stderr.")
def serve(root: Path, host: str, port: int, tokens: tuple[str, ...], token_file: Path | None,
          max_body_mb: int, public_url: str | None, quiet: bool) -> None:
    """Serve the Hub API for the real huggingface_hub and datasets clients.

    Prints the environment a client needs on stdout, then logs requests on stderr until Ctrl+C.
    """
    from coopt_hub.server import HubServer
    from coopt_hub.server.tokens import TokenFileError

    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{public_url!r} is not an http(s) URL.", param_hint="--public-url")
    try:
        server = HubServer(root, tokens=list(tokens) or None, host=host, port=port, public_url=public_url,
                           max_body_bytes=max_body_mb * 1024 * 1024, token_file=token_file)
    except TokenFileError as err:
        raise ConfigError(f"Cannot read the token file: {err}",
                          hint="Fix the line it names; `coopt-hub hub token add --help` shows the format.") from None
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


@hub.command("import-model", epilog=IMPORT_EXAMPLES)
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--from", "source", type=click.Path(exists=True, path_type=Path), default=None, metavar="DIR_OR_CACHE",
              help="A folder of the model's files (e.g. from `hf download REPO --local-dir DIR`), or an hf cache "
                   "folder holding REPO_ID. Default: this machine's hf cache.")
@click.option("--revision", default="main", show_default=True,
              help="The revision of REPO_ID to take from an hf cache.")
@click.option("--endpoint", metavar="URL", default=None,
              help="The hub to put it into. Default: HF_ENDPOINT (`coopt-hub hub serve` prints it).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@token_option
@json_option
def import_model(repo_id: str, source: Path | None, revision: str, endpoint: str | None, private: bool,
                 token: str | None, out) -> None:
    """Put the model repo REPO_ID (its files in a folder or the hf cache) into a hub, in one commit.

    Then priors load their weights from that hub with --weights-endpoint URL. Rerunning sends only
    what the repo lacks, and makes no commit when it holds everything already.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.hub.models import import_model as put_model
    from coopt_hub.hub.models import local_model_folder

    folder = local_model_folder(repo_id, source, revision)
    result = put_model(Hub(token=token, endpoint=endpoint), repo_id, folder, private=private)
    if result.created:
        outcome = f"Imported {len(result.sent)} of {len(result.files)} files into {result.endpoint}/{repo_id}"
    else:
        outcome = f"{result.endpoint}/{repo_id} already holds all {len(result.files)} files; nothing committed"
    out.result(f"{outcome} (commit {result.commit}).\n"
               f"Use it with: --weights-endpoint {result.endpoint} (or COOPT_HUB_WEIGHTS_ENDPOINT={result.endpoint})",
               repo_id=repo_id, endpoint=result.endpoint, commit=result.commit, created=result.created,
               folder=str(folder), files=list(result.files), sent=list(result.sent))


@hub.group()
def token() -> None:
    """Manage the tokens of a token file."""


@token.command("add", epilog=TOKEN_EXAMPLES)
@click.option("--token-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The token file `hub serve --token-file` reads (created 0600 if missing).")
@click.option("--role", required=True, type=click.Choice(["read", "contribute", "write", "admin"]),
              help="read: private repos; contribute: pull requests and comments; write: branches, tags, repos; "
                   "admin: also delete repos and tags, change visibility.")
@click.option("--repo", "repos", multiple=True, metavar="PATTERN",
              help="Repos the token covers, namespace/name with * and ? (repeatable); default: every repo.")
@click.option("--main", is_flag=True, help="With --role write: may also push to and merge into main.")
@click.option("--user", help="Name on its commits and pull requests; default: token-<8 hex digits of its hash>.")
def add(token_file: Path, role: str, repos: tuple[str, ...], main: bool, user: str | None) -> None:
    """Make a new token and add its sha256 to the token file; prints the token once.

    A running `hub serve` on that file accepts it at once. Only the hash is kept: a lost token
    cannot be shown again; add a new one and delete the old line.
    """
    from coopt_hub.server.tokens import TokenFileError, add_token

    try:
        new = add_token(token_file, role, repos, main=main, user=user)
    except TokenFileError as err:
        raise ConfigError(str(err), hint="Fix the token file line it names, or the option it complains about.") from None
    click.echo(new.token)
    click.echo(f"# user {new.user}, role {role}, repos {' '.join(repos) or 'all'}; added to {token_file}: "
               "shown only now", err=True)
