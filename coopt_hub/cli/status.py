"""`coopt-hub status`: every shard of the plan at a glance."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.cli.output import Output

EXAMPLES = """
\b
Examples:
  coopt-hub status org/digits-coopt
  coopt-hub status org/digits-coopt --json | jq '.shards[] | select(.state != "done") | .shard'
"""


@click.command(epilog=EXAMPLES)
@repo_argument()
@token_option
@json_option
def status(repo, token, as_json):
    """Show each shard of REPO: branch, commit, prior, V, reference, residual, rows and state.

    A shard is done (its branch holds files made for this plan and source commit), missing (nothing
    pushed) or stale (made for another plan or source commit, or its files do not read).
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.status import collaboration_status

    out = Output(as_json)
    result = collaboration_status(Hub(token=token), repo)
    out.result(result.to_dict(), render(result))


def render(result) -> str:
    from coopt_hub.platform.card import prior_label
    from coopt_hub.platform.status import DONE, MISSING, STALE

    plan = result.plan
    best = result.best
    rows = [("shard", "state", "branch", "commit", "prior", "out", "V", "reference", "residual", "rows", "skipped", "merged")]
    for shard in result.shards:
        header = shard.header
        reference = "-"
        if header is not None:
            reference = "itself" if header.reference is None else f"shard {header.reference['shard']}"
        rows.append((
            str(shard.shard),
            shard.state,
            shard.branch,
            shard.commit[:8] if shard.commit else "-",
            prior_label(header.prior) if header else "-",
            str(header.output_dim) if header else "-",
            f"{header.uniformity:.4f}" if header else "-",
            reference,
            f"{header.residual:.4f}" if header else "-",
            f"{header.num_rows}/{shard.expected_rows}" if header else f"0/{shard.expected_rows}",
            str(shard.skipped) if header else "-",
            "yes" if shard.merged else "no",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"{result.repo}: plan {plan.plan_hash[:12]} over {plan.source_repo}@{plan.source_revision[:8]} "
        f"(split {plan.split}, {plan.num_rows} rows, {plan.num_shards} shards, dim {plan.dim})",
        f"{len(result.in_state(DONE))} done, {len(result.in_state(MISSING))} missing, "
        f"{len(result.in_state(STALE))} stale; {result.rows_done}/{plan.num_rows} rows labeled"
        + (f"; best prior: shard {best.shard} (V {best.header.uniformity:.4f})" if best else "")
        + (f"; main holds {result.merged_tag}" if result.merged_tag else "; not merged yet"),
        "",
    ]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for shard in result.shards:
        for problem in shard.problems:
            lines.append(f"shard {shard.shard}: {problem}")
    return "\n".join(lines)
