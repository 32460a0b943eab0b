"""`coopt-hub status`: every shard of the plan at a glance."""

from __future__ import annotations

from typing import Any

import click

from coopt_hub.cli.columns import COMMIT, PRIOR, SHARD, number
from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.cli.output import Column

EXAMPLES = """
\b
Examples:
  coopt-hub status org/digits-coopt
  coopt-hub status                     # the repo of `coopt-hub join` in this directory
  coopt-hub status org/digits-coopt --json | jq '.shards[] | select(.state != "done") | .shard'
"""


def _reference(row: dict[str, Any]) -> str | None:
    if row["prior"] is None:  # nothing readable was pushed
        return None
    return "itself" if row["reference"] is None else f"shard {row['reference']['shard']}"


# The rows are the shards of `CollaborationStatus.to_dict()`: the table and --json show the same data.
# Every branch is shard/{k}, so the table leaves that column to --json.
COLUMNS = (
    SHARD,
    Column("state"),
    COMMIT,
    PRIOR,
    Column("out", lambda row: row["output_dim"]),
    number("V", "uniformity", ".4f"),
    Column("reference", _reference),
    number("residual", "residual", ".4f"),
    Column("rows", lambda row: f"{row['rows'] or 0}/{row['expected_rows']}"),
    Column("skipped"),
    Column("merged", lambda row: "yes" if row["merged"] else "no"),
)


@click.command(epilog=EXAMPLES)
@repo_argument()
@token_option
@json_option
def status(repo, token, out):
    """Show each shard of REPO: state, commit, prior, V, reference, residual, rows, skipped and merged.

    A shard is done (its branch shard/K holds files made for this plan and source commit), missing
    (nothing pushed) or stale (made for another plan or source commit, or its files do not read).
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.status import collaboration_status

    result = collaboration_status(Hub(token=token), repo)
    document = result.to_dict()
    notes = [f"shard {shard.shard}: {problem}" for shard in result.shards for problem in shard.problems]
    out.table(document.pop("shards"), COLUMNS, message=_summary(result), notes=notes, key="shards", **document)


def _summary(result) -> str:
    """Two lines above the table: the plan, then where the collaboration stands."""
    from coopt_hub.platform.status import DONE, MISSING, STALE

    plan, best = result.plan, result.best
    return (
        f"{result.repo}: plan {plan.plan_hash[:12]} over {plan.source_repo}@{plan.source_revision[:8]} "
        f"(split {plan.split}, {plan.num_rows} rows, {plan.num_shards} shards, dim {plan.dim})\n"
        f"{len(result.in_state(DONE))} done, {len(result.in_state(MISSING))} missing, "
        f"{len(result.in_state(STALE))} stale; {result.rows_done}/{plan.num_rows} rows labeled"
        + (f"; best prior: shard {best.shard} (V {best.header.uniformity:.4f})" if best else "")
        + (f"; main holds {result.merged_tag}" if result.merged_tag else "; not merged yet")
    )
