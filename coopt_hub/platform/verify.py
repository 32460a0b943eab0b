"""Check a participant's upload by redoing part of its work: anyone can verify any shard.

A shard's header declares the prior (spec and weight fingerprint) and the preprocessing that made
its targets. Verification loads that prior, re-encodes a seeded sample of the shard's images (read
from the units holding them only) and all anchors, and compares with what was pushed; it then
recomputes from the pushed anchor outputs what the header claims about them (uniformity V, the
alignment fit to the declared reference with its declared method and parameters, its in-sample and
held-out residuals) and checks that the aligned targets are the raw targets mapped by that fit.
Raw targets are re-made through the shard's projection: the plan's W, or (pca plans) the basis the
shard stores with its anchors. Every figure is reported, so a reader sees how close a shard is.
Version 1 shards are checked as version 1 made them (native V, the one-shot ridge).

Honest shards reproduce to cosine ~0.9999999 (fp32) or ~0.9998 (bf16 autocast); noise of 5% of
the row norm added to the targets gives ~0.9987, so the default threshold sits between them. A shard
labeled below fp32 must record how far its outputs were from an fp32 forward on the anchors, within
PRECISION_TOLERANCE; its re-encoding here (in fp32) is then held to that tolerance instead, so at
reduced precision a deviation up to it (noise included) cannot be told from the rounding.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.core.align import (
    AlignmentWarning,
    apply_alignment,
    fit_alignment,
    fit_transform,
    normalize,
    select_alignment,
    uniformity,
)
from coopt_hub.core.layout import shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.core.quality import common_uniformity
from coopt_hub.core.shardfile import (
    PRECISION_TOLERANCE,
    AnchorOutputs,
    ShardHeader,
    ShardResult,
    expected_ids,
    header_problems,
    project,
    read_shard,
)
from coopt_hub.errors import BadImageError, ConfigError, PlanError, PriorError, ShardFileError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_anchors, read_reference_anchors
from coopt_hub.platform.init import rows_by_id
from coopt_hub.platform.status import collaboration_status, download_shard
from coopt_hub.priors.spec import Preprocessing, PriorSpec, decode_image

if TYPE_CHECKING:  # loading a prior needs torch; a merge that verifies nothing never imports it
    from coopt_hub.priors.base import Prior

PASSED, FAILED, UNVERIFIABLE, SKIPPED, MISSING = "pass", "fail", "cannot verify", "skipped", "missing"
CHECKS = ("files", "prior", "targets", "anchors", "uniformity", "alignment")
# Rows of a shard's targets (re-)aligned at a time, here and by merge: bounds the float32 temporaries
# to about 16384 x dim x 14 bytes (fp16 raw and aligned as read, float32 product, fp16 result).
ALIGN_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = 0.999  # every compared row: re-encoded vs pushed targets/anchors, raw @ T vs aligned
    tolerance: float = 1e-4  # |recomputed - declared| for V and the residuals; relative error of projected anchors

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}.")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a non-negative number, got {self.tolerance}.")


@dataclass(frozen=True)
class Agreement:
    """Per-row cosine between pushed vectors and the ones recomputed here."""

    rows: int
    min_cosine: float
    mean_cosine: float
    worst_id: int  # the sample id with the lowest cosine

    @classmethod
    def of(cls, pushed: np.ndarray, recomputed: np.ndarray, ids: np.ndarray) -> Agreement:
        return cls.of_cosines(_row_cosines(pushed, recomputed), ids)

    @classmethod
    def of_cosines(cls, cosine: np.ndarray, ids: np.ndarray) -> Agreement:
        """From the per-row cosines of the rows with `ids`."""
        worst = int(np.argmin(cosine))
        return cls(int(cosine.size), float(cosine[worst]), float(cosine.mean()), int(ids[worst]))

    def describe(self) -> str:
        return (f"cosine min {self.min_cosine:.7f} (id {self.worst_id}), mean {self.mean_cosine:.7f} "
                f"over {self.rows} rows")


@dataclass(frozen=True)
class Check:
    name: str  # one of CHECKS
    status: str  # PASSED | FAILED | UNVERIFIABLE | SKIPPED
    message: str


@dataclass
class ShardVerification:
    shard: int
    branch: str
    commit: str | None
    checks: list[Check] = field(default_factory=list)
    prior: dict[str, Any] | None = None
    fingerprint: str | None = None  # declared in the header
    loaded_fingerprint: str | None = None  # of the declared prior as loaded here
    sample_ids: list[int] = field(default_factory=list)
    targets: Agreement | None = None  # re-encoded sample vs pushed raw targets
    anchors: Agreement | None = None  # re-encoded anchors vs pushed anchor features
    aligned: Agreement | None = None  # pushed raw @ refitted T vs pushed aligned targets, every row
    uniformity_delta: float | None = None  # |V recomputed from the pushed anchor features - V in the header|
    residual_delta: float | None = None  # |in-sample residual of the refitted T - residual in the header|
    cv_residual: float | None = None  # held-out residual of the declared method, recomputed (version 2)
    cv_residual_delta: float | None = None  # |cv_residual - the header's alignment cv_residual|

    @property
    def status(self) -> str:
        """FAILED if any check failed, else UNVERIFIABLE if one could not run, else PASSED (MISSING: no upload)."""
        if not self.checks:
            return MISSING
        statuses = {check.status for check in self.checks}
        if FAILED in statuses:
            return FAILED
        if UNVERIFIABLE in statuses:
            return UNVERIFIABLE
        return PASSED

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def check(self, name: str) -> Check | None:
        return next((check for check in self.checks if check.name == name), None)

    def problems(self) -> list[Check]:
        return [check for check in self.checks if check.status in (FAILED, UNVERIFIABLE)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status
        return data


class PriorLoader:
    """Loads declared priors, keeping the `keep` most recently used in memory (large models add up
    over many shards), and remembers the ones that cannot be loaded here, and why.

    A declared checkpoint is a path on the participant's machine: with `checkpoint_dir`, a file of
    the same name there is used instead. That is safe because the fingerprint check still has to pass.
    """

    def __init__(self, device: str = "cpu", checkpoint_dir: Path | None = None, keep: int = 1):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}.")
        self.device = device
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.keep = keep
        self._loaded: OrderedDict[PriorSpec, Prior] = OrderedDict()
        self._failed: dict[PriorSpec, PriorError] = {}

    def __call__(self, spec: PriorSpec) -> Prior:
        local = self._local(spec)
        if local in self._failed:
            raise self._failed[local]
        if local not in self._loaded:
            while len(self._loaded) >= self.keep:  # before loading, so the memory is free for the new one
                self._loaded.popitem(last=False)
            try:
                from coopt_hub.priors.registry import load_prior

                self._loaded[local] = load_prior(local, self.device)
            except PriorError as err:
                self._failed[local] = err
                raise
        self._loaded.move_to_end(local)
        return self._loaded[local]

    def _local(self, spec: PriorSpec) -> PriorSpec:
        if spec.checkpoint and not os.path.isfile(spec.checkpoint) and self.checkpoint_dir is not None:
            candidate = self.checkpoint_dir / Path(spec.checkpoint).name
            if candidate.is_file():
                return replace(spec, checkpoint=str(candidate))
        return spec


def verify_repo(
    hub: Hub,
    repo: str,
    *,
    shards: Sequence[int] | None = None,
    sample: int = 64,
    seed: int = 0,
    thresholds: Thresholds = Thresholds(),
    priors: PriorLoader | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> list[ShardVerification]:
    """Verify `shards` (default: every shard of the plan), each at the contribution `status` finds for
    it (its branch, an open pull request, or main's last merge; the newest that passes status's checks);
    unpushed ones come back MISSING."""
    status = collaboration_status(hub, repo)
    wanted = list(range(status.plan.num_shards)) if shards is None else list(shards)
    for k in wanted:
        status.plan.shard_ids(k)  # PlanError for a shard the plan does not have, before any work
    priors = priors or PriorLoader()
    progress = progress or LogProgress()
    results = []
    for k in wanted:
        shard = status.shards[k]
        if shard.commit is None:
            progress.info(f"Shard {k}: nothing pushed to {shard.branch} or in a pull request.")
            results.append(ShardVerification(k, shard.branch, None))
            continue
        progress.info(f"Shard {k}: verifying {shard.found.describe() if shard.found else shard.branch}.")
        results.append(verify_shard(hub, repo, status.plan, k, sample=sample, seed=seed, thresholds=thresholds,
                                    commit=shard.commit, priors=priors, batch_size=batch_size, progress=progress))
    return results


def verify_shard(
    hub: Hub,
    repo: str,
    plan: Plan,
    shard: int,
    sample: int = 64,
    seed: int = 0,
    *,
    thresholds: Thresholds = Thresholds(),
    commit: str | None = None,
    files: tuple[ShardResult, AnchorOutputs] | None = None,
    priors: PriorLoader | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> ShardVerification:
    """Verify shard `shard` of `repo` as pushed at `commit` (default: its branch head).

    `files` are the shard's files as `read_shard(..., verify=True)` returned them, when the caller
    has them already: then nothing of the shard is downloaded and `commit` only labels the result.
    The sampled images, the anchors and the declared reference's anchors come from the Hub either
    way. Returns a MISSING verification (no checks) when nothing was pushed.
    """
    if sample < 1:
        raise ValueError(f"The sample must hold at least one row, got {sample}.")
    if batch_size < 1:
        raise ValueError(f"The batch size must be at least 1, got {batch_size}.")
    plan.shard_ids(shard)
    branch = shard_branch(shard)
    if files is None:
        commit = commit or hub.head(repo, branch)
        if commit is None:
            return ShardVerification(shard, branch, None)
    report = ShardVerification(shard, branch, commit)
    if files is None:
        files = _fetch(hub, repo, shard, commit, report)
    if files is None or not _check_files(plan, shard, *files, report):
        return report
    result, anchors = files
    declared = _check_prior(result.header, priors or PriorLoader(), report)
    encoder = _Encoder(*declared, batch_size, progress or LogProgress()) if declared else None
    encoded = at_precision(thresholds, result.header.precision)
    _check_targets(plan, result, anchors, encoder, sample, seed, encoded, hub.token, report)
    _check_anchors(hub, repo, plan, anchors, encoder, encoded, report)
    _check_uniformity(plan, result.header, anchors, thresholds, report)
    _check_alignment(hub, repo, plan, result, anchors, thresholds, report)
    return report


def failure_error(results: Sequence[ShardVerification], repo: str) -> VerificationError | None:
    """The error to raise after reporting `results`, naming each shard's failed checks; None when all passed.

    The figures behind each check are in `ShardVerification.problems()`, for the report shown first.
    """
    failed = [r for r in results if r.status == FAILED]
    unverifiable = [r for r in results if r.status == UNVERIFIABLE]
    if not failed and not unverifiable:
        return None
    parts = [f"shard {r.shard} {r.status} ({', '.join(c.name for c in r.problems())})" for r in failed + unverifiable]
    if failed:
        hint = (f"Do not merge shard(s) {', '.join(str(r.shard) for r in failed)}: their files are not what the "
                "declared prior produces. Their owners must run `coopt-hub optimize --shard K --push --overwrite`.")
    else:
        hint = ("Obtain the declared weights (see each shard's prior) and rerun with --checkpoint-dir DIR, "
                "or ask the participant to publish them.")
    return VerificationError(f"Verification of {repo} did not pass: {'; '.join(parts)}.", hint=hint)


# Files -------------------------------------------------------------------------------------------


def _fetch(hub: Hub, repo: str, shard: int, commit: str,
           report: ShardVerification) -> tuple[ShardResult, AnchorOutputs] | None:
    """The shard's pair of files at `commit`, read and checked; None when nothing was pushed, or when
    the files do not read (then the 'files' check says why)."""
    with tempfile.TemporaryDirectory(prefix="coopt-verify-") as scratch:
        try:
            return read_shard(download_shard(hub, repo, shard, commit, Path(scratch)), verify=True)
        except RemoteEntryNotFoundError:
            return None  # a branch without targets: nothing was pushed to it yet
        except ShardFileError as err:
            report.checks.append(Check("files", FAILED, str(err)))
            _skip_rest(report, "the shard's files do not read")
            return None


def _check_files(plan: Plan, shard: int, result: ShardResult, anchors: AnchorOutputs,
                 report: ShardVerification) -> bool:
    """Records the 'files' check: whether the files fit the plan (the rest is skipped when they do not)."""
    header = result.header
    report.prior, report.fingerprint = header.prior, header.fingerprint
    problems = header_problems(plan, shard, header) + _precision_problems(header) + \
        _id_problems(plan, shard, result, anchors)
    if problems:
        report.checks.append(Check("files", FAILED, "; ".join(problems) + "."))
        _skip_rest(report, "the files do not fit the plan")
        return False
    report.checks.append(Check("files", PASSED, f"{header.num_rows} rows and {anchors.ids.size} anchors fit the plan; "
                                                 "checksums match."))
    return True


def at_precision(thresholds: Thresholds, precision: str) -> Thresholds:
    """The thresholds for comparing an fp32 re-encoding with outputs computed at `precision`."""
    if precision not in PRECISION_TOLERANCE:
        return thresholds
    return replace(thresholds, min_cosine=min(thresholds.min_cosine, 1.0 - PRECISION_TOLERANCE[precision]))


def _precision_problems(header: ShardHeader) -> list[str]:
    """A shard labeled below fp32 records its deviation from an fp32 forward, within the tolerance."""
    if header.precision not in PRECISION_TOLERANCE:
        return []
    tolerance, deviation = PRECISION_TOLERANCE[header.precision], header.precision_deviation
    if deviation is None:
        return [(f"it was labeled in {header.precision} but records no deviation from an fp32 forward "
                 "(precision_deviation): its targets cannot be told from another model's")]
    if deviation["max_cosine_distance"] > tolerance:
        return [(f"its {header.precision} outputs deviate from an fp32 forward by a cosine distance of up to "
                 f"{deviation['max_cosine_distance']:.4f} on {deviation['anchors']} anchors, above the "
                 f"{tolerance} tolerance for {header.precision}")]
    return []


def _id_problems(plan: Plan, shard: int, result: ShardResult, anchors: AnchorOutputs) -> list[str]:
    problems = []
    if not np.array_equal(result.ids, expected_ids(plan, shard, result.header)):
        problems.append(f"its sample ids are not the plan's ids of shard {shard} less those it skipped")
    if not np.array_equal(anchors.ids, np.asarray(plan.anchor_ids, dtype=np.int64)):
        problems.append("its anchor outputs are not for the plan's anchor ids")
    return problems


def _skip_rest(report: ShardVerification, reason: str) -> None:
    done = {check.name for check in report.checks}
    report.checks.extend(Check(name, SKIPPED, f"not checked: {reason}.") for name in CHECKS if name not in done)


# The prior ---------------------------------------------------------------------------------------


def _check_prior(header: ShardHeader, priors: PriorLoader,
                 report: ShardVerification) -> tuple[Prior, Preprocessing] | None:
    """The declared prior and preprocessing when they can re-encode the shard; records the 'prior' check.

    A prior whose weights hash differently from the declared fingerprint still re-encodes the
    sample: the figures then show how far the pushed targets are from the declared model.
    """
    try:
        spec = PriorSpec.from_dict(header.prior)
        preprocessing = Preprocessing.from_dict(header.preprocessing)
    except (ConfigError, KeyError, TypeError, ValueError) as err:
        report.checks.append(Check("prior", FAILED, f"the header's prior or preprocessing record is unusable: {err}"))
        return None
    try:
        prior = priors(spec)
    except PriorError as err:
        what = "weights unavailable" if not spec.random_init else "the declared model cannot be built here"
        report.checks.append(Check("prior", UNVERIFIABLE, f"cannot verify: {what} ({err})"))
        return None
    report.loaded_fingerprint = prior.fingerprint
    misfits = []
    if prior.output_dim != header.output_dim:
        misfits.append(f"the declared prior outputs {prior.output_dim} dimensions, the header says {header.output_dim}")
    if tuple(preprocessing.image_size) != tuple(prior.preprocessing.image_size):
        misfits.append(f"the declared preprocessing makes {preprocessing.image_size} images, the model takes "
                       f"{prior.preprocessing.image_size}")
    if prior.fingerprint != header.fingerprint:
        report.checks.append(Check("prior", FAILED, "; ".join(misfits + [
            f"the declared prior's weights hash to {prior.fingerprint[:12]}, the header declares "
            f"{header.fingerprint[:12]}: the targets come from another model than declared"]) + "."))
    elif misfits:
        report.checks.append(Check("prior", FAILED, "; ".join(misfits) + "."))
    else:
        default = "" if preprocessing == prior.preprocessing else " (declared preprocessing differs from the model's)"
        report.checks.append(Check("prior", PASSED, f"weights match fingerprint {header.fingerprint[:12]}{default}."))
    return None if misfits else (prior, preprocessing)


@dataclass(frozen=True)
class _Encoder:
    """The declared prior with its declared preprocessing, re-encoding images in batches."""

    prior: Prior
    preprocessing: Preprocessing
    batch_size: int
    progress: Progress

    def encode(self, cells: Sequence[Any], ids: np.ndarray, description: str) -> np.ndarray:
        """L2-normalised prior outputs of the images in `cells` (sample ids `ids`)."""
        import torch

        transform = self.preprocessing.transform()
        outputs = []
        with self.progress.bar(len(cells), description, unit="img") as bar:
            for start in range(0, len(cells), self.batch_size):
                batch = list(zip(cells[start:start + self.batch_size], ids[start:start + self.batch_size]))
                pixels = torch.stack([transform(decode_image(cell, int(sample_id))) for cell, sample_id in batch])
                with torch.inference_mode():
                    outputs.append(self.prior.encode_batch(pixels).float().numpy())
                bar.update(len(batch))
        return normalize(np.concatenate(outputs))


def _no_prior(report: ShardVerification, name: str) -> None:
    if report.check("prior").status == UNVERIFIABLE:
        report.checks.append(Check(name, UNVERIFIABLE, "cannot verify: the declared prior is not available here."))
    else:
        report.checks.append(Check(name, SKIPPED, "not checked: the declared prior does not fit the header."))


# Targets and anchors -----------------------------------------------------------------------------


def sample_ids(ids: np.ndarray, count: int, seed: int, shard: int) -> np.ndarray:
    """A sorted sample of `count` ids (all when fewer), the same for a seed and shard on every machine.

    Drawn from PCG64's raw bit stream, which NumPy keeps stable across versions (unlike Generator.choice).
    """
    if count >= ids.size:
        return ids.copy()
    keys = np.random.PCG64(np.random.SeedSequence([seed, shard])).random_raw(ids.size)
    return np.sort(ids[np.argsort(keys, kind="stable")[:count]])


def _check_targets(plan: Plan, result: ShardResult, anchors: AnchorOutputs, encoder: _Encoder | None, sample: int,
                   seed: int, thresholds: Thresholds, token: str | None, report: ShardVerification) -> None:
    shard = result.header.shard
    ids = sample_ids(result.ids, sample, seed, shard)
    report.sample_ids = [int(i) for i in ids]
    if encoder is None:
        _no_prior(report, "targets")
        return
    cells = rows_by_id(plan.source_repo, plan.source_revision, plan.shard_units(shard), ids, plan.image_column,
                       token, encoder.progress).column(plan.image_column).to_pylist()
    try:
        features = encoder.encode(cells, ids, f"Shard {shard}: re-encoding {ids.size} sampled images")
    except BadImageError as err:
        report.checks.append(Check("targets", FAILED, f"the shard has targets for images that do not decode: {err}"))
        return
    recomputed = project(plan, anchors.basis, features)
    rows = np.searchsorted(result.ids, ids)
    report.targets = Agreement.of(result.raw[rows].astype(np.float32), recomputed, ids)
    figures = f"re-encoded sample vs pushed raw targets: {report.targets.describe()}"
    if report.targets.min_cosine >= thresholds.min_cosine:
        report.checks.append(Check("targets", PASSED, figures + "."))
    else:
        report.checks.append(Check("targets", FAILED, f"the pushed targets are not the declared prior's outputs: "
                                                      f"{figures}, below the threshold {thresholds.min_cosine}."))


def _check_anchors(hub: Hub, repo: str, plan: Plan, anchors: AnchorOutputs, encoder: _Encoder | None,
                   thresholds: Thresholds, report: ShardVerification) -> None:
    """Re-encode every anchor: V and the alignment fit rest on them, so a sample would not do."""
    projection_error = _relative_error(anchors.projected, project(plan, anchors.basis, anchors.features))
    through = "the shard's PCA basis" if plan.projection_kind == "pca" else "W"
    projection = f"projected anchors vs features through {through}: relative error {projection_error:.2e}"
    problems = [] if projection_error <= thresholds.tolerance else [f"{projection}, above {thresholds.tolerance}"]
    if encoder is None:
        if problems:
            report.checks.append(Check("anchors", FAILED, problems[0] + "."))
        else:
            _no_prior(report, "anchors")
        return
    cells = load_anchors(hub, repo, plan).column(plan.image_column).to_pylist()
    try:
        features = encoder.encode(cells, anchors.ids, f"Shard {report.shard}: re-encoding the anchors")
    except BadImageError as err:
        report.checks.append(Check("anchors", FAILED, f"the shard has outputs for anchors that do not decode: {err}"))
        return
    report.anchors = Agreement.of(anchors.features, features, anchors.ids)
    figures = f"re-encoded anchors vs pushed features: {report.anchors.describe()}"
    if report.anchors.min_cosine < thresholds.min_cosine:
        problems.insert(0, f"the pushed anchor features are not the declared prior's: {figures}, "
                           f"below the threshold {thresholds.min_cosine}")
    if problems:
        report.checks.append(Check("anchors", FAILED, "; ".join(problems) + "."))
    else:
        report.checks.append(Check("anchors", PASSED, f"{figures}; {projection}."))


# What the header claims about the anchors --------------------------------------------------------


def _check_uniformity(plan: Plan, header: ShardHeader, anchors: AnchorOutputs, thresholds: Thresholds,
                      report: ShardVerification) -> None:
    native = uniformity(anchors.features, t=plan.temperature)
    if header.schema_version == 1:
        declared = [("V", native, header.uniformity)]
    else:
        declared = [("V in the common space", common_uniformity(anchors.features, plan.dim, t=plan.temperature),
                     header.uniformity), ("native V", native, header.uniformity_native)]
    deltas = [abs(value - claimed) for _, value, claimed in declared]
    report.uniformity_delta = max(deltas)
    figures = "; ".join(f"{name} recomputed {value:.6f}, declared {claimed:.6f} (delta {delta:.2e})"
                        for (name, value, claimed), delta in zip(declared, deltas))
    if report.uniformity_delta <= thresholds.tolerance:
        report.checks.append(Check("uniformity", PASSED, figures + "."))
    else:
        report.checks.append(Check("uniformity", FAILED, f"{figures}: the declared prior quality is not what its "
                                                         "anchor outputs give."))


@dataclass(frozen=True)
class _Refit:
    """The declared alignment made again: its map, its in-sample residual, and (version 2) its held-out one."""

    transform: np.ndarray
    residual: float
    cv_residual: float | None
    target: str  # what it maps to, for the message
    method: str = "ridge"


def _check_alignment(hub: Hub, repo: str, plan: Plan, result: ShardResult, anchors: AnchorOutputs,
                     thresholds: Thresholds, report: ShardVerification) -> None:
    """Refit T to the declared reference; check the residuals and every aligned row against raw @ T."""
    header = result.header
    refit = _Refit(np.eye(header.dim), 0.0, None, "itself") if header.reference is None else \
        _refit(hub, repo, plan, header, anchors, report)
    if refit is None:
        return
    report.residual_delta = abs(refit.residual - header.residual)
    report.aligned = _aligned_agreement(result, refit.transform)
    figures = [f"to {refit.target}"]
    problems = []
    if refit.cv_residual is not None:
        report.cv_residual = refit.cv_residual
        report.cv_residual_delta = abs(refit.cv_residual - header.cv_residual)
        figures.append(f"{refit.method} held-out residual recomputed {refit.cv_residual:.6f}, declared "
                       f"{header.cv_residual:.6f} (delta {report.cv_residual_delta:.2e})")
        if report.cv_residual_delta > thresholds.tolerance:
            problems.append("the declared held-out residual is not the fit's")
    figures.append(f"in-sample residual recomputed {refit.residual:.6f}, declared {header.residual:.6f} "
                   f"(delta {report.residual_delta:.2e}); raw @ T vs aligned: {report.aligned.describe()}")
    if report.residual_delta > thresholds.tolerance:
        problems.append("the declared residual is not the fit's")
    if report.aligned.min_cosine < thresholds.min_cosine:
        problems.append(f"aligned targets are not raw @ T (threshold {thresholds.min_cosine})")
    if problems:
        report.checks.append(Check("alignment", FAILED, f"{'; '.join(problems)}: {', '.join(figures)}."))
    else:
        report.checks.append(Check("alignment", PASSED, ", ".join(figures) + "."))


def _refit(hub: Hub, repo: str, plan: Plan, header: ShardHeader, anchors: AnchorOutputs,
           report: ShardVerification) -> _Refit | None:
    """The declared fit to the declared reference, from both shards' projected anchors; None (and the
    'alignment' check failed) when the reference or the fit cannot be used."""
    reference = header.reference
    try:
        if reference.get("branch") != shard_branch(int(reference["shard"])):
            raise ValueError(f"it names branch {reference.get('branch')!r} for shard {reference['shard']}")
        reference_ids, reference_projected = read_reference_anchors(
            hub, repo, plan, int(reference["shard"]), str(reference["commit"]), reference.get("fingerprint")
        )
    except (ShardFileError, PlanError, KeyError, TypeError, ValueError) as err:
        report.checks.append(Check("alignment", FAILED, f"the declared reference cannot be used: {err}"))
        return None
    common, own_rows, reference_rows = np.intersect1d(anchors.ids, reference_ids, return_indices=True)
    if common.size < 2:
        report.checks.append(Check("alignment", FAILED, f"the reference shares {common.size} anchors with it."))
        return None
    source, target = anchors.projected[own_rows], reference_projected[reference_rows]
    name = f"shard {reference['shard']}@{str(reference['commit'])[:8]}"
    if header.schema_version == 1:
        with warnings.catch_warnings():
            # The participant was warned when it fitted; the same fit is only repeated here.
            warnings.simplefilter("ignore", AlignmentWarning)
            transform, residual = fit_alignment(source, target)
        return _Refit(transform, residual, None, name)
    fit = header.alignment
    if fit is None:
        report.checks.append(Check("alignment", FAILED, f"it declares {name} as its reference but no alignment fit."))
        return None
    try:
        transform = fit_transform(source, target, fit["method"], fit["params"])
        held_out = select_alignment(source, target, methods=(fit["method"],), folds=int(fit["folds"]),
                                    seed=int(fit["seed"]))
    except (ConfigError, PlanError, KeyError, TypeError, ValueError) as err:
        report.checks.append(Check("alignment", FAILED, f"the declared alignment fit cannot be made again: {err}"))
        return None
    return _Refit(transform, _relative_error(source @ transform, target), held_out.cv_residual, name, fit["method"])


def _aligned_agreement(result: ShardResult, transform: np.ndarray) -> Agreement:
    """Over every row, not the sample: no encoding is needed, and a few moved rows must not slip through."""
    cosines = []
    for start in range(0, result.ids.size, ALIGN_CHUNK_ROWS):
        rows = slice(start, start + ALIGN_CHUNK_ROWS)
        expected = apply_alignment(result.raw[rows].astype(np.float32), transform)
        cosines.append(_row_cosines(result.aligned[rows].astype(np.float32), expected))
    return Agreement.of_cosines(np.concatenate(cosines), result.ids)


# Arithmetic --------------------------------------------------------------------------------------


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, np.finfo(np.float64).tiny)


def _relative_error(pushed: np.ndarray, expected: np.ndarray) -> float:
    scale = float(np.linalg.norm(expected.astype(np.float64)))
    return float(np.linalg.norm(pushed.astype(np.float64) - expected)) / max(scale, np.finfo(np.float64).tiny)
