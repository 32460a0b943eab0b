"""Target quality measured without training: `coopt-hub evaluate`, and merge before it publishes.

Against a label column (when the source has one), on a seeded sample of at most MAX_PROBE_ROWS
rows of the merged split, for the aligned targets and for the raw (unaligned) ones: the fixed
linear probe of core.quality, cross-validated, and k-NN accuracy on a held-out fifth, over all
rows and per shard; and the leave-one-shard-out probe (fitted on the other shards, scored on the
held-out one), which only transfers when the shards' targets share one space. With or without
labels: each shard's agreement with the reference on the anchors, from a map fitted without the
anchors it predicts (held-out cosine and k-NN overlap).

    quality = evaluate(hub, "org/digits-coopt", "v2").quality
    quality.aligned.leave_one_shard_out.accuracy, quality.raw.leave_one_shard_out.accuracy

The sample is read by row position: memory follows the sample, not the dataset.
"""

from __future__ import annotations

import functools
import json
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from coopt_hub.core.align import (
    AlignmentFit,
    fit_transform,
    normalize,
    on_cores,
    one_blas_thread,
    select_alignment,
)
from coopt_hub.core.files import consecutive_runs, read_at
from coopt_hub.core.layout import TARGETS_PATH
from coopt_hub.core.memory import trim_heap
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.core.quality import (
    MAX_PROBE_ROWS,
    GroupProbe,
    cv_probe_accuracy,
    knn_accuracy,
    knn_chance,
    knn_overlap,
    leave_one_group_out_probe,
    load_probe_libraries,
    sample_rows,
)
from coopt_hub.errors import ConfigError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_plan, read_manifest, read_reference_anchors

SEED = 0
FOLDS = 5  # the probe's folds (core.quality) and those of the held-out anchor maps
NEIGHBOURS = 10
# A figure on fewer labelled rows than this would be mostly noise: it is left out (None).
MIN_ROWS = 50

Opener = Callable[[], AbstractContextManager[BinaryIO]]


class ProjectedAnchors(NamedTuple):
    """A shard's anchor ids and its projected (raw-space) outputs on them."""

    ids: np.ndarray
    projected: np.ndarray


def paired_anchors(own: ProjectedAnchors, reference: ProjectedAnchors) -> tuple[np.ndarray, np.ndarray]:
    """`own`'s and `reference`'s projected outputs on the anchor ids both have, rows paired."""
    common = np.intersect1d(own.ids, reference.ids)
    return own.projected[np.isin(own.ids, common)], reference.projected[np.isin(reference.ids, common)]


# Reading a sample -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSample:
    """A seeded sample of a merged split's rows (in id order): targets, shards and labels."""

    rows: int  # in the split
    ids: np.ndarray
    aligned: np.ndarray  # float16 [sampled, dim], as stored; widened by the rows each probe takes
    raw: np.ndarray  # float16 [sampled, dim]
    shards: np.ndarray  # int
    labels: np.ndarray | None  # None: no label column


def read_target_sample(
    targets: Path, parquet_files: Sequence[Opener], label_column: str | None, seed: int = SEED
) -> TargetSample:
    """Sample the merged split whose targets file is `targets` and whose parquet files (in order)
    `parquet_files` open; rows without a label are left out when `label_column` is given."""
    start, header = _tensor_entries(targets)
    count = int(header["ids"]["shape"][0])
    positions = sample_rows(count, MAX_PROBE_ROWS, seed)
    tensors = {name: _read_rows(targets, start, header[name], positions) for name in ("ids", "targets", "raw")}
    columns = ["id", "shard", *([label_column] if label_column else [])]
    table = _sampled_columns(parquet_files, columns, positions)
    if not np.array_equal(table.column("id").to_numpy(), tensors["ids"]):
        raise VerificationError("The merged targets file and the parquet files hold other ids at the same rows.",
                                hint="The version was edited by hand; merge again.")
    if label_column:
        keep = table.column(label_column).is_valid()
        table, tensors = table.filter(keep), {name: array[keep.to_numpy()] for name, array in tensors.items()}
    return TargetSample(rows=count, ids=tensors["ids"], aligned=tensors["targets"],
                        raw=tensors["raw"], shards=table.column("shard").to_numpy(),
                        labels=table.column(label_column).to_numpy() if label_column else None)


