"""The files a participant publishes for its shard: targets and anchor outputs as safetensors.

Both files carry the same ShardHeader (JSON under the metadata key "coopt") with a sha256 of every
tensor in the pair, so a reader can tell a damaged file, and a targets file and an anchors file that
come from different runs, from a good pair.

The files are read with plain reads at the byte ranges the safetensors header gives (8-byte
little-endian header length, the JSON header, then the tensors' bytes), so the targets can be read
in row ranges with every check still made: a merge holds one range of a shard, not the shard.

Versions: a header records its `schema_version` (SCHEMA_VERSION for new files); a header without
one is version 1 (coopt-hub 0.1.0) and still reads, with the meaning it had then. Version 2 adds
the alignment fit chosen by cross-validation, V both in the common space (`uniformity`, the figure
priors are ranked by) and native (`uniformity_native`), and the projection; a shard with the "pca"
projection stores its PCA basis in its anchors file, as tensors basis.{mean,scale,components,explained}
with checksums like the others. Version 3 adds the precision the prior ran in and, below fp32, how far
its outputs were from an fp32 forward on the anchors.

A header is untrusted input: every reader gets it through header_from_metadata, which checks it
against the schema below before anything uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from safetensors.numpy import save_file

from coopt_hub.core.align import METHODS, PcaBasis
from coopt_hub.core.files import atomic_path, read_at
from coopt_hub.core.layout import ANCHORS_FILE, TARGETS_FILE
from coopt_hub.core.plan import PROJECTIONS, Plan
from coopt_hub.errors import ShardFileError

HEADER_KEY = "coopt"
SCHEMA_VERSION = 3
# What a header of an earlier version lacks, as that version meant it. Before version 3: the prior ran
# in fp32. Version 1 (no schema version recorded): native V as `uniformity` (uniformity_native None:
# the same value), the plan's random W, the one-shot ridge of core/align.fit_alignment (no record of
# the fit); and headers older still, no skipped images.
_V2_DEFAULTS = {"precision": "fp32", "precision_deviation": None}
_V1_DEFAULTS = {**_V2_DEFAULTS, "schema_version": 1, "alignment": None, "uniformity_native": None,
                "projection": "random", "skipped_ids": []}

# Tensor name -> stored dtype, per file.
_TARGET_TENSORS = {"ids": np.int64, "raw": np.float16, "aligned": np.float16}
_ANCHOR_TENSORS = {"ids": np.int64, "features": np.float32, "projected": np.float32}
# A "pca" shard's basis (PcaBasis.arrays()) in its anchors file, each as basis.{name}.
_BASIS_TENSORS = {f"basis.{name}": np.float32 for name in ("mean", "scale", "components", "explained")}
# safetensors' dtype names, for the stored tensors and for naming what a wrong file holds instead.
_SAFETENSORS_DTYPES = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_, "F64": np.float64, "F32": np.float32, "F16": np.float16}
# Rows per range when a caller does not say: 64 MiB per fp16 tensor at 512 dimensions.
CHUNK_ROWS = 65536
_REFRESH_HINT = ("Run `coopt-hub optimize` for this shard again (finished chunks are kept), "
                 "or download the branch again.")


# Header schema -----------------------------------------------------------------------------------
# A header is written by a participant the platform does not control: every field is checked for
# type, range and size before anything uses it, so that no header can crash a reader (TypeError,
# OverflowError, RecursionError), take its memory, or carry markdown or HTML into a card.

# The coopt header's JSON; a skipped id takes at most 20 bytes, so this leaves room for ~200k of them.
MAX_COOPT_HEADER_BYTES = 1 << 22
# A shard file's whole safetensors header: the coopt header as an escaped JSON string, and the tensors.
MAX_FILE_HEADER_BYTES = 2 * MAX_COOPT_HEADER_BYTES + (1 << 16)
# Deepest nesting of lists and objects: alignment -> candidates -> [i] -> params is 5 levels.
MAX_JSON_DEPTH = 8
MAX_SHARDS = 1 << 20
MAX_ROWS = 1 << 48
MAX_DIM = 1 << 20
# A prior's input side in pixels: 4x today's largest (~518); verify builds the declared model at this
# size, and a ViT's memory grows with its square.
MAX_IMAGE_SIZE = 2048
MAX_SKIPPED_IDS = 200_000
MAX_FIGURE = 1e6  # |V|, residuals, cosines: far beyond any real value, and far below float overflow
# Names the tool writes (fingerprint, tool version, branch, checkpoint file name): these characters only,
# so that such a name shows as itself in a markdown table, in HTML and in a commit title.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}")
MAX_CHOSEN_NAME = 200  # characters of a name a person chooses (a prior's model, its pretrained tag)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,199}")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._@+=-]")
_HEX = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_CHECKSUM_KEY = re.compile(r"(targets|anchors)/[a-z]+(\.[a-z]+)?")
# What plain_text keeps; everything else becomes "?". No markdown or HTML syntax can be made of these.
_UNSAFE_TEXT = re.compile(r"[^A-Za-z0-9 ._:/@+=,()-]")
_LOCAL_DIR = "local-dir:"  # priors.spec.LOCAL_DIR_PREFIX: a model named by a folder on the participant's machine

PRECISIONS = ("fp32", "bf16", "fp16")
# The most a reduced-precision prior's anchor outputs may differ from an fp32 forward (cosine distance,
# max over the anchors): bf16 keeps 8 bits of mantissa (relative error ~0.4% per value), fp16 10.
PRECISION_TOLERANCE = {"bf16": 0.02, "fp16": 0.02}


class HeaderError(ValueError):
    """A header field that breaks the schema; the message names the field."""


def plain_text(value: object, limit: int = 120) -> str:
    """`value` as text that means the same in markdown, HTML and a commit title: characters beyond
    letters, digits, space and ._:/@+=,()- become "?", and text beyond `limit` is cut at "...".
    The one way participant-controlled text reaches a card, a commit title or a PR text."""
    text = _UNSAFE_TEXT.sub("?", str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_name(path: str) -> str:
    """The last part of a path, of either separator: all of a local path that may leave its machine."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


