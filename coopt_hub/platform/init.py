"""`coopt-hub init`: publish the plan (pinned source, shards, anchors) to the CoOpt repo's main.

The plan and the anchor rows land in one commit. The anchors are materialised as one small parquet
file so that every participant fetches S in one download instead of touching the row groups S is
scattered over.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd

from coopt_hub import __version__
from coopt_hub.core.layout import ANCHORS_PATH, PLAN_PATH
from coopt_hub.core.plan import Plan, make_plan
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






def anchor_table(layout: SourceLayout, anchor_ids: tuple[int, ...], token: str | None = None) -> pa.Table:
    """Read the anchor rows from the units they live in; only the image column travels."""
    wanted: dict[int, list[int]] = defaultdict(list)
    unit_index = {unit.start: position for position, unit in enumerate(layout.units)}
    starts = np.array([unit.start for unit in layout.units])
    for sample_id in anchor_ids:
        unit_start = int(starts[np.searchsorted(starts, sample_id, side="right") - 1])
        wanted[unit_index[unit_start]].append(sample_id)
    pieces = []
    for position in sorted(wanted):
        unit = layout.units[position]
        rows = read_unit(layout.repo, layout.revision, unit, [layout.image_column], token)
        offsets = [sample_id - unit.start for sample_id in wanted[position]]
        pieces.append(rows.take(offsets).append_column("id", pa.array(wanted[position], pa.int64())))
    table = pa.concat_tables(pieces)
    return table.select(["id", layout.image_column])


def _diff(old: Plan, new: Plan) -> list[str]:
    old_fields, new_fields = json.loads(old.to_json()), json.loads(new.to_json())
    return sorted(key for key in new_fields if old_fields.get(key) != new_fields[key])


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
        anchors_file = Path(scratch) / "anchors.parquet"
        state = {"created": False}

        def build(head: str | None):
            existing = hub.read_json(repo, PLAN_PATH, head) if head else None
            if existing is not None:
                current = Plan.from_json(json.dumps(existing))
                if current.plan_hash == plan.plan_hash:
                    return None
                raise PlanError(
                    f"{repo} already holds a different plan (differs in: {', '.join(_diff(current, plan))}).",
                    hint="Re-run with the arguments of the existing plan (see coopt/plan.json on main), "
                    "or start a new collaboration in a new repo.",
                )
            if not anchors_file.exists():
                pq.write_table(anchor_table(layout, plan.anchor_ids, hub.token), anchors_file)
            state["created"] = True
            readme = README_STUB.format(
                anchors=ANCHORS_PATH,
                source=source,
                revision=layout.revision,
                split=split,
                rows=layout.num_rows,
                shards=shards,
                granularity=plan.granularity,
                anchors_count=len(plan.anchor_ids),
                version=__version__,
                repo=repo,
            )
            return [
                CommitOperationAdd(PLAN_PATH, plan.to_json().encode()),
                CommitOperationAdd(ANCHORS_PATH, str(anchors_file)),
                CommitOperationAdd("README.md", readme.encode()),
            ]

        commit = hub.commit(repo, "main", build, message=f"coopt-hub init: {shards} shards of {source}@{layout.revision[:8]}")
    return InitResult(plan=plan, commit=commit if state["created"] else None, created=state["created"])


