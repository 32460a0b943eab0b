"""`coopt-hub init`: publish the plan (pinned source, shards, anchors) to the CoOpt repo's main.

The plan and the anchor rows land in one commit. The anchors are materialised as one small parquet
file so that every participant fetches S in one download instead of touching the row groups S is
scattered over.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperation, CommitOperationAdd

from coopt_hub import __version__
from coopt_hub.core.layout import ANCHORS_PATH, PLAN_PATH
from coopt_hub.core.plan import Plan, Unit, make_plan
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.errors import PlanError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.source import SourceLayout, read_unit, resolve_source

README_STUB = """---
tags:
- coopt
- coopt-hub
configs:
- config_name: anchors
  data_files:
  - split: anchors
    path: {anchors}
---
# CoOpt collaboration on {source}

This repo is a collaborative data optimization ([CoOpt](https://arxiv.org/abs/2505.14117)) run,
managed with coopt-hub {version}. The source `{source}` is pinned to commit `{revision}`
(split `{split}`, {rows} rows) and split into {shards} shards ({granularity} granularity); {anchors_count}
anchor samples are shared by every participant.

Join with:

    coopt-hub join {repo} --model ViT-B-32 --pretrained openai
    coopt-hub optimize --shard K --push

`coopt-hub status {repo}` shows the progress; `coopt-hub merge {repo}` publishes the dataset as vN.
"""


@dataclass(frozen=True)
class InitResult:
    plan: Plan
    commit: str | None
    created: bool


def initialize(
    hub: Hub,
    repo: str,
    *,
    source: str,
    source_revision: str | None,
    split: str,
    image_column: str,
    shards: int,
    anchors: float,
    dim: int,
    seed: int,
    temperature: float,
    private: bool = False,
    progress: Progress | None = None,
) -> InitResult:
    """Publish the plan to `repo`'s main; a no-op when the same plan is already there."""
    if shards < 1:
        raise PlanError(f"--shards must be at least 1, got {shards}.", hint="Pass the number of participants' shards.")
    layout = resolve_source(source, source_revision, split, image_column, hub.token)
    plan = make_plan(
        source_repo=source,
        source_revision=layout.revision,
        split=split,
        image_column=image_column,
        units=layout.units,
        num_shards=shards,
        anchors=anchors,
        dim=dim,
        seed=seed,
        temperature=temperature,
    )
    hub.ensure_repo(repo, private=private)
    with tempfile.TemporaryDirectory(prefix="coopt-init-") as scratch:
        build = _PlanCommit(hub, repo, layout, plan, Path(scratch) / "anchors.parquet", progress or LogProgress())
        message = f"coopt-hub init: {shards} shards of {source}@{layout.revision[:8]}"
        commit = hub.commit(repo, "main", build, message=message)
    return InitResult(plan=plan, commit=commit if build.created else None, created=build.created)


class _PlanCommit:
    """The init commit (plan, anchor rows, README), built from the head Hub.commit gives it on each try;
    nothing when main holds this plan already. `created`: a try built the commit (a retry that finds it
    went through before the connection dropped leaves it True)."""

    def __init__(self, hub: Hub, repo: str, layout: SourceLayout, plan: Plan, anchors_file: Path, progress: Progress):
        self.hub, self.repo, self.layout, self.plan = hub, repo, layout, plan
        self.anchors_file, self.progress = anchors_file, progress
        self.created = False

    def __call__(self, head: str | None) -> list[CommitOperation] | None:
        if self._holds_this_plan(head):
            return None
        if not self.anchors_file.exists():  # a retried commit reuses the rows read on the first try
            anchor_ids = np.asarray(self.plan.anchor_ids, dtype=np.int64)
            table = rows_by_id(self.layout.repo, self.layout.revision, self.layout.units, anchor_ids,
                               self.layout.image_column, self.hub.token, self.progress)
            pq.write_table(table, self.anchors_file)
        self.created = True
        return [
            CommitOperationAdd(PLAN_PATH, self.plan.to_json().encode()),
            CommitOperationAdd(ANCHORS_PATH, str(self.anchors_file)),
            CommitOperationAdd("README.md", self._readme().encode()),
        ]

    def _holds_this_plan(self, head: str | None) -> bool:
        """True when main holds this very plan; a PlanError when it holds another one."""
        existing = self.hub.read_json(self.repo, PLAN_PATH, head) if head else None
        if existing is None:
            return False
        current = Plan.from_json(json.dumps(existing))
        if current.plan_hash == self.plan.plan_hash:
            return True
        raise PlanError(
            f"{self.repo} already holds a different plan (differs in: {', '.join(_diff(current, self.plan))}).",
            hint=f"Re-run with the arguments of the existing plan (see {PLAN_PATH} on main), "
            "or start a new collaboration in a new repo.",
        )

    def _readme(self) -> str:
        layout, plan = self.layout, self.plan
        return README_STUB.format(
            anchors=ANCHORS_PATH,
            source=plan.source_repo,
            revision=layout.revision,
            split=plan.split,
            rows=layout.num_rows,
            shards=plan.num_shards,
            granularity=plan.granularity,
            anchors_count=len(plan.anchor_ids),
            version=__version__,
            repo=self.repo,
        )


def rows_by_id(
    repo: str,
    revision: str,
    units: Sequence[Unit],
    ids: np.ndarray,
    column: str,
    token: str | None = None,
    progress: Progress | None = None,
) -> pa.Table:
    """`id` and `column` of the sorted sample `ids`, in that order, reading only the storage units that
    hold them (with range reads: the rest of the source never travels)."""
    spans = [(unit, *np.searchsorted(ids, [unit.start, unit.stop])) for unit in units]
    holding = [(unit, lo, hi) for unit, lo, hi in spans if hi > lo]
    pieces = []
    with (progress or LogProgress()).bar(len(holding), f"Reading {ids.size} rows of {repo}", unit="row group") as bar:
        for unit, lo, hi in holding:
            rows = read_unit(repo, revision, unit, [column], token)
            pieces.append(rows.take(ids[lo:hi] - unit.start).append_column("id", pa.array(ids[lo:hi], pa.int64())))
            bar.update(1)
    return pa.concat_tables(pieces).select(["id", column])


def _diff(old: Plan, new: Plan) -> list[str]:
    old_fields, new_fields = json.loads(old.to_json()), json.loads(new.to_json())
    return sorted(key for key in new_fields if old_fields.get(key) != new_fields[key])