_DTYPES = {"I64": np.int64, "F16": np.float16, "F32": np.float32}


def _tensor_entries(path: Path) -> tuple[int, dict]:
    """(where the tensors' bytes start, the safetensors header) of a merged targets file."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def _read_rows(path: Path, start: int, entry: dict, positions: np.ndarray) -> np.ndarray:
    """Rows `positions` (sorted) of the tensor of header `entry`, by positioned reads of each run of
    consecutive rows. Not a memory map: a sample spread over a large file faults in the readahead
    around every row, and mapped pages count as this process's memory (a 20,000-row sample of a
    1M x 512 merge took the merge's peak RSS from 0.5 to 1.4 GiB)."""
    dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"])
    out = np.empty((positions.size, *shape[1:]), dtype=dtype)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    view = memoryview(out.reshape(-1)).cast("B")
    with open(path, "rb") as handle:
        for first, stop in consecutive_runs(positions):
            offset = start + entry["data_offsets"][0] + int(positions[first]) * row_bytes
            wanted = view[first * row_bytes:stop * row_bytes]
            if read_at(handle.fileno(), wanted, offset) != wanted.nbytes:
                raise VerificationError(f"{path.name} ends before row {int(positions[stop - 1])}.",
                                        hint="The version's targets file is damaged; merge again.")
    return out


def _sampled_columns(parquet_files: Sequence[Opener], columns: list[str], positions: np.ndarray) -> pa.Table:
    """`columns` at rows `positions` of the files read one after the other (only those columns are read)."""
    parts, offset = [], 0
    for open_file in parquet_files:
        with open_file() as handle:
            parquet = pq.ParquetFile(handle)
            missing = [name for name in columns if name not in parquet.schema_arrow.names]
            if missing:
                raise ConfigError(f"The merged split has no column {missing[0]!r}; its columns: "
                                  f"{', '.join(parquet.schema_arrow.names)}.",
                                  hint="Pass --label-column with one of them.")
            table = parquet.read(columns=columns)
        local = positions[(positions >= offset) & (positions < offset + table.num_rows)] - offset
        parts.append(table.take(pa.array(local)))
        offset += table.num_rows
    return pa.concat_tables(parts)


# The figures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeScores:
    """Label figures of one set of rows; None where too few rows or classes to measure."""

    rows: int
    probe: float | None  # the fixed linear probe, FOLDS-fold cross-validated
    knn: float | None  # k-NN vote (cosine) on a held-out fold, fitted on the others

    def to_dict(self) -> dict:
        return {"rows": self.rows, "probe": self.probe, "knn": self.knn}


@dataclass(frozen=True)
class TargetScores:
    """One kind of targets (aligned or raw) against the labels: all rows, per shard, and across shards."""

    overall: ProbeScores
    shards: dict[int, ProbeScores]
    leave_one_shard_out: GroupProbe | None  # None: fewer than two shards, or a shard's complement of one class

    def to_dict(self) -> dict:
        return {"overall": self.overall.to_dict(),
                "shards": {str(k): scores.to_dict() for k, scores in self.shards.items()},
                "leave_one_shard_out": self.leave_one_shard_out.to_dict() if self.leave_one_shard_out else None}


@dataclass(frozen=True)
class AnchorAgreement:
    """A shard's targets against the reference's on the anchors, each anchor predicted by a map
    (method chosen by select_alignment) fitted on the other folds: mean cosine and k-NN overlap."""

    shard: int
    anchors: int
    method: str
    cosine: float
    knn_overlap: float
    chance: float  # knn_overlap of unrelated views

    def to_dict(self) -> dict:
        return {"shard": self.shard, "anchors": self.anchors, "method": self.method, "cosine": self.cosine,
                "knn_overlap": self.knn_overlap, "chance": self.chance}


