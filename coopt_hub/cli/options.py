"""Option definitions shared by several commands, written once."""

from __future__ import annotations

import click

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one machine-readable JSON document on stdout; no progress bars."
)
token_option = click.option(
    "--token", envvar="HF_TOKEN", default=None, help="Hub token (default: HF_TOKEN or the saved `hf auth login` token)."
)
revision_option = click.option("--revision", default=None, help="Branch, tag or commit (default: main).")


def repo_argument(required: bool = True):
    return click.argument("repo", required=required, metavar="REPO")
