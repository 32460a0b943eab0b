"""A participant's work directory: one run directory per (plan, prior, settings), its result laid
out as in the branch, and a pointer to the newest finished run of each shard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coopt_hub.core.files import write_text_atomically
from coopt_hub.core.layout import (
    ANCHORS_FILE,
    REPORT_FILE,
    TARGETS_FILE,
    remote_paths,
    shard_branch,
    shard_prefix,
)
from coopt_hub.core.plan import Plan
from coopt_hub.participant.decode import decode_path
from coopt_hub.priors import Prior

LATEST_FILE = "latest"


def shard_workdir(workdir: Path, repo: str, shard: int) -> Path:
    return Path(workdir) / repo.replace("/", "--") / f"shard-{shard:05d}"


def prior_key(prior: Prior) -> str:
    """What fixes a prior's outputs: its weights (fingerprint), its preprocessing, its precision, and
    whether it is compiled (fused kernels round differently) and decodes on the GPU (resamples differently)."""
    settings = {"fingerprint": prior.fingerprint, "preprocessing": prior.preprocessing.to_dict(),
                "precision": prior.precision}
    # Only when set, so that the runs made before these settings existed keep their directories.
    if prior.compiled:
        settings["compiled"] = True
    if decode_path(prior) == "gpu":
        settings["decode"] = "gpu"
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def run_directory(workdir: Path, repo: str, shard: int, plan: Plan, prior: Prior) -> Path:
    name = f"{plan.plan_hash[:16]}-{prior.fingerprint[:12]}-{prior_key(prior)[:8]}"
    return shard_workdir(workdir, repo, shard) / name


def result_directory(run_dir: Path) -> Path:
    """Mirrors the branch: the files sit under shards/{k}/ inside it."""
    return run_dir / "result"


def mark_latest(workdir: Path, repo: str, shard: int, run_dir: Path) -> None:
    """Make `run_dir`, whose result is complete, the one `latest_result` finds."""
    write_text_atomically(shard_workdir(workdir, repo, shard) / LATEST_FILE, run_dir.name + "\n")


def latest_result(workdir: Path, repo: str, shard: int) -> Path | None:
    """The result directory of the newest finished run of this shard, if any."""
    pointer = shard_workdir(workdir, repo, shard) / LATEST_FILE
    try:
        run_name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    directory = result_directory(pointer.parent / run_name)
    return directory if (directory / remote_paths(shard).report).is_file() else None


@dataclass
class OptimizeResult:
    repo: str
    shard: int
    directory: Path  # holds shards/{k}/ with the three files, as they are laid out in the branch
    report: dict[str, Any]
    commit: str | None = None  # the branch head holding this result, when pushed
    pushed: bool = False  # a new commit was made (False: the branch already held this result)
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        prefix = self.directory / shard_prefix(self.shard)
        return [prefix / TARGETS_FILE, prefix / ANCHORS_FILE, prefix / REPORT_FILE]

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "shard": self.shard,
            "branch": shard_branch(self.shard),
            "directory": str(self.directory),
            "files": [str(path) for path in self.files],
            "commit": self.commit,
            "pushed": self.pushed,
            "notes": self.notes,
            "report": self.report,
        }
