"""The files a participant publishes for its shard: targets and anchor outputs as safetensors.

Both files carry the same ShardHeader (JSON under the metadata key "coopt") with a sha256 of every
tensor in the pair, so a reader can tell a damaged file, and a targets file and an anchors file that
come from different runs, from a good pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from coopt_hub.errors import ShardFileError

TARGETS_FILE = "targets.safetensors"
ANCHORS_FILE = "anchors.safetensors"
REPORT_FILE = "report.json"
HEADER_KEY = "coopt"

# Tensor name -> stored dtype, per file.
_TARGET_TENSORS = {"ids": np.int64, "raw": np.float16, "aligned": np.float16}
_ANCHOR_TENSORS = {"ids": np.int64, "features": np.float32, "projected": np.float32}
_REFRESH_HINT = ("Run `coopt-hub optimize` for this shard again (finished chunks are kept), "
                 "or download the branch again.")


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


@dataclass
class ShardHeader:
    shard: int
    plan_hash: str
    source_revision: str
    prior: dict
    preprocessing: dict
    fingerprint: str
    output_dim: int
    dim: int
    uniformity: float
    reference: dict | None  # {"shard", "branch", "commit", "fingerprint"} of the best prior; None: itself
    residual: float
    num_rows: int
    tool_version: str
    checksums: dict[str, str]  # "targets/raw" -> sha256 of the stored bytes; filled by write_shard

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShardHeader:
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"header fields differ: missing {sorted(names - set(data))}, "
                             f"unexpected {sorted(set(data) - names)}")
        return cls(**data)


@dataclass
class ShardResult:
    header: ShardHeader
    ids: np.ndarray  # int64 [N], sorted
    raw: np.ndarray  # fp16 [N, dim], W-projected prior outputs
    aligned: np.ndarray  # fp16 [N, dim], raw @ T


@dataclass
class AnchorOutputs:
    ids: np.ndarray  # int64 [A], sorted
    features: np.ndarray  # float32 [A, output_dim], L2-normalised prior outputs
    projected: np.ndarray  # float32 [A, dim]


def write_shard(directory: Path, result: ShardResult, anchors: AnchorOutputs) -> list[Path]:
    """Write targets.safetensors and anchors.safetensors into `directory`, each atomically.

    Fills `result.header.checksums`. Arrays are cast to the stored dtypes first, and the pair is
    checked exactly as read_shard checks it, so a file that would not read back is never written.
    """
    directory = Path(directory)
    targets = _cast(result, _TARGET_TENSORS)
    anchor_tensors = _cast(anchors, _ANCHOR_TENSORS)
    header = result.header
    targets_path, anchors_path = directory / TARGETS_FILE, directory / ANCHORS_FILE
    # The checksums are about to be computed from these very arrays; shapes and values need checking.
    _check_targets(f"{targets_path} (not written)", header, targets, verify=True, checksums=False)
    _check_anchors(f"{anchors_path} (not written)", header, anchor_tensors, verify=True, checksums=False)
    header.checksums = {
        **{f"targets/{name}": _sha256(array) for name, array in targets.items()},
        **{f"anchors/{name}": _sha256(array) for name, array in anchor_tensors.items()},
    }
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {HEADER_KEY: json.dumps(header.to_dict(), sort_keys=True)}
    _write_atomically(targets_path, targets, metadata)
    _write_atomically(anchors_path, anchor_tensors, metadata)
    return [targets_path, anchors_path]


def read_shard(directory: Path, verify: bool = True) -> tuple[ShardResult, AnchorOutputs]:
    """Read a shard's pair of files; ShardFileError names the file and the problem.

    Names, dtypes and shapes are always checked. `verify` also checks the checksums, that all values
    are finite and that ids are sorted and unique, which costs a pass over the data.
    """
    directory = Path(directory)
    targets_path, anchors_path = directory / TARGETS_FILE, directory / ANCHORS_FILE
    header, targets = _load(targets_path, _TARGET_TENSORS)
    anchors_header, anchor_tensors = _load(anchors_path, _ANCHOR_TENSORS)
    if json.dumps(anchors_header.to_dict(), sort_keys=True) != json.dumps(header.to_dict(), sort_keys=True):
        raise ShardFileError(
            f"{anchors_path} and {targets_path} carry different headers: they come from different runs.",
            hint=_REFRESH_HINT,
        )
    _check_targets(str(targets_path), header, targets, verify, checksums=verify)
    _check_anchors(str(anchors_path), header, anchor_tensors, verify, checksums=verify)
    return ShardResult(header=header, **targets), AnchorOutputs(**anchor_tensors)


def _cast(outputs: ShardResult | AnchorOutputs, dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    # Values beyond fp16 become inf here; the finiteness check then names the tensor.
    with np.errstate(over="ignore"):
        return {name: np.ascontiguousarray(getattr(outputs, name), dtype=dtype) for name, dtype in dtypes.items()}


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _write_atomically(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write next to `path`, flush to disk, then rename: readers see the old file or the new one."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _load(path: Path, dtypes: dict[str, type]) -> tuple[ShardHeader, dict[str, np.ndarray]]:
    if not path.is_file():
        raise ShardFileError(f"{path} is missing.", hint=_REFRESH_HINT)
    try:
        with safe_open(str(path), framework="numpy") as stored:
            metadata = stored.metadata() or {}
            names = set(stored.keys())
            missing = [name for name in dtypes if name not in names]
            if missing:
                raise ShardFileError(f"{path} lacks the tensor(s) {missing}.", hint=_REFRESH_HINT)
            tensors = {name: stored.get_tensor(name) for name in dtypes}
    except SafetensorError as err:
        raise ShardFileError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}",
                             hint=_REFRESH_HINT) from err
    if HEADER_KEY not in metadata:
        raise ShardFileError(f"{path} has no coopt header; it was not written by coopt-hub.", hint=_REFRESH_HINT)
    try:
        header = ShardHeader.from_dict(json.loads(metadata[HEADER_KEY]))
    except (ValueError, TypeError) as err:
        raise ShardFileError(f"{path} has an unreadable coopt header: {err}", hint=_REFRESH_HINT) from err
    for name, dtype in dtypes.items():
        if tensors[name].dtype != dtype:
            raise ShardFileError(f"{path}: tensor '{name}' is {tensors[name].dtype}, expected {np.dtype(dtype)}.",
                                 hint=_REFRESH_HINT)
    return header, tensors


def _check_targets(path: str, header: ShardHeader, tensors: dict[str, np.ndarray], verify: bool,
                   checksums: bool) -> None:
    rows = (header.num_rows,)
    _check_shape(path, "ids", tensors["ids"], rows, "num_rows in the header")
    for name in ("raw", "aligned"):
        _check_shape(path, name, tensors[name], (header.num_rows, header.dim), "[num_rows, dim] in the header")
    if verify:
        _check_contents(path, tensors, _checksums(header, "targets") if checksums else None)


def _check_anchors(path: str, header: ShardHeader, tensors: dict[str, np.ndarray], verify: bool,
                   checksums: bool) -> None:
    count = tensors["ids"].shape[0] if tensors["ids"].ndim == 1 else -1
    _check_shape(path, "ids", tensors["ids"], (count,), "a 1-D id list")
    _check_shape(path, "features", tensors["features"], (count, header.output_dim), "[anchors, output_dim]")
    _check_shape(path, "projected", tensors["projected"], (count, header.dim), "[anchors, dim]")
    if verify:
        _check_contents(path, tensors, _checksums(header, "anchors") if checksums else None)


def _check_shape(path: str, name: str, array: np.ndarray, expected: tuple[int, ...], meaning: str) -> None:
    if array.shape != expected:
        raise ShardFileError(f"{path}: tensor '{name}' has shape {list(array.shape)}, expected {list(expected)} "
                             f"({meaning}).", hint=_REFRESH_HINT)


def _checksums(header: ShardHeader, group: str) -> dict[str, str]:
    return {key.split("/", 1)[1]: value for key, value in header.checksums.items() if key.startswith(f"{group}/")}


def _check_contents(path: str, tensors: dict[str, np.ndarray], checksums: dict[str, str] | None) -> None:
    for name, array in tensors.items():
        if checksums is not None and name not in checksums:
            raise ShardFileError(f"{path}: the header has no checksum for tensor '{name}'.", hint=_REFRESH_HINT)
        if checksums is not None and _sha256(array) != checksums[name]:
            raise ShardFileError(f"{path}: tensor '{name}' does not match its checksum (the file is damaged).",
                                 hint=_REFRESH_HINT)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ShardFileError(f"{path}: tensor '{name}' holds NaN or infinite values.",
                                 hint="Check the prior's outputs (precision fp32 avoids fp16 overflow), then rerun.")
    ids = tensors["ids"]
    if ids.size and (ids[0] < 0 or np.any(np.diff(ids) <= 0)):
        raise ShardFileError(f"{path}: ids are not sorted, unique and non-negative.", hint=_REFRESH_HINT)
