"""`coopt-hub prepare-source`: republish a source with row groups sized for the planned shards."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, token_option

EXAMPLES = """
\b
Examples:
  coopt-hub prepare-source org/photos org/photos-sharded --shards 8
  coopt-hub init org/photos-coopt --source org/photos-sharded --shards 8 --anchors 0.001
  coopt-hub prepare-source org/photos org/photos-sharded --rows-per-group 500 --revision v2
"""


@click.command(epilog=EXAMPLES)
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DEST")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="The shards `coopt-hub init` will plan: row groups are sized to give each shard several "
                   "(a plan splits by row group from 2 per shard on).")
@click.option("--rows-per-group", type=click.IntRange(min=1), default=None,
              help="Rows per row group, instead of --shards.")
@click.option("--revision", default=None, help="Branch, tag or commit of SRC to copy (default: main).")
@click.option("--private", is_flag=True, help="Create DEST as private.")
@token_option
@json_option
def prepare_source(source, dest, shards, rows_per_group, revision, private, token, out):
    """Republish the dataset SRC as DEST in row groups sized for sharding, in one commit.

    DEST holds the same rows in the same order (the same sample ids) and the same splits, so that
    `coopt-hub init --source DEST` splits it by row group and each participant downloads only its
    share. Rerunning with the same SRC commit and sizes makes no new commit.
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.prepare import prepare_source as republish

    result = republish(Hub(token=token), source, dest, revision=revision, rows_per_group=rows_per_group,
                       shards=shards, private=private, progress=out)
    splits = "; ".join(f"{split.name}: {split.rows} rows, {-(-split.rows // split.rows_per_group)} row groups of "
                       f"{split.rows_per_group}" for split in result.splits)
    verb = "Published" if result.created else "Unchanged (DEST holds this copy already)"
    out.result(
        f"{verb}: {dest} @ {result.commit} from {source}@{result.revision[:8]} ({splits}).\n"
        f"Next: coopt-hub init REPO --source {dest} --shards {shards or 'K'} --anchors A",
        source=source, revision=result.revision, dest=dest, commit=result.commit, created=result.created,
        splits=[{"name": split.name, "rows": split.rows, "rows_per_group": split.rows_per_group,
                 "files": list(split.files)} for split in result.splits],
    )
