"""Where things live in a CoOpt repo: main's plan, anchors, manifest and merged files, and each
shard's branch and files.
"""

from __future__ import annotations

from typing import NamedTuple

TARGETS_FILE = "targets.safetensors"


ANCHORS_FILE = "anchors.safetensors"


REPORT_FILE = "report.json"


def shard_branch(k: int) -> str:
    return f"shard/{k}"


def shard_prefix(k: int) -> str:
    return f"shards/{k}"


class RemotePaths(NamedTuple):
    targets: str
    anchors: str
    report: str


def remote_paths(k: int) -> RemotePaths:
    """Where shard k's files live in its branch."""
    prefix = shard_prefix(k)
    return RemotePaths(f"{prefix}/{TARGETS_FILE}", f"{prefix}/{ANCHORS_FILE}", f"{prefix}/{REPORT_FILE}")


PLAN_PATH = "coopt/plan.json"


ANCHORS_PATH = "coopt/anchors.parquet"


MANIFEST_PATH = "coopt/manifest.json"


TARGETS_PATH = "targets/train.safetensors"


DATA_DIR = "data"


# Everything under these folders on main belongs to the merged version and is replaced as a whole;
# the plan and anchors under coopt/ stay.
MERGED_FOLDERS = ("data/", "targets/")
