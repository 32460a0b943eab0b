"""`coopt-hub verify`: re-encode a sample of each pushed shard with its declared prior and check it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from coopt_hub.cli.columns import COMMIT, PRIOR, SHARD, number
from coopt_hub.cli.options import (
    batch_size_option,
    device_option,
    json_option,
    repo_argument,
    shard_option,
    token_option,
    weights_endpoint_option,
)
from coopt_hub.cli.output import Column

EXAMPLES = """
\b
Examples:
  coopt-hub verify org/digits-coopt
  coopt-hub verify org/digits-coopt --shard 2 --sample 256 --seed 7
  coopt-hub verify org/imagenet-coopt --checkpoint-dir ./weights --device cuda --json
"""


def _lowest_cosine(key: str) -> Column:
    return Column(key, lambda row: row[key] and f"{row[key]['min_cosine']:.7f}")


# The rows are `ShardVerification.to_dict()`s, as --json prints them. The cosine columns show the
# lowest cosine, the figure the threshold applies to; the mean and the worst id are in --json and in
# the note of a failed check.
COLUMNS = (
    SHARD,
    Column("result", lambda row: row["status"]),
    COMMIT,
    PRIOR,
    _lowest_cosine("targets"),
    _lowest_cosine("anchors"),
    _lowest_cosine("aligned"),
    number("dV", "uniformity_delta", ".1e"),
    number("dresidual", "residual_delta", ".1e"),
    number("dheld-out", "cv_residual_delta", ".1e"),
)


@click.command(epilog=EXAMPLES)
@repo_argument()
@shard_option("Shard to verify (repeatable; default: every pushed shard).", multiple=True)
@click.option("--sample", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images of each shard to re-encode (all anchors are re-encoded too).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sample.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.999, show_default=True,
              help="Lowest cosine allowed between a pushed and a recomputed vector. Honest fp32 shards give "
                   "~0.9999999, bf16 ones ~0.9998; 5% noise on the targets gives ~0.9987.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=1e-4, show_default=True,
              help="Largest difference allowed between the declared and recomputed V and alignment residual.")
@device_option("cpu")
@weights_endpoint_option
@click.option("--checkpoint-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder holding declared checkpoints (matched by file name) that are not at their declared path.")
@batch_size_option
@token_option
@json_option
def verify(repo, shards, sample, seed, threshold, tolerance, device, checkpoint_dir, batch_size, token, out):
    """Check that each pushed shard of REPO holds what its declared prior produces.

    The declared prior must load with the declared fingerprint; a seeded sample of the shard and
    all anchors are re-encoded and compared with the pushed targets; V, the alignment residual and
    the aligned targets are recomputed from the pushed anchors. Exits non-zero when a shard fails
    or cannot be verified (for instance when its weights are not available here).
    """
    from coopt_hub.errors import VerificationError
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.verify import MISSING, PriorLoader, Thresholds, failure_error, verify_repo

    thresholds = Thresholds(min_cosine=threshold, tolerance=tolerance)
    results = verify_repo(
        Hub(token=token), repo, shards=sorted(set(shards)) or None, sample=sample, seed=seed, thresholds=thresholds,
        priors=PriorLoader(device, checkpoint_dir), batch_size=batch_size, progress=out,
    )
    counts = ", ".join(f"{count} {result}" for result, count in Counter(r.status for r in results).items())
    out.table(
        [r.to_dict() for r in results], COLUMNS, key="shards",
        message=f"{repo}: {counts}; cosines are the lowest of each comparison (threshold {threshold})",
        notes=[f"shard {r.shard}: {check.name} ({check.status}): {check.message}" for r in results
               for check in r.problems()],
        repo=repo, sample=sample, seed=seed, thresholds={"min_cosine": threshold, "tolerance": tolerance},
        passed=all(r.passed for r in results if r.status != MISSING),
    )
    error = failure_error(results, repo)
    if error is not None:
        raise error
    missing = [r.shard for r in results if r.status == MISSING]
    if shards and missing:
        raise VerificationError(
            f"Nothing has been pushed for shard(s) {', '.join(map(str, missing))} of {repo}; nothing to verify.",
            hint=f"`coopt-hub status {repo}` shows which shards have been pushed.",
        )
