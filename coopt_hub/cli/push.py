"""`coopt-hub push`: send a shard result made by `optimize` without --push."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, repo_argument, shard_option, token_option, workdir_option

EXAMPLES = """
\b
Examples:
  coopt-hub push --shard 3                              # repo from `coopt-hub join`
  coopt-hub push org/digits-coopt --shard 3 --workdir /scratch/coopt
  coopt-hub push org/digits-coopt --shard 3 --create-pr   # as a pull request, e.g. on huggingface.co
"""

# Shared with `optimize`.
create_pr_option = click.option(
    "--create-pr", is_flag=True,
    help="Push as a pull request to REPO instead of to branch shard/{k} (done anyway when the token may not "
         "push branches); a rerun pushes to your open pull request of the shard.",
)


@click.command(epilog=EXAMPLES)
@repo_argument()
@shard_option("The shard k to push.")
@workdir_option("The --workdir `optimize` wrote to.")
@click.option("--overwrite", is_flag=True, help="Replace a shard/{k} result made with another prior.")
@create_pr_option
@token_option
@json_option
def push(repo, shard, workdir, overwrite, create_pr, token, out):
    """Commit the newest local result of shard K of REPO to branch shard/{k}, in one commit.

    A token that may not push branches (an outsider's on huggingface.co, a `contribute` token of the
    embedded hub) opens a pull request instead, as --create-pr does. Nothing is committed when the
    branch or your pull request already holds the same result.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.participant.push import published_at, push_shard

    hub = Hub(token=token)
    result = push_shard(hub, repo, shard, workdir=workdir, overwrite=overwrite, progress=out, create_pr=create_pr)
    where = published_at(hub, repo, shard, result.commit)
    verb = "Pushed" if result.pushed else "Already there"
    out.result(f"{verb}: shard {shard} of {repo} at {where} @ {result.commit}", published_at=where,
               **result.to_dict())
