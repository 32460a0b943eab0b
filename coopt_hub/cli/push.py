"""`coopt-hub push`: send a shard result made by `optimize` without --push."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, repo_argument, shard_option, token_option, workdir_option

EXAMPLES = """
\b
Examples:
  coopt-hub push --shard 3                              # repo from `coopt-hub join`
  coopt-hub push org/digits-coopt --shard 3 --workdir /scratch/coopt
"""


@click.command(epilog=EXAMPLES)
@repo_argument()
@shard_option("The shard k to push.")
@workdir_option("The --workdir `optimize` wrote to.")
@click.option("--overwrite", is_flag=True, help="Replace a shard/{k} result made with another prior.")
@token_option
@json_option
def push(repo, shard, workdir, overwrite, token, out):
    """Commit the newest local result of shard K of REPO to branch shard/{k}, in one commit.

    Nothing is committed when the branch already holds the same result.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.participant.push import push_shard

    result = push_shard(Hub(token=token), repo, shard, workdir=workdir, overwrite=overwrite, progress=out)
    verb = "Pushed" if result.pushed else "Already on the branch"
    out.result(f"{verb}: shard {shard} of {repo} at {result.report['branch']} @ {result.commit}", **result.to_dict())
