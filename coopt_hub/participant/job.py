"""A participant's job: label shard k with its prior, judge the prior on the anchors, align, publish.

    plan (main) -> chunks of shard k and of S -> labeling on every rank -> chunks gathered on rank 0
    -> raw targets (f @ W, or f through this shard's own PCA basis) -> uniformity V on S
    -> reference (the best prior by common-space V among the pushed shards' stored anchor outputs
    and this one's, noise-like ones last) -> T_k chosen on S by held-out error -> aligned targets
    -> targets/anchors/report files -> one commit to shard/{k}

Each step is a function that returns what the next needs. Work lives under
`{workdir}/{repo}/shard-{k}/{plan hash}-{prior fingerprint}-{settings}/`: a different plan, prior or
precision never reuses another's chunks, and a rerun of the same job only computes what is missing.
Rank and world size come in through a `Collective`; only the command line reads a launcher's state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from coopt_hub import __version__, errors
from coopt_hub.core.align import fit_pca_basis, normalize, uniformity
from coopt_hub.core.layout import REPORT_FILE, shard_prefix
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Bar, LogProgress, Progress, Silent
from coopt_hub.core.quality import common_uniformity, sample_rows
from coopt_hub.core.shardfile import (
    PRECISION_TOLERANCE,
    SCHEMA_VERSION,
    AnchorOutputs,
    ShardHeader,
    ShardResult,
    project,
    write_shard,
)
from coopt_hub.errors import BadImageError, ConflictError, PriorError, id_list
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import check_source_pin, load_anchors, load_plan
from coopt_hub.participant.chunks import JobChunks, JobOutputs, job_chunks, read_outputs
from coopt_hub.participant.collective import Collective, SingleProcess, agreed
from coopt_hub.participant.labeling import (
    ChunkStore,
    LabelingStats,
    collect_chunks,
    label_chunks,
    prepare_pixels,
    rank_chunks,
)
from coopt_hub.participant.push import check_branch_owner, publish_result
from coopt_hub.participant.reference import (
    Alignment,
    ReferenceChoice,
    align_to_reference,
    choose_reference,
    pushed_shards,
)
from coopt_hub.participant.report import RunSummary, build_report, write_report
from coopt_hub.participant.workdir import OptimizeResult, mark_latest, result_directory, run_directory
from coopt_hub.priors import Prior, PriorSpec, load_prior
from coopt_hub.priors.base import resolve_precision

BAD_IMAGE_POLICIES = ("error", "skip")
# A "pca" participant fits its basis on at most this many of its shard's rows (a seeded sample):
# float64 copies of 20,000 x 1,024 outputs take ~0.3 GB, and the leading axes of the rest add little.
PCA_FIT_ROWS = 20_000
# Anchors encoded again by an eager fp32 forward to measure a faster forward's deviation from it:
# ~1.5 s for ViT-S-32 on 2 cores (a fixed cost of every run), and a precision that breaks shows
# on a few dozen rows already.
DEVIATION_ANCHORS = 32


@dataclass(frozen=True)
class OptimizeOptions:
    batch_size: int = 64
    workers: int = 4
    on_bad_image: str = "error"  # "error" | "skip"
    push: bool = False
    overwrite: bool = False
    participant: str | None = None

    def __post_init__(self) -> None:
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise errors.ConfigError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}.")
        if self.batch_size < 1 or self.workers < 1:
            raise errors.ConfigError(
                f"--batch-size and --workers must be at least 1, got {self.batch_size} and {self.workers}."
            )


def optimize_shard(
    hub: Hub,
    repo: str,
    shard: int,
    prior: Prior | Callable[[], Prior],
    *,
    workdir: Path,
    options: OptimizeOptions = OptimizeOptions(),
    collective: Collective = SingleProcess(),
    progress: Progress | None = None,
) -> OptimizeResult | None:
    """Label shard `shard` of `repo`'s plan with `prior`, align it, write it, and push it if asked.

    `prior` may be a function that loads the prior: it is then called after the plan has been
    checked, so a wrong shard number fails before a model is loaded. Every rank calls this with
    the same arguments; rank 0 returns the result, the other ranks None once their part is handed over.
    `progress` (default: logging) hears rank 0 only.
    """
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    root = collective.rank == 0
    notes = _Notes((progress or LogProgress()) if root else Silent())
    job = _start(hub, repo, shard, prior, workdir, options, collective, notes)
    labeled = _label(job, options, collective, notes.say)
    if not root:
        return None
    result = _finish(hub, job, labeled, options, notes)
    result.report["timings"].update(_fixed_costs(job, labeled))
    result.report["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    write_report(result.files[2], result.report)  # last: its presence marks the result as complete
    mark_latest(workdir, repo, shard, job.store.directory)
    if options.push:
        result.commit, result.pushed = publish_result(hub, repo, shard, result.directory, options.overwrite,
                                                      notes.say)
    return result


@dataclass
class _Notes:
    """What the job says (to `say`), keeping the notes that also go into its result."""

    say: Progress
    notes: list[str] = field(default_factory=list)

    def info(self, message: str) -> None:
        self.notes.append(message)
        self.say.info(message)

    def warn(self, message: str) -> None:
        self.notes.append(message)
        self.say.warn(message)

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar:
        return self.say.bar(total, description, unit)


def load_job_prior(spec: PriorSpec, device: str, precision: str, compiled: bool = False) -> Prior:
    """The prior of `spec` as a job runs it: at `precision` ("auto": the device's fastest safe one),
    through torch.compile if `compiled` (a model that cannot compile says why in `compile_fallback`)."""
    prior = load_prior(spec, device=device, precision=resolve_precision(device, precision))
    if compiled:
        prior.compile()
    return prior


# Every rank: agree on the plan and the prior, then label ---------------------------------------


@dataclass(frozen=True)
class _Job:
    """What every rank agreed on before encoding: the plan, the loaded prior, and where the work lives."""

    repo: str
    shard: int
    plan: Plan
    prior: Prior
    store: ChunkStore  # in the run directory of (plan, prior, settings)
    chunks: JobChunks
    # Seconds of the fixed costs so far: plan_s, model_load_s, anchors_fetch_s once the anchors are read.
    fixed: dict[str, float] = field(default_factory=dict)


def _start(
    hub: Hub, repo: str, shard: int, prior: Prior | Callable[[], Prior], workdir: Path,
    options: OptimizeOptions, collective: Collective, notes: _Notes,
) -> _Job:
    fixed: dict[str, float] = {}
    with _timed(fixed, "plan_s"):
        plan = _agree_on_plan(hub, repo, shard, collective, notes)
    with _timed(fixed, "model_load_s"):
        loaded = agreed(collective, lambda: _load_prior(hub, repo, shard, prior, options, collective.rank == 0))
    if loaded.compile_fallback:
        notes.warn(loaded.compile_fallback)
    run_dir = run_directory(workdir, repo, shard, plan, loaded)

    @cache
    def anchors():
        with _timed(fixed, "anchors_fetch_s"):
            return load_anchors(hub, repo, plan)

    chunks = job_chunks(plan, shard, anchors, hub.token)
    notes.say.info(f"Shard {shard} of {repo}: {len(plan.shard_ids(shard))} rows + {len(plan.anchor_ids)} anchors "
                   f"in {len(chunks.all)} chunks, {collective.world_size} process(es); work in {run_dir}")
    return _Job(repo=repo, shard=shard, plan=plan, prior=loaded, store=ChunkStore(run_dir), chunks=chunks,
                fixed=fixed)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 3)


def _fixed_costs(job: _Job, labeled: _Labeled) -> dict[str, float]:
    """What rank 0 spent before its first encoded batch: plan, model, anchors (when encoded), first batch."""
    first = labeled.stats[0].first_batch_s
    return {**job.fixed, **({} if first is None else {"first_batch_s": round(first, 3)})}


def _agree_on_plan(hub: Hub, repo: str, shard: int, collective: Collective, notes: _Notes) -> Plan:
    def check_plan() -> Plan:
        plan = load_plan(hub, repo)
        plan.shard_ids(shard)  # PlanError when the shard does not exist
        if collective.rank == 0:
            moved = check_source_pin(plan, hub.token)
            if moved:
                notes.info(moved)
        return plan

    plan = agreed(collective, check_plan)
    if len(set(collective.all_gather(plan.plan_hash))) > 1:
        raise ConflictError(f"The plan of {repo} changed while the processes started.", hint="Rerun the command.")
    return plan


def _load_prior(
    hub: Hub, repo: str, shard: int, prior: Prior | Callable[[], Prior], options: OptimizeOptions, root: bool
) -> Prior:
    loaded = prior if isinstance(prior, Prior) else prior()
    if root and options.push and not options.overwrite:
        # Before hours of encoding, not at the end: the branch may hold someone else's shard.
        check_branch_owner(hub, repo, shard, loaded.fingerprint)
    return loaded


@dataclass(frozen=True)
class _Labeled:
    stats: list[LabelingStats]  # one per rank
    seconds: float


def _label(job: _Job, options: OptimizeOptions, collective: Collective, say: Progress) -> _Labeled:
    """Every rank encodes its chunks; then rank 0 holds them all."""
    mine = rank_chunks(job.chunks.all, collective.rank, collective.world_size)
    started = time.perf_counter()
    stats = agreed(
        collective,
        lambda: label_chunks(
            job.prior, mine, job.store, batch_size=options.batch_size, workers=options.workers,
            stop_on_bad_image=options.on_bad_image == "error",
            progress=say, description=f"Encoding shard {job.shard}",
        ),
    )
    all_stats: list[LabelingStats] = collective.all_gather(stats)
    seconds = time.perf_counter() - started
    bad = sorted({i for s in all_stats for i in s.bad_ids})
    if bad and options.on_bad_image == "error":
        raise BadImageError(
            f"{len(bad)} image(s) of shard {job.shard} or the anchors cannot be decoded: ids {id_list(bad)}.",
            ids=bad,
            hint="Fix those rows in the source, or rerun with --on-bad-image skip to leave them out "
            "(they are recorded in the report); finished chunks are kept.",
        )
    agreed(collective, lambda: collect_chunks(job.store, [c.name for c in job.chunks.all], collective))
    return _Labeled(stats=all_stats, seconds=seconds)


# Rank 0: gather -> judge -> align -> write the files and the report ----------------------------


def _finish(hub: Hub, job: _Job, labeled: _Labeled, options: OptimizeOptions, notes: _Notes) -> OptimizeResult:
    """From the gathered chunks to the shard's targets and anchors files, and its report (not written yet)."""
    outputs = _gather(job, notes)
    started = time.perf_counter()
    judged = _judge(job.plan, outputs)
    pushed = pushed_shards(hub, job.repo, job.plan, job.shard, notes)
    choice = choose_reference(job.plan, job.shard, judged.anchors, pushed, notes)
    alignment = _align(job, judged, choice, notes)
    alignment_seconds = time.perf_counter() - started
    directory = result_directory(job.store.directory)
    files = directory / shard_prefix(job.shard)
    deviation = _precision_deviation(job, outputs, notes)
    header = _write_files(files, job, outputs, judged, alignment, deviation)
    run = RunSummary(participant=options.participant, batch_size=options.batch_size, workers=options.workers,
                     chunks=len(job.chunks.all), stats=labeled.stats, labeling_seconds=labeled.seconds,
                     alignment_seconds=alignment_seconds)
    report = build_report(job.repo, job.plan, job.prior, header, choice, outputs, run, files)
    return OptimizeResult(repo=job.repo, shard=job.shard, directory=directory, report=report, notes=notes.notes)


def _gather(job: _Job, notes: _Notes) -> JobOutputs:
    outputs = read_outputs(job.store, job.chunks, job.prior.output_dim)
    shard, anchors = outputs.shard, outputs.anchors
    if shard.ids.size == 0:
        raise BadImageError(f"No image of shard {job.shard} could be decoded.", ids=[int(i) for i in shard.bad_ids],
                            hint="Check the source's image column.")
    if anchors.ids.size < 2:
        raise BadImageError(f"Fewer than two anchor images could be decoded ({anchors.ids.size}).",
                            ids=[int(i) for i in anchors.bad_ids], hint="Check the source's image column.")
    if shard.bad_ids.size or anchors.bad_ids.size:
        notes.warn(f"Skipped {shard.bad_ids.size} undecodable image(s) of the shard and {anchors.bad_ids.size} of "
                   f"the anchors (ids recorded in the report; the shard's also in the header).")
    return outputs


@dataclass(frozen=True)
class _Judged:
    """The prior's outputs through the projection to the common size, and its uniformity V on the anchors."""

    raw: np.ndarray  # the shard's outputs, projected
    anchors: AnchorOutputs  # the anchors' outputs, native and projected, and the PCA basis (pca plans)
    uniformity: float  # in the common space
    uniformity_native: float


def _judge(plan: Plan, outputs: JobOutputs) -> _Judged:
    shard, anchors = outputs.shard, outputs.anchors
    basis = None
    if plan.projection_kind == "pca":
        # On this shard's own outputs, not the anchors: a basis of |S| rows would keep at most |S| axes.
        basis = fit_pca_basis(shard.features[sample_rows(shard.ids.size, PCA_FIT_ROWS, seed=plan.seed)], plan.dim)
    return _Judged(
        raw=project(plan, basis, shard.features),
        anchors=AnchorOutputs(ids=anchors.ids, features=anchors.features,
                              projected=project(plan, basis, anchors.features), basis=basis),
        uniformity=common_uniformity(anchors.features, plan.dim, t=plan.temperature),
        uniformity_native=uniformity(anchors.features, t=plan.temperature),
    )


def _align(job: _Job, judged: _Judged, choice: ReferenceChoice, notes: _Notes) -> Alignment:
    alignment = align_to_reference(choice.reference, judged.raw, judged.anchors)
    values = f"Uniformity V = {judged.uniformity:.4f} in the common space ({judged.uniformity_native:.4f} native)"
    reference, fit = alignment.reference, alignment.fit
    if reference is None:
        notes.say.info(f"{values}: the best prior pushed so far; this shard is its own reference.")
    else:
        notes.say.info(f"{values}; aligned to shard {reference.shard} (V = {choice.chosen.common_uniformity:.4f}, "
                       f"commit {reference.commit[:8]}) by {fit.method}: held-out residual {fit.cv_residual:.4f} "
                       f"(cosine {fit.cv_cosine:.4f}), in-sample {fit.residual:.4f}.")
        dims = min(job.plan.dim, job.prior.output_dim)  # the rank of the projected outputs
        if alignment.anchors < dims:
            notes.warn(f"Only {alignment.anchors} anchors shared with the reference for {dims} dimensions: the "
                       "alignment is under-determined and loses part of the reference's information (held-out "
                       f"residual {fit.cv_residual:.3f}). The platform should use more anchors per dimension, or a "
                       "smaller --dim.")
    if not np.isfinite(alignment.targets).all():
        raise PriorError("The aligned targets hold NaN or infinite values.",
                         hint="The reference's anchors or this prior's outputs are degenerate; try another prior.")
    return alignment


def _precision_deviation(job: _Job, outputs: JobOutputs, notes: _Notes) -> dict | None:
    """Below fp32: how far the stored anchor outputs are from an eager fp32 forward on the same images
    decoded by PIL, as verify encodes them (cosine distance over the first DEVIATION_ANCHORS anchors)."""
    prior = job.prior
    if prior.precision == "fp32":
        return None
    chunk = job.chunks.anchors[0]
    pixels, ids = prepare_pixels(prior, chunk.load()[:DEVIATION_ANCHORS], chunk.ids[:DEVIATION_ANCHORS])
    if pixels is None:
        return None
    reference = normalize(prior.encode_fp32(pixels).numpy())
    rows = {int(i): row for row, i in enumerate(outputs.anchors.ids)}
    stored = outputs.anchors.features[[rows[int(i)] for i in ids]]
    distance = np.clip(1.0 - np.sum(stored * reference, axis=1, dtype=np.float64), 0.0, 2.0)
    deviation = {"max_cosine_distance": float(distance.max()), "mean_cosine_distance": float(distance.mean()),
                 "anchors": int(ids.size)}
    tolerance = PRECISION_TOLERANCE.get(prior.precision)
    if tolerance is not None and deviation["max_cosine_distance"] > tolerance:
        notes.warn(f"At {prior.precision} the prior's anchor outputs are up to {distance.max():.4f} (cosine distance) "
                   f"from fp32, beyond the {tolerance} verify accepts: rerun with --precision fp32.")
    return deviation


def _write_files(files: Path, job: _Job, outputs: JobOutputs, judged: _Judged, alignment: Alignment,
                 deviation: dict | None) -> ShardHeader:
    """Write targets and anchors into `files`; the header returned carries their checksums."""
    plan, prior, shard = job.plan, job.prior, outputs.shard
    header = ShardHeader(
        shard=job.shard,
        plan_hash=plan.plan_hash,
        source_revision=plan.source_revision,
        prior=prior.spec.to_dict(),
        preprocessing=prior.preprocessing.to_dict(),
        fingerprint=prior.fingerprint,
        output_dim=prior.output_dim,
        dim=plan.dim,
        uniformity=judged.uniformity,
        reference=None if alignment.reference is None else alignment.reference.to_header(),
        residual=alignment.residual,
        num_rows=int(shard.ids.size),
        tool_version=__version__,
        checksums={},
        skipped_ids=sorted(int(i) for i in shard.bad_ids),
        schema_version=SCHEMA_VERSION,
        alignment=None if alignment.fit is None else alignment.fit.to_dict(),
        uniformity_native=judged.uniformity_native,
        projection=plan.projection_kind,
        precision=prior.precision,
        precision_deviation=deviation,
    )
    (files / REPORT_FILE).unlink(missing_ok=True)  # until the new report is written, no result is complete
    write_shard(files, ShardResult(header=header, ids=shard.ids, raw=judged.raw, aligned=alignment.targets),
                judged.anchors)
    return header
