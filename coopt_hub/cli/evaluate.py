"""`coopt-hub evaluate`: how good a merged version's targets are, measured without training."""

from __future__ import annotations

import click

from coopt_hub.cli.columns import number
from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.cli.output import Column, format_table

EXAMPLES = """
\b
Examples:
  coopt-hub evaluate org/digits-coopt
  coopt-hub evaluate org/digits-coopt --revision v2 --label-column label
  coopt-hub evaluate org/digits-coopt --json | jq '.aligned.leave_one_shard_out.accuracy'
  coopt-hub evaluate                   # the repo of `coopt-hub join` in this directory
"""

# The rows are TargetQuality.probe_rows(); --json prints Evaluation.to_dict(), which holds the same figures.
COLUMNS = (
    Column("targets"),
    Column("scope"),
    Column("rows"),
    number("probe", "probe", ".3f"),
    number("k-NN", "knn", ".3f"),
    number("leave-one-shard-out", "held_out", ".3f"),
)


@click.command(epilog=EXAMPLES)
@repo_argument()
@click.option("--revision", default="main", show_default=True,
              help="The merged version to measure: a vN tag, a branch or a commit.")
@click.option("--label-column", default=None,
              help="The column of the merged split to probe against (default: the label column the merge recorded).")
@token_option
@json_option
def evaluate(repo, revision, label_column, token, out):
    """Measure the targets of a merged version of REPO without training.

    Against a label column: a cross-validated linear probe and k-NN accuracy of the aligned and of
    the raw (unaligned) targets, over all rows and per shard, and a leave-one-shard-out probe
    (fitted on the other shards, scored on one): high only when the shards share one space. Always:
    each shard's agreement with the reference on the anchors, held out. On a seeded sample of at
    most 20,000 rows.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.evaluate import evaluate as measure

    result = measure(Hub(token=token), repo, revision, label_column=label_column, progress=out)
    quality = result.quality
    notes = [f"shard {a.shard} vs reference shard {quality.reference} on {a.anchors} anchors ({a.method}, held out): "
             f"cosine {a.cosine:.3f}, k-NN overlap {a.knn_overlap:.3f} (chance {a.chance:.3f})"
             for a in quality.agreement]
    table = format_table(quality.probe_rows(), COLUMNS) if quality.label_column else []
    # Not out.table: the figures' own "rows" (of the split) would clash with its `rows` parameter.
    out.result("\n".join([_summary(result), "", *table, *notes]), **result.to_dict())


def _summary(result) -> str:
    quality = result.quality
    where = f"{result.repo}@{result.tag} ({result.commit[:8]})"
    if quality.label_column is None:
        return f"{where}: no label column to probe against; agreement with the reference on the anchors only."
    return (f"{where}: {quality.sampled:,} of {quality.rows:,} rows against {quality.label_column!r} "
            f"(always the most frequent label: {quality.majority:.3f}); reference: shard {quality.reference}.")
