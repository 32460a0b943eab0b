"""`coopt-hub merge`: publish the verified, aligned shards as a versioned dataset on main."""

from __future__ import annotations

import click
from click.core import ParameterSource

from coopt_hub.cli.options import json_option, repo_argument, token_option

EXAMPLES = """
\b
Examples:
  coopt-hub merge org/digits-coopt
  coopt-hub merge org/imagenet-coopt --images reference --tag v3
  coopt-hub merge org/digits-coopt --allow-partial --json
  coopt-hub merge org/digits-coopt --verify --verify-sample 256
  coopt-hub merge                      # the repo of `coopt-hub join` in this directory
"""


@click.command(epilog=EXAMPLES)
@repo_argument()
@click.option("--tag", default=None, help="Version tag of the merge (default: the next free vN); must not exist yet.")
@click.option(
    "--images",
    type=click.Choice(["copy", "reference"]),
    default="copy",
    show_default=True,
    help="copy: the parquet files carry the images; reference: ids only, recipes join with the pinned source.",
)
@click.option("--allow-partial", is_flag=True, help="Merge even if some shards were not pushed (recorded in the card).")
@click.option("--verify", is_flag=True,
              help="Also re-encode a sample of each shard and all anchors with its declared prior, as `coopt-hub "
                   "verify` does, and refuse the merge unless every shard passes (recorded in the card).")
@click.option("--verify-sample", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images of each shard that --verify re-encodes.")
@click.option("--no-evaluate", is_flag=True,
              help="Skip measuring target quality (probe, k-NN, leave-one-shard-out on a seeded sample of at most "
                   "20,000 rows), which merge does when the source has a label column; `coopt-hub evaluate` does it "
                   "later.")
@token_option
@json_option
@click.pass_context
def merge(ctx, repo, tag, images, allow_partial, verify, verify_sample, no_evaluate, token, out):
    """Check every shard branch of REPO, align them to the best prior, and publish main as a new version.

    Nothing is written unless every check passes; main changes in one commit, which is tagged.
    Running it again without new shards does nothing.
    """
    from coopt_hub.core.memory import bound_heap
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.merge.run import merge as merge_shards

    if not verify and ctx.get_parameter_source("verify_sample") is not ParameterSource.DEFAULT:
        raise click.UsageError("--verify-sample is the sample of --verify; pass --verify too.")
    # This process's merge reads, uploads and encodes on several threads and frees large arrays all
    # along: bounded, the heap keeps the merge's memory goal (benchmarks/merge.py).
    bound_heap()
    result = merge_shards(
        Hub(token=token), repo, tag=tag, images=images, allow_partial=allow_partial, verify=verify,
        verify_sample=verify_sample, no_evaluate=no_evaluate, progress=out,
    )
    manifest = result.manifest
    realigned = [shard.shard for shard in manifest.shards if shard.realigned]
    train = manifest.splits[manifest.source.split]
    summary = {
        "repo": repo,
        "tag": result.tag,
        "commit": result.commit,
        "created": result.created,
        "rows": train.num_rows,
        "shards": [shard.shard for shard in manifest.shards],
        "missing": list(manifest.missing),
        "reference": manifest.reference.shard,
        "realigned": realigned,
        "images": manifest.images,
        "verified": manifest.verification is not None,
        "quality": manifest.quality,
    }
    if not result.created:
        text = f"Unchanged: main of {repo} already holds this merge as {result.tag} ({result.commit[:8]})."
    else:
        text = (
            f"Published {repo}@{result.tag} ({result.commit[:8]}): {train.num_rows} rows from shards "
            f"{', '.join(str(s) for s in summary['shards'])}, aligned to shard {manifest.reference.shard}"
            + (f"; re-aligned shards {', '.join(map(str, realigned))}" if realigned else "")
            + (f"; PARTIAL, missing shards {', '.join(map(str, manifest.missing))}" if manifest.missing else "")
            + ("; every shard verified against its declared prior" if manifest.verification else "")
            + f".\nLoad it with load_dataset({repo!r}, revision={result.tag!r})."
        )
    out.result(text, **summary)