@dataclass(frozen=True)
class TargetQuality:
    """Everything measured on one merged version; `aligned` and `raw` are None without labels."""

    label_column: str | None
    rows: int  # in the merged split
    sampled: int  # rows measured (with a label, when there are labels)
    seed: int
    majority: float | None  # accuracy of always answering the most frequent label
    aligned: TargetScores | None
    raw: TargetScores | None
    reference: int
    agreement: tuple[AnchorAgreement, ...]

    def probe_rows(self) -> list[dict]:
        """The label figures as one table: per kind of targets, all rows then each shard, with the
        accuracy of the leave-one-shard-out probe on that shard (`held_out`); empty without labels."""
        rows = []
        for name, scores in (("aligned", self.aligned), ("raw", self.raw)):
            if scores is None:
                continue
            across = scores.leave_one_shard_out
            scopes = [("all", scores.overall, across.accuracy if across else None)]
            scopes += [(f"shard {k}", shard, across.groups.get(str(k)) if across else None)
                       for k, shard in scores.shards.items()]
            rows += [{"targets": name, "scope": scope, "held_out": held, **figures.to_dict()}
                     for scope, figures, held in scopes]
        return rows

    def to_dict(self) -> dict:
        return {"label_column": self.label_column, "rows": self.rows, "sampled": self.sampled, "seed": self.seed,
                "majority": self.majority, "aligned": self.aligned.to_dict() if self.aligned else None,
                "raw": self.raw.to_dict() if self.raw else None, "reference": self.reference,
                "agreement": [a.to_dict() for a in self.agreement]}


def measure_quality(
    sample: TargetSample, anchors: Mapping[int, ProjectedAnchors], reference: int, label_column: str | None,
    progress: Progress, seed: int = SEED, fits: Mapping[int, AlignmentFit] | None = None,
) -> TargetQuality:
    """Every figure of `sample` and of each shard's `anchors` against `reference`'s. `fits`: maps the
    caller chose already with select_alignment on the same anchors (a merge's re-alignments), reused."""
    fits = fits or {}
    agreement = _agreements(anchors, reference, seed, fits)
    aligned = raw = majority = None
    if sample.labels is not None:
        progress.info(f"Probing targets against {label_column!r} on {sample.ids.size:,} of {sample.rows:,} rows.")
        aligned, raw = _both_scores((sample.aligned, sample.raw), sample.labels, sample.shards, seed)
        _, counts = np.unique(sample.labels, return_counts=True)
        majority = float(counts.max() / counts.sum()) if counts.size else None
    return TargetQuality(label_column=label_column if sample.labels is not None else None, rows=sample.rows,
                         sampled=int(sample.ids.size), seed=seed,
                         majority=majority, aligned=aligned, raw=raw, reference=reference, agreement=agreement)


def _both_scores(targets: Sequence[np.ndarray], labels: np.ndarray, shards: np.ndarray,
                 seed: int) -> list[TargetScores]:
    """target_scores of each of `targets` (the aligned and the raw ones), on two threads with one
    BLAS and one OpenMP thread each: the probes' fits are series of small products, which two
    threads slow down rather than share. One thread takes the parts over (nearly) all rows, one at
    a time (two at once took a 1M x 512 merge's peak RSS from ~510 to ~590 MiB), then helps with the
    per-shard parts, which the other thread takes from the start; so both end within a small part.
    On 2 cores, 20,000 x 512 float16 targets of 8 shards: ~8-9 s and 15-17 CPU-s, where one kind
    after the other on both threads took 13.0-14.9 s and 24-27 CPU-s; the same figures."""
    parts = [_scores_parts(x, labels, shards, seed) for x in targets]
    large = [(kind, name) for name in ("overall", "across") for kind, named in enumerate(parts) if name in named]
    small = deque((kind, name) for kind, named in enumerate(parts) for name in named if (kind, name) not in large)
    results: list[dict] = [{} for _ in parts]

    def work(own: list[tuple[int, object]]) -> None:
        with threadpool_limits(limits=1, user_api="openmp"):  # OpenMP's thread count is each thread's own
            while own or small:
                try:
                    kind, name = own.pop(0) if own else small.popleft()
                except IndexError:  # the other thread took the last one
                    return
                call, *args = parts[kind][name]
                results[kind][name] = call(*args)

    trim_heap()  # what the caller freed before (a merge: its parquet stage's buffers)
    # Loaded before the limits are entered, which cover only the libraries loaded by then: scipy's
    # BLAS and scikit-learn's OpenMP runtime come with it (a merge loads it here).
    load_probe_libraries()
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(2, thread_name_prefix="coopt-probe") as pool:
        for running in [pool.submit(work, large), pool.submit(work, [])]:
            running.result()
    trim_heap()  # the fits' temporaries
    return [_gathered(named) for named in results]