def public_prior(prior: dict) -> dict:
    """A prior record without the participant's local paths: a checkpoint and a `local-dir:` model by
    file name (the weights are identified by the header's fingerprint)."""
    public = dict(prior)
    if isinstance(public.get("checkpoint"), str):
        public["checkpoint"] = _UNSAFE_NAME.sub("_", file_name(public["checkpoint"]))
    model = public.get("model")
    if isinstance(model, str) and _LOCAL_DIR in model:
        head, _, folder = model.partition(_LOCAL_DIR)
        public["model"] = f"{head}{_LOCAL_DIR}{file_name(folder)}"
    return public


def parse_json(raw: bytes | str, what: str, limit: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON of at most `limit` bytes and `max_depth` levels, checked before json.loads, whose
    recursion a deeply nested document would exhaust. HeaderError names `what` otherwise."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    _check_size(len(data), what, limit)
    depth = _json_depth(data)
    if depth > max_depth:
        raise HeaderError(f"{what} nests {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise HeaderError(f"{what} is not valid JSON ({err})") from err


def parse_json_file(path: Path, what: str, limit: int, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """parse_json of a file's content, refused by its size before any of it is read into memory."""
    _check_size(path.stat().st_size, what, limit)
    return parse_json(path.read_bytes(), what, limit, max_depth=max_depth)


def _check_size(size: int, what: str, limit: int) -> None:
    if size > limit:
        raise HeaderError(f"{what} takes {size} bytes, more than the {limit} allowed")


# +1 for [ and {, -1 for ] and }, by byte value.
_NESTING = np.zeros(256, dtype=np.int8)
_NESTING[list(b"[{")] = 1
_NESTING[list(b"]}")] = -1
# Bytes scanned at a time: the scan holds a few int64 copies of a slice, never of the whole document.
_DEPTH_SLICE = 1 << 20


def _json_depth(data: bytes) -> int:
    """The deepest nesting of [ and { outside strings (an upper bound on invalid JSON, which fails later).

    Escaped backslashes, then escaped quotes, are dropped first, so every quote left opens or closes a
    string. No regular expression: matching `"(?:[^"\\]|\\.)*"` took 7.5 GiB and 10 s on one 60 MiB string."""
    plain = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    deepest = level = quotes = 0
    for start in range(0, plain.size, _DEPTH_SLICE):
        part = plain[start:start + _DEPTH_SLICE]
        seen = np.cumsum(part == ord('"'), dtype=np.int64) + quotes
        levels = np.cumsum(np.where(seen % 2 == 1, 0, _NESTING[part]), dtype=np.int64) + level
        deepest, level, quotes = max(deepest, int(levels.max())), int(levels[-1]), int(seen[-1])
    return deepest


# Field checkers: each takes (value, field name) and raises HeaderError naming the field.
def _int(low: int, high: int):
    def check(value, name):
        if type(value) is not int:
            raise HeaderError(f"{name} is {_kind(value)}, not an integer")
        if not low <= value <= high:
            raise HeaderError(f"{name} is {_short(value)}, outside {low}..{high}")
    return check


def _float(low: float = -MAX_FIGURE, high: float = MAX_FIGURE):
    def check(value, name):
        if type(value) not in (int, float):
            raise HeaderError(f"{name} is {_kind(value)}, not a number")
        # A huge int is compared as an int: float() of it would overflow.
        if (type(value) is float and not math.isfinite(value)) or not low <= value <= high:
            raise HeaderError(f"{name} is {_short(value)}, not a finite number in {low:g}..{high:g}")
    return check


def _text(pattern: re.Pattern, meaning: str):
    def check(value, name):
        if type(value) is not str:
            raise HeaderError(f"{name} is {_kind(value)}, not a string")
        if not pattern.fullmatch(value):
            raise HeaderError(f"{name} {_short(value)!r} is not {meaning}")
    return check


def _choice(options: tuple[str, ...]):
    def check(value, name):
        if type(value) is not str or value not in options:
            raise HeaderError(f"{name} is {_short(value)!r}, not one of {', '.join(options)}")
    return check


def _optional(inner):
    def check(value, name):
        if value is not None:
            inner(value, name)
    return check


def _list(item, low: int, high: int, meaning: str = "a list"):
    def check(value, name):
        if type(value) is not list:
            raise HeaderError(f"{name} is {_kind(value)}, not {meaning}")
        if not low <= len(value) <= high:
            raise HeaderError(f"{name} holds {len(value)} items, not {low}..{high}")
        for i, element in enumerate(value):
            try:
                item(element, f"{name}[{i}]")
            except HeaderError as err:
                raise HeaderError(f"{name} is not {meaning}: {err}") from None
    return check


def _record(required: dict, optional: dict | None = None):
    """A JSON object with exactly the `required` keys and any of the `optional` ones, each checked."""
    optional = optional or {}

    def check(value, name):
        if type(value) is not dict:
            raise HeaderError(f"{name} is {_kind(value)}, not an object")
        missing = sorted(set(required) - set(value))
        unknown = sorted(map(str, set(value) - set(required) - set(optional)))
        if missing or unknown:
            raise HeaderError(f"{name or 'the header'} " + "; ".join(
                [*([f"lacks {', '.join(missing)}"] if missing else []),
                 *([f"has unknown keys {_short(', '.join(unknown))}"] if unknown else [])]))
        for key, item in {**required, **optional}.items():
            if key in value:
                item(value[key], f"{name}.{key}" if name else key)
    return check


def _map(key: re.Pattern, item, high: int):
    def check(value, name):
        if type(value) is not dict:
            raise HeaderError(f"{name} is {_kind(value)}, not an object")
        if len(value) > high:
            raise HeaderError(f"{name} holds {len(value)} entries, more than {high}")
        for k, v in value.items():
            if not key.fullmatch(k):
                raise HeaderError(f"{name} has the unexpected key {_short(k)!r}")
            item(v, f"{name}.{k}")
    return check


def _kind(value) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _short(value, limit: int = 40) -> str:
    """A value as an error message shows it: cut, and with only safe characters."""
    if type(value) is int and abs(value) >= 10**limit:
        return f"an integer of {value.bit_length()} bits"
    return plain_text(value, limit)


_WORD = re.compile(r"[a-z][a-z0-9_]{0,31}")
_HEX_TEXT = _text(_HEX, "a 40- or 64-digit lowercase hex digest")
_NAME_TEXT = _text(_NAME, "a name of at most 200 letters, digits and ._:/@+=-")


def _chosen_text(value, name):
    """A name a person chooses (a prior's model and pretrained tag): any printable text (no line
    breaks, control or bidirectional-override characters), shown through plain_text in cards and
    titles and escaped in the web view."""
    if type(value) is not str:
        raise HeaderError(f"{name} is {_kind(value)}, not a string")
    if not (1 <= len(value) <= MAX_CHOSEN_NAME and value.isprintable()):
        raise HeaderError(f"{name} {_short(value)!r} is not 1 to {MAX_CHOSEN_NAME} printable characters")


_FIGURE = _float()
_PARAMS = _map(_WORD, _float(0, 1e12), 8)
_CANDIDATE = _record({"method": _choice(METHODS), "params": _PARAMS, "cv_residual": _FIGURE, "cv_cosine": _FIGURE})
_HEADER_FIELDS = {
    "shard": _int(0, MAX_SHARDS),
    "plan_hash": _HEX_TEXT,
    "source_revision": _HEX_TEXT,
    "prior": _record({"model": _chosen_text}, {
        "pretrained": _optional(_chosen_text), "checkpoint": _optional(_text(_FILE_NAME, "a file name")),
        "seed": _int(0, 2**63 - 1), "image_size": _optional(_int(1, MAX_IMAGE_SIZE))}),
    "preprocessing": _record({}, {
        "image_size": _list(_int(1, MAX_IMAGE_SIZE), 2, 2), "mean": _list(_FIGURE, 1, 4), "std": _list(_FIGURE, 1, 4),
        "interpolation": _text(_WORD, "a method name"), "resize_mode": _text(_WORD, "a mode name"),
        "fill_color": _int(0, 255), "crop_pct": _float(1e-6, 1.0)}),
    "fingerprint": _NAME_TEXT,
    "output_dim": _int(1, MAX_DIM),
    "dim": _int(1, MAX_DIM),
    "uniformity": _FIGURE,
    "reference": _optional(_record({"shard": _int(0, MAX_SHARDS), "branch": _NAME_TEXT, "commit": _HEX_TEXT,
                                    "fingerprint": _NAME_TEXT})),
    "residual": _float(0, MAX_FIGURE),
    "num_rows": _int(0, MAX_ROWS),
    "tool_version": _NAME_TEXT,
    "checksums": _map(_CHECKSUM_KEY, _HEX_TEXT, 16),
    "skipped_ids": _list(_int(0, MAX_ROWS), 0, MAX_SKIPPED_IDS, "a list of integers (sample ids)"),
    "schema_version": _int(1, SCHEMA_VERSION),
    "alignment": _optional(_record(
        {"method": _choice(METHODS), "params": _PARAMS, "residual": _FIGURE, "cv_residual": _FIGURE,
         "cv_cosine": _FIGURE, "anchors": _int(0, MAX_ROWS), "folds": _int(1, 1000), "seed": _int(0, 2**63 - 1),
         "candidates": _list(_CANDIDATE, 0, 16)})),
    "uniformity_native": _optional(_FIGURE),  # None: the same as uniformity
    "projection": _choice(PROJECTIONS),
    "precision": _choice(PRECISIONS),
    "precision_deviation": _optional(_record({
        "max_cosine_distance": _float(0, 2), "mean_cosine_distance": _float(0, 2), "anchors": _int(1, MAX_ROWS)})),
}
_CHECK_HEADER = _record(_HEADER_FIELDS)


@dataclass
class ShardHeader:
    """What a shard's files hold and how they were made. Built without the fields of versions 2 and
    3 (the defaults), a header describes a version 1 shard."""

    shard: int
    plan_hash: str
    source_revision: str
    prior: dict
    preprocessing: dict
    fingerprint: str
    output_dim: int
    dim: int
    uniformity: float  # V on the anchors in the common space (version 1: of the native outputs)
    reference: dict | None  # {"shard", "branch", "commit", "fingerprint"} of the best prior; None: itself
    residual: float  # relative residual of the alignment on the anchors it was fitted on (in-sample)
    num_rows: int  # rows stored: the plan's shard rows less the skipped ones
    tool_version: str
    checksums: dict[str, str]  # "targets/raw" -> sha256 of the stored bytes; filled by write_shard
    # Shard ids whose image could not be decoded (optimize --on-bad-image skip), sorted; they have no row.
    skipped_ids: list[int] = field(default_factory=list)
    schema_version: int = 1
    # AlignmentFit.to_dict() of the fit to the reference (method, params, residual, cv_residual,
    # cv_cosine, folds, seed, ...); None when the shard is its own reference, or in version 1.
    alignment: dict | None = None
    uniformity_native: float | None = None  # V of the native outputs; None when built: the same as uniformity
    projection: str = "random"  # one of PROJECTIONS
    precision: str = "fp32"  # what the prior's forward pass computed in, one of PRECISIONS
    # Below fp32: {"max_cosine_distance", "mean_cosine_distance", "anchors"} of its outputs against an
    # fp32 forward on the anchors; None for fp32.
    precision_deviation: dict | None = None

    def __post_init__(self) -> None:
        """Local paths leave the prior record (file names stay), then the whole header is checked:
        a header that would not read back is never built."""
        if self.uniformity_native is None:
            self.uniformity_native = self.uniformity
        if type(self.prior) is dict:
            self.prior = public_prior(self.prior)
        try:
            written = json.loads(json.dumps(self.to_dict()))  # checked as it will be read: tuples are lists
        except (TypeError, ValueError) as err:
            raise HeaderError(f"the header cannot be written as JSON ({err})") from err
        check_header(written)

    @property
    def cv_residual(self) -> float | None:
        """The held-out residual of the alignment (None: its own reference, or a version 1 shard)."""
        return None if self.alignment is None else self.alignment.get("cv_residual")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ShardHeader:
        """The header of a JSON object of any version; HeaderError names the first field that breaks the schema."""
        data = _with_defaults(data)
        if type(data.get("prior")) is dict:
            data["prior"] = public_prior(data["prior"])  # headers of earlier releases kept the local path
        check_header(data)
        return cls(**data)


def check_header(data: dict) -> None:
    """Every field of a header (as a dict, of this version) checked for type, range and size, and
    the fields against each other; HeaderError names the first that fails."""
    _CHECK_HEADER(data, "")
    problem = _version_problem(data) or _prior_problem(data["prior"]) or _skipped_ids_problem(data["skipped_ids"])
    if data["precision"] == "fp32" and data["precision_deviation"] is not None:
        problem = "precision_deviation is recorded for an fp32 shard, which has none"
    if problem:
        raise HeaderError(problem)


def _with_defaults(data: Any) -> dict:
    """A header of an earlier version with the fields it lacks, as that version meant them."""
    if type(data) is not dict:
        raise HeaderError(f"the header is {_kind(data)}, not an object")
    version = data.get("schema_version", 1)
    if type(version) is not int or version < 1:
        raise HeaderError(f"schema_version {_short(version)} is not a version number")
    if version > SCHEMA_VERSION:
        raise HeaderError(f"schema_version {version}: written by a newer coopt-hub (this one reads up to "
                          f"{SCHEMA_VERSION}); upgrade coopt-hub")
    defaults = _V1_DEFAULTS if version == 1 else _V2_DEFAULTS if version == 2 else {}
    return {**defaults, **data}


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
    basis: PcaBasis | None = None  # the shard's own projection, when the plan's is "pca"


def project(plan: Plan, basis: PcaBasis | None, features: np.ndarray) -> np.ndarray:
    """Prior outputs through a shard's projection to the common size, float32: with the plan's "pca"
    projection the shard's own basis (stored with its anchors), else the plan's random W. What raw
    targets and projected anchors are."""
    if plan.projection_kind == "pca":
        if basis is None:
            raise ShardFileError("The plan's projection is pca, but the shard has no PCA basis.", hint=_REFRESH_HINT)
        return basis.project(features)
    features = np.asarray(features, dtype=np.float32)
    return features @ plan.projection(features.shape[1])


def write_shard(directory: Path, result: ShardResult, anchors: AnchorOutputs) -> list[Path]:
    """Write targets.safetensors and anchors.safetensors into `directory`, each atomically.

    Fills `result.header.checksums`. Arrays are cast to the stored dtypes first, and the pair is
    checked exactly as read_shard checks it, so a file that would not read back is never written.
    """
    directory = Path(directory)
    targets = _cast(result, _TARGET_TENSORS)
    anchor_tensors = {**_cast(anchors, _ANCHOR_TENSORS), **_basis_arrays(anchors.basis)}
    header = result.header
    targets_path, anchors_path = directory / TARGETS_FILE, directory / ANCHORS_FILE
    # The checksums are about to be computed from these very arrays; shapes and values need checking.
    for path, check_shapes, tensors in ((targets_path, _check_target_shapes, targets),
                                        (anchors_path, _check_anchor_shapes, anchor_tensors)):
        where = f"{path} (not written)"
        check_shapes(where, header, {name: array.shape for name, array in tensors.items()})
        _check_values(where, tensors)
    _check_skipped(f"{targets_path} (not written)", header, targets["ids"])
    header.checksums = {
        **{f"targets/{name}": tensor_sha256(array) for name, array in targets.items()},
        **{f"anchors/{name}": tensor_sha256(array) for name, array in anchor_tensors.items()},
    }
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {HEADER_KEY: json.dumps(header.to_dict(), sort_keys=True)}
    for path, tensors in ((targets_path, targets), (anchors_path, anchor_tensors)):
        with atomic_path(path) as temp:
            save_file(tensors, temp, metadata=metadata)
    return [targets_path, anchors_path]


def read_shard(directory: Path, verify: bool = True) -> tuple[ShardResult, AnchorOutputs]:
    """Read a shard's pair of files whole; ShardFileError names the file and the problem.

    Names, dtypes and shapes are always checked. `verify` also checks the checksums, that all values
    are finite and that ids are sorted and unique, which costs a pass over the data. Holds the whole
    shard in memory: ShardReader reads it in row ranges.
    """
    with ShardReader(directory, verify=verify) as shard:
        # One range of every row; unpacking runs the iteration to its end, where the checksums are compared.
        (rows,) = shard.chunks(rows=max(shard.num_rows, 1))
        return ShardResult(shard.header, rows.ids, rows.raw, rows.aligned), shard.anchors


@dataclass(frozen=True)
class ShardRows:
    """Rows start .. start + len(ids) - 1 of a shard's targets."""

    start: int
    ids: np.ndarray  # int64
    raw: np.ndarray  # fp16 [rows, dim]
    aligned: np.ndarray | None  # fp16 [rows, dim]; None when the reader was asked to leave it (chunks)


@dataclass(frozen=True)
class RemoteFile:
    """A targets file read where it lies rather than from `directory`: `open()` gives a seekable
    binary file (a Hub file read by range requests), `name` says where it is in messages."""

    name: str
    open: Callable[[], BinaryIO]


class ShardReader:
    """A shard's pair of files, open, with read_shard's checks and the targets read in row ranges.

    Opening reads both headers and the (small) anchors file, and checks all that does not need the
    targets' values: tensor names, dtypes and shapes against the header, that the pair's headers
    agree, and with `verify` the anchors' checksums and values and that the header has a checksum
    for every target tensor. `chunks` then reads the targets and checks their values as they pass.

        with ShardReader(directory) as shard:
            for rows in shard.chunks(16384):
                ...  # keep nothing made from `rows` as good until the loop has ended
    """

    def __init__(self, directory: Path, verify: bool = True, targets: RemoteFile | None = None):
        directory = Path(directory)
        self.verify = verify
        self.anchors_path = directory / ANCHORS_FILE
        if targets is None:
            self.targets_path: Path | str = directory / TARGETS_FILE
            self._targets, self.header = _open(self.targets_path, _TARGET_TENSORS)
        else:
            self.targets_path = targets.name
            self._targets, self.header = _open_file(targets.name, targets.open(), _TARGET_TENSORS)
        try:
            self.anchors = self._read_anchors()
        except BaseException:
            self._targets.close()
            raise
        self.num_rows = self._targets.tensors["ids"].shape[0]

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._targets.close()

    def _read_anchors(self) -> AnchorOutputs:
        stored, header = _open(self.anchors_path, _ANCHOR_TENSORS)
        with stored:
            if json.dumps(header.to_dict(), sort_keys=True) != json.dumps(self.header.to_dict(), sort_keys=True):
                raise ShardFileError(
                    f"{self.anchors_path} and {self.targets_path} carry different headers: they come from "
                    "different runs.",
                    hint=_REFRESH_HINT,
                )
            _check_target_shapes(str(self.targets_path), self.header, self._targets.shapes(_TARGET_TENSORS))
            tensors = _read_anchor_tensors(stored, self.header)
        if self.verify:
            _check_checksums(str(self.anchors_path), self.header, "anchors",
                             {name: tensor_sha256(array) for name, array in tensors.items()})
            _check_values(str(self.anchors_path), tensors)
            # Before the targets are read, not after: a file that cannot pass is refused at no cost.
            _check_checksums(str(self.targets_path), self.header, "targets", dict.fromkeys(_TARGET_TENSORS))
        return _anchor_outputs(tensors)

    def chunks(self, rows: int = CHUNK_ROWS, aligned: bool = True) -> Iterator[ShardRows]:
        """The targets in consecutive ranges of `rows` rows (an empty shard gives one empty range);
        without `aligned`, the aligned tensor is neither read nor checked (for a caller that makes
        its own, as a merge re-aligning the shard does) and ShardRows.aligned is None.

        With `verify`, each range is checked for NaN/inf and for ids that keep rising across ranges,
        and each tensor's sha256 is fed as the ranges pass; the checksums are compared after the
        last range, so the ShardFileError of a damaged file comes at the end of the iteration. A
        range that fails a check is not yielded, nor any after it, but the rest of the file is
        still hashed before the error is raised: a damaged file is reported as damaged, not by
        whichever bad value the damage made.
        """
        if rows < 1:
            raise ValueError(f"A range holds at least one row, got {rows}.")
        path = str(self.targets_path)
        names = [name for name in _TARGET_TENSORS if aligned or name != "aligned"]
        digests = {name: hashlib.sha256() for name in names}
        problem: ShardFileError | None = None
        last_id = -1  # ids must be non-negative and rise from one range to the next
        for start in range(0, max(self.num_rows, 1), rows):
            stop = min(start + rows, self.num_rows)
            tensors = {name: self._targets.read(name, start, stop) for name in names}
            if self.verify:
                for name, array in tensors.items():
                    digests[name].update(array.reshape(-1).view(np.uint8))
                if problem is None:
                    try:
                        _check_values(path, tensors, after=last_id)
                        _check_skipped(path, self.header, tensors["ids"])
                    except ShardFileError as err:
                        problem = err
                    if stop > start:
                        last_id = int(tensors["ids"][-1])
            if problem is None:
                yield ShardRows(start, **{"aligned": None, **tensors})
        if self.verify:
            _check_checksums(path, self.header, "targets", {name: d.hexdigest() for name, d in digests.items()})
        if problem is not None:
            raise problem

    def mapped(self) -> ShardResult:
        """The whole targets as read-only memory maps, for a caller that needs rows at random.

        Checked only as far as `chunks` checked them: run it to its end (with `verify`) first. The
        mapped pages count as this process's memory while the maps live, so drop them when done.
        """
        return ShardResult(self.header, **{name: self._targets.map(name) for name in _TARGET_TENSORS})


def _cast(outputs: ShardResult | AnchorOutputs, dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    # Values beyond fp16 become inf here; the finiteness check then names the tensor.
    with np.errstate(over="ignore"):
        return {name: np.ascontiguousarray(getattr(outputs, name), dtype=dtype) for name, dtype in dtypes.items()}


def tensor_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


# Reading safetensors -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoredTensor:
    dtype: str  # safetensors' name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # of its bytes, counted from the end of the header


class _SafetensorsFile:
    """One safetensors file, open, read with plain reads: a memory map's pages would count as this
    process's memory for as long as the map lives, and a shard's targets are the bulk of a merge."""

    def __init__(self, path: Path | str, file: BinaryIO):
        """`file`, open for reading and seekable, is `path`'s content; this closes it."""
        self.path = path
        self._file = file
        try:
            self.metadata, self.tensors = self._parse_header()
        except ValueError as err:  # json's errors and UnicodeDecodeError are ValueErrors too
            self.close()
            raise ShardFileError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}",
                                 hint=_REFRESH_HINT) from err
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _parse_header(self) -> tuple[dict[str, str], dict[str, _StoredTensor]]:
        size = self._file.seek(0, os.SEEK_END)
        self._file.seek(0)
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes cannot hold the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_FILE_HEADER_BYTES):
            raise ValueError(f"a header of {length} bytes does not fit in the file's {size}")
        header = parse_json(self._file.read(length), "the safetensors header", MAX_FILE_HEADER_BYTES)
        metadata = _file_metadata(header)
        self._data_start = 8 + length
        data_bytes = size - self._data_start
        return metadata, {name: _stored_tensor(name, entry, data_bytes) for name, entry in header.items()}

    def shapes(self, names) -> dict[str, tuple[int, ...]]:
        return {name: self.tensors[name].shape for name in names}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start .. stop - 1 of tensor `name` (all of it by default), as a new array."""
        tensor = self.tensors[name]
        dtype = np.dtype(_SAFETENSORS_DTYPES[tensor.dtype])
        stop = tensor.shape[0] if stop is None else stop
        row_shape = tensor.shape[1:]
        out = np.empty((stop - start, *row_shape), dtype)
        self._file.seek(self._data_start + tensor.begin + start * math.prod(row_shape) * dtype.itemsize)
        if self._file.readinto(out.data) != out.nbytes:
            raise ShardFileError(f"{self.path} became shorter while it was read.", hint=_REFRESH_HINT)
        return out

    def map(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        return np.memmap(self.path, dtype=_SAFETENSORS_DTYPES[tensor.dtype], mode="r",
                         offset=self._data_start + tensor.begin, shape=tensor.shape)


def _stored_tensor(name: str, entry, data_bytes: int) -> _StoredTensor:
    """One tensor's header entry, checked as the safetensors library checks it before reading."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"tensor '{name}' has a malformed entry ({type(err).__name__}: {err})") from err
    if not all(isinstance(value, int) and value >= 0 for value in (*shape, begin, end)) or begin > end:
        raise ValueError(f"tensor '{name}' has a malformed shape or byte range")
    if end > data_bytes:
        raise ValueError(f"tensor '{name}' ends at data byte {end}, the file holds {data_bytes}")
    if dtype in _SAFETENSORS_DTYPES and end - begin != math.prod(shape) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize:
        raise ValueError(f"tensor '{name}' takes {end - begin} bytes, its shape {list(shape)} needs another size")
    return _StoredTensor(dtype, shape, begin)


def header_from_metadata(metadata: dict) -> ShardHeader:
    """The ShardHeader in a safetensors file's `__metadata__`, checked against the schema before any
    use; HeaderError (a ValueError) names the field that breaks it."""
    text = metadata.get(HEADER_KEY)
    if type(text) is not str:
        raise HeaderError(f"no coopt header under the metadata key {HEADER_KEY!r}")
    return ShardHeader.from_dict(parse_json(text, "the coopt header", MAX_COOPT_HEADER_BYTES))


def header_from_file_header(raw: bytes) -> ShardHeader:
    """The ShardHeader of a safetensors file from the JSON header at its start (the bytes after the
    8-byte length), read as header_from_metadata reads it; HeaderError otherwise."""
    metadata = _file_metadata(parse_json(raw, "the safetensors header", MAX_FILE_HEADER_BYTES))
    return header_from_metadata(metadata)


def _file_metadata(header: Any) -> dict[str, str]:
    """The `__metadata__` of a parsed safetensors header (removed from it); HeaderError when malformed."""
    if type(header) is not dict:
        raise HeaderError("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if type(metadata) is not dict or not all(type(value) is str for value in metadata.values()):
        raise HeaderError("the safetensors __metadata__ is not a map of strings")
    return metadata


def read_anchor_file(path: Path) -> tuple[ShardHeader, AnchorOutputs]:
    """One anchors file on its own (a reference shard's, say), with every check that needs no targets file."""
    path = Path(path)
    stored, header = _open(path, _ANCHOR_TENSORS)
    with stored:
        tensors = _read_anchor_tensors(stored, header)
    _check_checksums(str(path), header, "anchors", {name: tensor_sha256(array) for name, array in tensors.items()})
    _check_values(str(path), tensors)
    return header, _anchor_outputs(tensors)


def _anchor_dtypes(header: ShardHeader) -> dict[str, type]:
    return {**_ANCHOR_TENSORS, **(_BASIS_TENSORS if header.projection == "pca" else {})}


def _read_anchor_tensors(stored: _SafetensorsFile, header: ShardHeader) -> dict[str, np.ndarray]:
    """Every tensor of an open anchors file that its header calls for, once names, dtypes and shapes fit."""
    dtypes = _anchor_dtypes(header)
    _check_tensors(stored, dtypes)
    _check_anchor_shapes(str(stored.path), header, stored.shapes(dtypes))
    return {name: stored.read(name) for name in dtypes}


def _basis_arrays(basis: PcaBasis | None) -> dict[str, np.ndarray]:
    if basis is None:
        return {}
    return {f"basis.{name}": np.ascontiguousarray(array, dtype=np.float32) for name, array in basis.arrays().items()}


def _anchor_outputs(tensors: Mapping[str, np.ndarray]) -> AnchorOutputs:
    basis = None
    if "basis.mean" in tensors:
        basis = PcaBasis.from_arrays({name.removeprefix("basis."): tensors[name] for name in _BASIS_TENSORS})
    return AnchorOutputs(**{name: tensors[name] for name in _ANCHOR_TENSORS}, basis=basis)


def _open(path: Path, dtypes: dict[str, type]) -> tuple[_SafetensorsFile, ShardHeader]:
    """One of a shard's files, open, with its coopt header, once its tensors' names and dtypes are right."""
    if not path.is_file():
        raise ShardFileError(f"{path} is missing.", hint=_REFRESH_HINT)
    return _open_file(path, open(path, "rb"), dtypes)  # noqa: SIM115 - closed by the _SafetensorsFile


def _open_file(path: Path | str, file: BinaryIO, dtypes: dict[str, type]) -> tuple[_SafetensorsFile, ShardHeader]:
    """_open on a file already open (`path` names it in messages); closes it on any error."""
    stored = _SafetensorsFile(path, file)
    try:
        _check_present(stored, dtypes)
        if HEADER_KEY not in stored.metadata:
            raise ShardFileError(f"{path} has no coopt header; it was not written by coopt-hub.", hint=_REFRESH_HINT)
        try:
            header = header_from_metadata(stored.metadata)
        except ValueError as err:
            raise ShardFileError(f"{path} has an unreadable coopt header: {err}", hint=_REFRESH_HINT) from err
        _check_tensors(stored, dtypes)
    except BaseException:
        stored.close()
        raise
    return stored, header


def _check_present(stored: _SafetensorsFile, dtypes: dict[str, type]) -> None:
    missing = [name for name in dtypes if name not in stored.tensors]
    if missing:
        raise ShardFileError(f"{stored.path} lacks the tensor(s) {missing}.", hint=_REFRESH_HINT)


def _check_tensors(stored: _SafetensorsFile, dtypes: dict[str, type]) -> None:
    """The tensors of `dtypes` are in the file, each stored with its dtype."""
    _check_present(stored, dtypes)
    for name, dtype in dtypes.items():
        found = stored.tensors[name].dtype
        if _SAFETENSORS_DTYPES.get(found) is not dtype:
            shown = np.dtype(_SAFETENSORS_DTYPES[found]) if found in _SAFETENSORS_DTYPES else found
            raise ShardFileError(f"{stored.path}: tensor '{name}' is {shown}, expected {np.dtype(dtype)}.",
                                 hint=_REFRESH_HINT)


# Checks ------------------------------------------------------------------------------------------


def _check_target_shapes(path: str, header: ShardHeader, shapes: dict[str, tuple[int, ...]]) -> None:
    _check_shape(path, "ids", shapes["ids"], (header.num_rows,), "num_rows in the header")
    for name in ("raw", "aligned"):
        _check_shape(path, name, shapes[name], (header.num_rows, header.dim), "[num_rows, dim] in the header")


def _check_anchor_shapes(path: str, header: ShardHeader, shapes: dict[str, tuple[int, ...]]) -> None:
    count = shapes["ids"][0] if len(shapes["ids"]) == 1 else -1
    _check_shape(path, "ids", shapes["ids"], (count,), "a 1-D id list")
    _check_shape(path, "features", shapes["features"], (count, header.output_dim), "[anchors, output_dim]")
    _check_shape(path, "projected", shapes["projected"], (count, header.dim), "[anchors, dim]")
    basis = {name: shape for name, shape in shapes.items() if name in _BASIS_TENSORS}
    if header.projection != "pca":
        if basis:
            raise ShardFileError(f"{path} holds a PCA basis, but its header says the projection is "
                                 f"{header.projection!r}.", hint=_REFRESH_HINT)
        return
    expected = {"basis.mean": (header.output_dim,), "basis.scale": (header.output_dim,),
                "basis.components": (header.output_dim, header.dim), "basis.explained": (1,)}
    if set(basis) != set(expected):
        raise ShardFileError(f"{path}: a pca shard needs the PCA basis tensors {sorted(expected)}, "
                             f"it has {sorted(basis)}.", hint=_REFRESH_HINT)
    for name, shape in expected.items():
        _check_shape(path, name, basis[name], shape, "the PCA basis of [output_dim, dim] in the header")


def _check_shape(path: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...], meaning: str) -> None:
    if tuple(shape) != expected:
        raise ShardFileError(f"{path}: tensor '{name}' has shape {list(shape)}, expected {list(expected)} "
                             f"({meaning}).", hint=_REFRESH_HINT)


def _check_checksums(path: str, header: ShardHeader, group: str, digests: dict[str, str | None]) -> None:
    """Each tensor of `digests` has a checksum in the header under `group`, equal to its digest unless
    that is None (not computed yet)."""
    recorded = {key.split("/", 1)[1]: value for key, value in header.checksums.items()
                if key.startswith(f"{group}/")}
    for name, digest in digests.items():
        if name not in recorded:
            raise ShardFileError(f"{path}: the header has no checksum for tensor '{name}'.", hint=_REFRESH_HINT)
        if digest is not None and digest != recorded[name]:
            raise ShardFileError(f"{path}: tensor '{name}' does not match its checksum (the file is damaged).",
                                 hint=_REFRESH_HINT)


def _version_problem(header: dict) -> str | None:
    """What makes a schema-checked header's fields contradict its version, if anything."""
    if header["schema_version"] == 1 and (header["projection"] != "random" or header["alignment"] is not None):
        return "a version 1 header records no alignment fit and knows only the random projection"
    if header["alignment"] is not None and header["reference"] is None:
        return "alignment is not the record of a fit to a reference"
    return None


def _prior_problem(prior: dict) -> str | None:
    """What makes a schema-checked prior record one that priors.spec.PriorSpec refuses, if anything."""
    backend, colon, name = prior["model"].partition(":")
    if colon and backend.isidentifier() and not name:
        return f"prior.model {_short(prior['model'])!r} names a backend but no model"
    if prior.get("pretrained") and prior.get("checkpoint"):
        return "prior names both a pretrained tag and a checkpoint"
    return None


def _skipped_ids_problem(skipped) -> str | None:
    """What is wrong with a header's skipped_ids, if anything."""
    if not isinstance(skipped, list) or not all(type(i) is int for i in skipped):
        return "skipped_ids is not a list of integers"
    if any(i < 0 for i in skipped) or any(b <= a for a, b in zip(skipped, skipped[1:])):
        return "skipped_ids are not sorted, unique and non-negative"
    return None


def _check_skipped(path: str, header: ShardHeader, ids: np.ndarray) -> None:
    """The header's skipped ids are well formed and none of them has a row among `ids`."""
    problem = _skipped_ids_problem(header.skipped_ids)
    if problem is None and np.isin(ids, header.skipped_ids).any():
        problem = "some ids recorded as skipped have a row"
    if problem:
        raise ShardFileError(f"{path}: {problem}.", hint=_REFRESH_HINT)


def all_finite(array: np.ndarray) -> bool:
    """np.isfinite(array).all(), read from the bits of a float array: a value is NaN or infinite when
    its exponent bits are all set, that is when its bits less the sign reach those of infinity. One
    integer maximum, where isfinite made a boolean array first (float16: 0.27 ns a value against 1.28),
    a cache-sized block at a time into one scratch buffer: the bits less the sign of a whole range
    (16 MiB at 16,384 x 512 float16) were a fresh array, whose pages the kernel zeroed on first touch."""
    if array.dtype.kind != "f" or array.size == 0:
        return True
    bits = np.ascontiguousarray(array).reshape(-1).view(array.dtype.str.replace("f", "u"))  # same size and order
    width = 8 * array.dtype.itemsize
    exponent = {16: 5, 32: 8, 64: 11}[width]
    infinity = bits.dtype.type(((1 << exponent) - 1) << (width - 1 - exponent))
    magnitude_bits = bits.dtype.type((1 << (width - 1)) - 1)
    block = _FINITE_BLOCK_BYTES // bits.itemsize
    scratch = np.empty(min(block, bits.size), bits.dtype)
    for start in range(0, bits.size, block):
        part = bits[start:start + block]
        magnitude = np.bitwise_and(part, magnitude_bits, out=scratch[:part.size])
        if magnitude.max() >= infinity:
            return False
    return True


_FINITE_BLOCK_BYTES = 256 << 10


def _check_values(path: str, tensors: dict[str, np.ndarray], after: int = -1) -> None:
    """All floats finite; ids rising, each above `after` (the last id before these, when read in ranges)."""
    for name, array in tensors.items():
        if not all_finite(array):
            raise ShardFileError(f"{path}: tensor '{name}' holds NaN or infinite values.",
                                 hint="Check the prior's outputs (precision fp32 avoids fp16 overflow), then rerun.")
    ids = tensors["ids"]
    if ids.size and (ids[0] <= after or np.any(np.diff(ids) <= 0)):
        raise ShardFileError(f"{path}: ids are not sorted, unique and non-negative.", hint=_REFRESH_HINT)


def header_problems(plan: Plan, k: int, header: ShardHeader) -> list[str]:
    """What makes a shard's header unusable with this plan; empty when it fits."""
    problems = []
    if header.plan_hash != plan.plan_hash:
        problems.append(f"made for plan {header.plan_hash[:12]}, the plan on main is {plan.plan_hash[:12]}")
    if header.source_revision != plan.source_revision:
        problems.append(
            f"made from source commit {header.source_revision[:12]}, the plan pins {plan.source_revision[:12]}"
        )
    if header.shard != k:
        problems.append(f"holds shard {header.shard}, not shard {k}")
    if header.dim != plan.dim:
        problems.append(f"targets have {header.dim} dimensions, the plan says {plan.dim}")
    if header.projection != plan.projection_kind:
        problems.append(f"made with the {header.projection} projection, the plan says {plan.projection_kind}")
    if header.reference is not None and header.reference["shard"] >= plan.num_shards:
        problems.append(f"aligned to shard {header.reference['shard']}, the plan has {plan.num_shards}")
    shard_ids = plan.shard_ids(k)
    skipped = np.asarray(header.skipped_ids, dtype=np.int64)
    if not np.isin(skipped, shard_ids).all():
        problems.append(f"records skipped ids that are not shard {k}'s")
    elif header.num_rows != shard_ids.size - skipped.size:
        less = f" less the {skipped.size} it skipped" if skipped.size else ""
        problems.append(f"holds {header.num_rows} rows, the plan gives shard {k} {shard_ids.size}{less}")
    return problems


def expected_ids(plan: Plan, k: int, header: ShardHeader) -> np.ndarray:
    """The sample ids shard k's rows must have, sorted: the plan's, less those the header records as
    skipped. Both lists are sorted and unique (the plan's by construction, the header's checked as it
    was read), so nothing is sorted again: np.unique of 125,000 ids per shard and call was 1.6% of a
    1M-row merge's CPU samples."""
    return np.setdiff1d(plan.shard_ids(k), np.asarray(header.skipped_ids, dtype=np.int64), assume_unique=True)


class ExpectedIds:
    """expected_ids(plan, k, header) a range of the shard's rows at a time. For a plan by storage
    units, made from the shard's units and skipped ids as each range is asked for, so that a merge
    holds no array over all of a shard's rows; a plan that assigns single rows has its shards drawn
    from a permutation of every id, so their ids are made once, as expected_ids does.

    `skipped`: the header's skipped ids that are this shard's, sorted (None for a plan by rows)."""

    def __init__(self, plan: Plan, k: int, header: ShardHeader):
        self._all: np.ndarray | None = None
        self.skipped: np.ndarray | None = None
        if plan.granularity == "row":
            self._all = expected_ids(plan, k, header)
            return
        units = plan.shard_units(k)
        self._starts = np.array([u.start for u in units], dtype=np.int64)
        self._stops = np.array([u.stop for u in units], dtype=np.int64)
        skipped = np.asarray(header.skipped_ids, dtype=np.int64)
        unit = np.searchsorted(self._stops, skipped, side="right")
        own = unit < len(units)
        own[own] = skipped[own] >= self._starts[unit[own]]  # ids of other shards are not this one's to skip
        self.skipped = skipped[own]
        kept = self._stops - self._starts - np.bincount(unit[own], minlength=len(units))
        self._first_row = np.concatenate([[0], np.cumsum(kept)])  # the shard's row of each unit's first id

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The ids of the shard's rows start..stop-1, as expected_ids(...)[start:stop]: from each unit
        the range reaches, only the ids those rows can have (a unit's first row is its start id, and
        each skipped id shifts the rest by one)."""
        if self._all is not None:
            return self._all[start:stop]
        parts = []
        first = max(int(np.searchsorted(self._first_row, start, side="right")) - 1, 0)
        for u in range(first, self._starts.size):
            low, high = start - int(self._first_row[u]), stop - int(self._first_row[u])  # rows within the unit
            if high <= 0:
                break
            unit_start, unit_stop = int(self._starts[u]), int(self._stops[u])
            skipped = self.skipped[np.searchsorted(self.skipped, unit_start):np.searchsorted(self.skipped, unit_stop)]
            window = np.arange(unit_start + max(low, 0), min(unit_stop, unit_start + high + skipped.size), dtype=np.int64)
            kept = np.setdiff1d(window, skipped, assume_unique=True)
            row = kept - unit_start - np.searchsorted(skipped, kept)
            parts.append(kept[(row >= low) & (row < high)])
        return np.concatenate([np.zeros(0, dtype=np.int64), *parts])


class TensorFile:
    """A safetensors file whose header is written first and whose tensors are filled in row ranges.

    Plain file I/O rather than a memory map: mapped pages count toward the process's resident memory
    until unmapped, page-cache pages do not, and the merged targets are the largest thing a merge holds.
    """

    _DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}

    def __init__(self, path: Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self._tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            size = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": self._DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._tensors[name] = (dtype, shape, offset)
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8-byte alignment
        self._data_start = 8 + len(encoded)
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by __exit__
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self._data_start + offset)

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def flush(self) -> None:
        """Everything written so far in the file itself, for readers of its path (an upload, say)."""
        self._file.flush()

    def _position(self, name: str, row: int) -> tuple[np.dtype, int]:
        dtype, shape, offset = self._tensors[name]
        return dtype, self._data_start + offset + row * int(np.prod(shape[1:])) * dtype.itemsize

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        dtype, position = self._position(name, start)
        self._file.seek(position)
        self._file.write(np.ascontiguousarray(rows, dtype=dtype).data)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of tensor `name`. Positioned reads, with no file offset shared: readers
        on several threads at once (a merge writes its parquet parts side by side) do not race."""
        dtype, position = self._position(name, start)
        out = np.empty((stop - start, *self._tensors[name][1][1:]), dtype=dtype)
        self._file.flush()  # what write_rows left in the buffer
        view = memoryview(out).cast("B")
        if read_at(self._file.fileno(), view, position) != view.nbytes:
            raise ShardFileError(f"{self._file.name} ends before row {stop} of tensor '{name}'.")
        return out
