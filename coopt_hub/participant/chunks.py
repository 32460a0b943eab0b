"""What a job encodes: shard k's rows, one chunk per storage unit, and the anchors in fixed slices.

A chunk loads its own images from the source only when it is encoded, so a chunk that a rerun
finds finished is never downloaded again. Once every chunk is in the store, `read_outputs` puts
the shard's and the anchors' outputs back together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coopt_hub.core.plan import Plan, Unit
from coopt_hub.hub.source import read_plan_unit
from coopt_hub.participant.labeling import Chunk, ChunkStore

# Anchors are cut into slices of this many rows, so that S is spread over the processes too and an
# interrupted run keeps most of it.
ANCHOR_CHUNK_ROWS = 256


@dataclass(frozen=True)
class JobChunks:
    shard: list[Chunk]  # one per storage unit holding rows of the shard, in id order
    anchors: list[Chunk]  # S in slices of ANCHOR_CHUNK_ROWS, in id order

    @property
    def all(self) -> list[Chunk]:
        return self.shard + self.anchors


def job_chunks(plan: Plan, shard: int, anchors: Callable[[], Any], token: str | None = None) -> JobChunks:
    """The chunks of shard `shard` and of the anchors.

    `anchors` returns the anchor table; it is called only when an anchor chunk is actually encoded.
    """
    shard_ids = plan.shard_ids(shard)
    shard_chunks = []
    for index, unit in enumerate(plan.units):
        if plan.granularity != "row" and plan.unit_shards[index] != shard:
            continue
        lo, hi = np.searchsorted(shard_ids, [unit.start, unit.stop])
        ids = shard_ids[lo:hi]
        if ids.size:
            shard_chunks.append(Chunk(f"unit-{index:05d}", ids, _unit_loader(plan, unit, ids, token)))
    anchor_ids = np.asarray(plan.anchor_ids, dtype=np.int64)
    anchor_chunks = [
        Chunk(f"anchors-{i // ANCHOR_CHUNK_ROWS:05d}", anchor_ids[i : i + ANCHOR_CHUNK_ROWS],
              _anchor_loader(plan, anchors, i, i + ANCHOR_CHUNK_ROWS))
        for i in range(0, len(anchor_ids), ANCHOR_CHUNK_ROWS)
    ]
    return JobChunks(shard=shard_chunks, anchors=anchor_chunks)


def _unit_loader(plan: Plan, unit: Unit, ids: np.ndarray, token: str | None) -> Callable[[], list[Any]]:
    def load() -> list[Any]:
        column = read_plan_unit(plan, unit, [plan.image_column], token).column(plan.image_column)
        if len(ids) != unit.num_rows:
            column = column.take(ids - unit.start)
        return column.to_pylist()

    return load


def _anchor_loader(plan: Plan, anchors: Callable[[], Any], start: int, stop: int) -> Callable[[], list[Any]]:
    def load() -> list[Any]:
        return anchors().column(plan.image_column).slice(start, stop - start).to_pylist()

    return load


@dataclass(frozen=True)
class Encoded:
    """Finished chunks put back together; the chunks are in id order, so the ids stay sorted."""

    ids: np.ndarray  # int64, the rows encoded
    features: np.ndarray  # float32 [len(ids), output_dim], L2-normalised prior outputs
    bad_ids: np.ndarray  # int64, the rows whose image could not be decoded


@dataclass(frozen=True)
class JobOutputs:
    shard: Encoded
    anchors: Encoded


def read_outputs(store: ChunkStore, chunks: JobChunks, output_dim: int) -> JobOutputs:
    """The outputs of every chunk of the job, which must all be finished in `store`."""
    return JobOutputs(shard=_read_encoded(store, chunks.shard, output_dim),
                      anchors=_read_encoded(store, chunks.anchors, output_dim))


def _read_encoded(store: ChunkStore, chunks: Sequence[Chunk], output_dim: int) -> Encoded:
    outputs = [store.read(chunk.name) for chunk in chunks]
    if not outputs:
        return Encoded(np.zeros(0, np.int64), np.zeros((0, output_dim), np.float32), np.zeros(0, np.int64))
    return Encoded(ids=np.concatenate([o.ids for o in outputs]),
                   features=np.concatenate([o.features for o in outputs]),
                   bad_ids=np.concatenate([o.bad_ids for o in outputs]))