def target_scores(x: np.ndarray, labels: np.ndarray, shards: np.ndarray, seed: int = SEED) -> TargetScores:
    """The label figures of targets `x` over all rows, per shard, and leaving each shard out. Float16
    targets are widened a few rows at a time (core.quality), never as a whole."""
    return _gathered({name: call(*args) for name, (call, *args) in _scores_parts(x, labels, shards, seed).items()})


def _scores_parts(x: np.ndarray, labels: np.ndarray, shards: np.ndarray, seed: int) -> dict[object, tuple]:
    """target_scores as independent calls, (function, *arguments) by name, the smallest first: each
    shard (by its number), all rows ("overall"), then leave-one-shard-out ("across")."""
    parts: dict[object, tuple] = {int(k): (_shard_scores, x, labels, shards, int(k), seed) for k in np.unique(shards)}
    parts["overall"] = (probe_scores, x, labels, seed)
    if _transferable(labels, shards):
        parts["across"] = (leave_one_group_out_probe, x, labels, shards)
    return parts


def _shard_scores(x: np.ndarray, labels: np.ndarray, shards: np.ndarray, shard: int, seed: int) -> ProbeScores:
    rows = shards == shard  # indexed out when the part runs: a queued part holds no copy
    return probe_scores(x[rows], labels[rows], seed)


def _gathered(results: dict[object, object]) -> TargetScores:
    return TargetScores(overall=results.pop("overall"), leave_one_shard_out=results.pop("across", None),
                        shards=dict(sorted(results.items())))


def probe_scores(x: np.ndarray, labels: np.ndarray, seed: int = SEED) -> ProbeScores:
    """The cross-validated probe and the k-NN vote on the first of the probe's folds."""
    from sklearn.model_selection import StratifiedKFold  # seconds to import: only where a probe runs

    _, counts = np.unique(labels, return_counts=True)
    if labels.size < MIN_ROWS or counts.size < 2 or counts.max() < FOLDS:
        return ProbeScores(int(labels.size), None, None)
    train, test = next(StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed).split(x, labels))
    knn = knn_accuracy(x[train], labels[train], x[test], labels[test], k=min(NEIGHBOURS, train.size))
    return ProbeScores(int(labels.size), cv_probe_accuracy(x, labels, folds=FOLDS, seed=seed), knn)


def _transferable(labels: np.ndarray, shards: np.ndarray) -> bool:
    """At least two shards, and every shard's complement holds two classes to fit a probe on."""
    names = np.unique(shards)
    return names.size >= 2 and all(np.unique(labels[shards != k]).size >= 2 for k in names)


