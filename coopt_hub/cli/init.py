"""`coopt-hub init`: publish the plan of a collaboration."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.core.plan import DEFAULT_PROJECTION, PROJECTIONS

EXAMPLES = """
\b
Examples:
  coopt-hub init org/tinyimagenet-coopt --source org/tinyimagenet --shards 8 --anchors 0.001
  coopt-hub init org/digits-coopt --source org/digits --source-revision v1 --shards 3 --anchors 1024 --dim 256
"""


def _anchors(value: str) -> int | float:
    try:
        number = float(value)
    except ValueError as err:
        raise click.BadParameter(f"{value!r} is not a number: pass a count (300) or a fraction (0.001).") from err
    if number <= 0 or (number >= 1 and not number.is_integer()):
        raise click.BadParameter("pass a whole count >= 1 (e.g. 300) or a fraction between 0 and 1 (e.g. 0.001).")
    return int(number) if number >= 1 else number


@click.command(epilog=EXAMPLES)
@repo_argument(from_config=False)
@click.option("--source", required=True, help="Source dataset repo id (unlabeled images, parquet).")
@click.option("--source-revision", default=None, help="Branch, tag or commit of the source (pinned to its sha).")
@click.option("--split", default="train", show_default=True, help="Split to optimize.")
@click.option("--image-column", default="image", show_default=True, help="Column holding the images.")
@click.option("--shards", type=click.IntRange(min=1), required=True, help="Number of shards K (participants).")
@click.option("--anchors", required=True, help="Shared anchor subset S: a count (300) or a fraction < 1 (0.001).")
@click.option("--dim", type=click.IntRange(min=1), default=256, show_default=True, help="Common target dimension N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for shards, anchors and projections.")
@click.option("--temperature", type=float, default=2.0, show_default=True, help="Uniformity temperature t (> 0).")
@click.option("--projection", type=click.Choice(PROJECTIONS), default=DEFAULT_PROJECTION, show_default=True,
              help="How prior outputs reach --dim: the plan's random W, or each participant's own PCA basis of its "
                   "shard (measured worse on leave-one-shard-out probes; see the card's Limitations).")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@token_option
@json_option
def init(repo, source, source_revision, split, image_column, shards, anchors, dim, seed, temperature, projection,
         private, token, out):
    """Publish the plan: pin SOURCE to a commit, split it into shards, draw the anchors.

    Re-running with the same arguments does nothing; different arguments are refused.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.init import initialize

    result = initialize(
        Hub(token=token),
        repo,
        source=source,
        source_revision=source_revision,
        split=split,
        image_column=image_column,
        shards=shards,
        anchors=_anchors(anchors),
        dim=dim,
        seed=seed,
        temperature=temperature,
        projection=projection,
        private=private,
        progress=out,
    )
    plan = result.plan
    sizes = [len(plan.shard_ids(k)) for k in range(plan.num_shards)]
    if plan.granularity == "row":
        needed = 2 * plan.num_shards
        out.warn(
            f"{plan.source_repo} (split {plan.split}) has {len(plan.units)} non-empty row group(s); a plan splits "
            f"{plan.num_shards} shards by row group from 2 x {plan.num_shards} = {needed} on. So shards are sets of "
            f"rows and every participant downloads the whole split ({plan.num_rows} rows). To let each download only "
            f"its share, republish the source in row groups sized for the shards and plan on that copy in a new repo: "
            f"`coopt-hub prepare-source {plan.source_repo} {plan.source_repo}-sharded --shards {plan.num_shards}`, "
            f"then `coopt-hub init NEW_REPO --source {plan.source_repo}-sharded --shards {plan.num_shards} --anchors A`."
        )
    summary = {
        "repo": repo,
        "created": result.created,
        "commit": result.commit,
        "source": f"{plan.source_repo}@{plan.source_revision}",
        "rows": plan.num_rows,
        "shards": sizes,
        "anchors": len(plan.anchor_ids),
        "granularity": plan.granularity,
        "plan_hash": plan.plan_hash,
        "projection": plan.projection_kind,
        "warnings": list(result.warnings),
        "undecodable_anchors": list(result.undecodable_anchors),
    }
    verb = "Published" if result.created else "Unchanged (same plan already published)"
    out.result(
        f"{verb}: {repo} plans {plan.num_shards} shards of {plan.source_repo}@{plan.source_revision[:8]} "
        f"({plan.num_rows} rows, {plan.granularity} granularity; shard sizes {sizes}; {len(plan.anchor_ids)} anchors).",
        **summary,
    )
