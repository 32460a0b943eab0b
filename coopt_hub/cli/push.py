"""`coopt-hub push`: send a shard result made by `optimize` without --push."""

from __future__ import annotations

from pathlib import Path

import click

from coopt_hub.cli.options import json_option, token_option
from coopt_hub.cli.output import Output

EXAMPLES = """
\b
Examples:
  coopt-hub push --shard 3                              # repo from `coopt-hub join`
  coopt-hub push --repo org/digits-coopt --shard 3 --workdir /scratch/coopt
"""


@click.command(epilog=EXAMPLES)
@click.option("--repo", default=None, help="CoOpt repo (default: COOPT_HUB_REPO, then ./coopt-hub.json).")
@click.option("--shard", type=click.IntRange(min=0), required=True, help="The shard k to push.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("coopt-hub-work"),
              show_default=True, envvar="COOPT_HUB_WORKDIR", help="The --workdir `optimize` wrote to.")
@click.option("--overwrite", is_flag=True, help="Replace a shard/{k} result made with another prior.")
@token_option
@json_option
def push(repo, shard, workdir, overwrite, token, as_json):
    """Commit the newest local result of shard K to branch shard/{k}, in one commit.

    Nothing is committed when the branch already holds the same result.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.participant.config import load_config, resolve_repo
    from coopt_hub.participant.push import push_shard

    out = Output(as_json)
    repo = resolve_repo(repo, load_config())
    result = push_shard(Hub(token=token), repo, shard, workdir=workdir, overwrite=overwrite, messages=out)
    verb = "Pushed" if result.pushed else "Already on the branch"
    out.result(result.to_dict(), f"{verb}: shard {shard} of {repo} at {result.report['branch']} @ {result.commit}")