def _agreements(anchors: Mapping[int, ProjectedAnchors], reference: int, seed: int,
                fits: Mapping[int, AlignmentFit]) -> tuple[AnchorAgreement, ...]:
    """anchor_agreement of every shard but `reference`, in shard order, two shards at a time with one
    BLAS thread each (select_alignment holds it to one anyway): the maps' solves and products at
    1,024 anchors are too small to share. 7 shards of 1,024 x 512 anchors on 2 cores: 2.8-3.0 s and
    4.6-4.9 CPU-s, where one shard after the other took 3.5-3.7 s and 6.3-6.8 CPU-s; the same figures."""
    shards = [k for k in sorted(anchors) if k != reference]
    with one_blas_thread():
        return tuple(on_cores(lambda k: anchor_agreement(anchors[k], anchors[reference], k, seed, fits.get(k)),
                              shards, workers=2))


def anchor_agreement(own: ProjectedAnchors, reference: ProjectedAnchors, shard: int,
                     seed: int = SEED, fit: AlignmentFit | None = None) -> AnchorAgreement:
    """How well `own`'s anchors predict `reference`'s through a map fitted without the anchors it
    predicts. `fit`: select_alignment's choice on these anchors, when the caller has it (a merge
    that re-aligned the shard); chosen here otherwise, or when it was chosen with another seed."""
    source, target = paired_anchors(own, reference)
    if fit is None or fit.seed != seed:
        fit = select_alignment(source, target, seed=seed)
    predicted = _held_out_predictions(source, target, fit, seed)
    k = min(NEIGHBOURS, source.shape[0] - 1)
    cosine = float(np.mean(np.sum(normalize(predicted) * normalize(target), axis=1)))
    return AnchorAgreement(shard=shard, anchors=int(source.shape[0]), method=fit.method, cosine=cosine,
                           knn_overlap=knn_overlap(predicted, target, k=k), chance=knn_chance(source.shape[0], k))


def _held_out_predictions(source: np.ndarray, target: np.ndarray, fit: AlignmentFit, seed: int) -> np.ndarray:
    """Each row of `source` mapped by `fit`'s method refitted without that row's fold (Procrustes
    refits its scale too; the other methods keep the parameters chosen)."""
    params = {} if fit.method == "procrustes" else fit.params
    folds = np.array_split(np.random.default_rng(seed).permutation(source.shape[0]), min(FOLDS, source.shape[0]))
    predicted = np.empty(target.shape, dtype=np.float64)
    for held in folds:
        train = np.setdiff1d(np.arange(source.shape[0]), held)
        predicted[held] = source[held] @ fit_transform(source[train], target[train], fit.method, params)
    return predicted


# A published version ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    repo: str
    revision: str
    commit: str
    tag: str
    quality: TargetQuality

    def to_dict(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit, "tag": self.tag,
                **self.quality.to_dict()}


def evaluate(hub: Hub, repo: str, revision: str, label_column: str | None = None,
             progress: Progress | None = None) -> Evaluation:
    """Measure the merged version `revision` of `repo` (a tag, branch or commit), against
    `label_column` (default: the manifest's, if any); reads its targets file, three columns of its
    parquet files and each merged shard's anchor outputs at the commit merged."""
    progress = progress or LogProgress()
    commit = hub.head(repo, revision)
    manifest = read_manifest(hub, repo, commit) if commit else None
    if manifest is None:
        raise VerificationError(f"{repo}@{revision} holds no merged version (no coopt/manifest.json).",
                                hint=f"Pass --revision with a published vN, or run `coopt-hub merge {repo}` first.")
    label = label_column or manifest.label_column
    plan = load_plan(hub, repo, commit)
    progress.info(f"Reading the targets of {repo}@{manifest.tag} ({commit[:12]}).")
    targets = hub.download(repo, TARGETS_PATH, commit)
    opens = [functools.partial(hub.open, repo, commit, path) for path in manifest.splits[manifest.source.split].files]
    sample = read_target_sample(targets, opens, label)
    anchors = {s.shard: ProjectedAnchors(*read_reference_anchors(hub, repo, plan, s.shard, s.commit, s.fingerprint))
               for s in manifest.shards}
    quality = measure_quality(sample, anchors, manifest.reference.shard, label, progress)
    return Evaluation(repo, revision, commit, manifest.tag, quality)
