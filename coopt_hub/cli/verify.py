"""`coopt-hub verify`: re-encode a sample of each pushed shard with its declared prior and check it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.cli.output import Output

EXAMPLES = """
\b
Examples:
  coopt-hub verify org/digits-coopt
  coopt-hub verify org/digits-coopt --shard 2 --sample 256 --seed 7
  coopt-hub verify org/imagenet-coopt --checkpoint-dir ./weights --device cuda --json
"""


@click.command(epilog=EXAMPLES)
@repo_argument()
@click.option("--shard", "shards", type=click.IntRange(min=0), multiple=True,
              help="Shard to verify (repeatable; default: every pushed shard).")
@click.option("--sample", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images of each shard to re-encode (all anchors are re-encoded too).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sample.")
@click.option("--threshold", type=click.FloatRange(-1.0, 1.0), default=0.999, show_default=True,
              help="Lowest cosine allowed between a pushed and a recomputed vector. Honest fp32 shards give "
                   "~0.9999999, bf16 ones ~0.9998; 5% noise on the targets gives ~0.9987.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=1e-4, show_default=True,
              help="Largest difference allowed between the declared and recomputed V and alignment residual.")
@click.option("--device", default="cpu", show_default=True, help="Device the priors run on (cpu, cuda, cuda:N).")
@click.option("--checkpoint-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder holding declared checkpoints (matched by file name) that are not at their declared path.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass.")
@token_option
@json_option
def verify(repo, shards, sample, seed, threshold, tolerance, device, checkpoint_dir, batch_size, token, as_json):
    """Check that each pushed shard of REPO holds what its declared prior produces.

    The declared prior must load with the declared fingerprint; a seeded sample of the shard and
    all anchors are re-encoded and compared with the pushed targets; V, the alignment residual and
    the aligned targets are recomputed from the pushed anchors. Exits non-zero when a shard fails
    or cannot be verified (for instance when its weights are not available here).
    """
    from coopt_hub.errors import VerificationError
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.verify import MISSING, PriorLoader, Thresholds, failure_error, verify_repo

    out = Output(as_json)
    thresholds = Thresholds(min_cosine=threshold, tolerance=tolerance)
    results = verify_repo(
        Hub(token=token), repo, shards=sorted(set(shards)) or None, sample=sample, seed=seed, thresholds=thresholds,
        priors=PriorLoader(device, checkpoint_dir), batch_size=batch_size, progress=out.info,
    )
    summary = {
        "repo": repo,
        "sample": sample,
        "seed": seed,
        "thresholds": {"min_cosine": threshold, "tolerance": tolerance},
        "passed": all(r.passed for r in results if r.status != MISSING),
        "shards": [r.to_dict() for r in results],
    }
    out.result(summary, render(repo, results))
    error = failure_error(results, repo)
    if error is not None:
        raise error
    missing = [r.shard for r in results if r.status == MISSING]
    if shards and missing:
        raise VerificationError(
            f"Nothing has been pushed for shard(s) {', '.join(map(str, missing))} of {repo}; nothing to verify.",
            hint=f"`coopt-hub status {repo}` shows which shards have been pushed.",
        )


def render(repo: str, results) -> str:
    from coopt_hub.platform.card import prior_label

    def cosines(agreement) -> str:
        return f"{agreement.min_cosine:.7f}/{agreement.mean_cosine:.7f}" if agreement else "-"

    def delta(value) -> str:
        return f"{value:.1e}" if value is not None else "-"

    rows = [("shard", "result", "commit", "prior", "targets min/mean", "anchors min/mean", "aligned min/mean",
             "dV", "dresidual")]
    for r in results:
        rows.append((
            str(r.shard),
            r.status,
            r.commit[:8] if r.commit else "-",
            prior_label(r.prior) if r.prior else "-",
            cosines(r.targets),
            cosines(r.anchors),
            cosines(r.aligned),
            delta(r.uniformity_delta),
            delta(r.residual_delta),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    counts = Counter(r.status for r in results)
    lines = [f"{repo}: " + ", ".join(f"{count} {status}" for status, count in counts.items()), ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        lines += [f"shard {r.shard}: {check.name} ({check.status}): {check.message}" for check in r.problems()]
    return "\n".join(lines)
