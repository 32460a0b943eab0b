"""A participant's job: label shard k with its prior, judge the prior on the anchors, align, publish.

    plan (main) -> chunks of shard k and of S -> labeling on every rank -> chunks gathered on rank 0
    -> raw targets f @ W -> uniformity V on S -> reference (the lowest V pushed so far, or itself)
    -> T_k fitted on S -> aligned targets -> targets/anchors/report files -> one commit to shard/{k}

Work lives under `{workdir}/{repo}/shard-{k}/{plan hash}-{prior fingerprint}-{settings}/`: a
different plan, prior or precision never reuses another's chunks, and a rerun of the same job only
computes what is missing.
Rank and world size come in through a `Collective`; only the command line reads a launcher's state.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from coopt_hub import __version__, errors
from coopt_hub.core.align import AlignmentWarning, apply_alignment, fit_alignment, uniformity
from coopt_hub.core.files import write_text_atomically
from coopt_hub.core.layout import ANCHORS_FILE, REPORT_FILE, TARGETS_FILE, shard_branch, shard_prefix
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import LogProgress, Progress, Silent
from coopt_hub.core.shardfile import (
    AnchorOutputs,
    ShardHeader,
    ShardResult,
    write_shard,
)
from coopt_hub.errors import BadImageError, ConflictError, PlanError, PriorError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import check_source_pin, load_anchors, load_plan, read_reference_anchors
from coopt_hub.hub.source import read_plan_unit
from coopt_hub.participant.collective import Collective, SingleProcess, agreed
from coopt_hub.participant.labeling import (
    ANCHOR_CHUNK_ROWS,
    Chunk,
    ChunkOutput,
    ChunkStore,
    LabelingStats,
    collect_chunks,
    label_chunks,
    rank_chunks,
)
from coopt_hub.participant.push import check_branch_owner, publish_result
from coopt_hub.participant.reference import find_reference
from coopt_hub.participant.workdir import LATEST_FILE, OptimizeResult, result_directory, run_directory, shard_workdir
from coopt_hub.priors import Prior

T = TypeVar("T")
BAD_IMAGE_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class OptimizeOptions:
    batch_size: int = 64
    workers: int = 4
    on_bad_image: str = "error"  # "error" | "skip"
    push: bool = False
    overwrite: bool = False
    progress: bool = False
    participant: str | None = None

    def __post_init__(self) -> None:
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise errors.ConfigError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}.")
        if self.batch_size < 1 or self.workers < 1:
            raise errors.ConfigError(
                f"--batch-size and --workers must be at least 1, got {self.batch_size} and {self.workers}."
            )






# Work directory layout --------------------------------------------------------------------------














# Agreement between ranks ------------------------------------------------------------------------






# Chunks ----------------------------------------------------------------------------------------


def job_chunks(
    plan: Plan, shard: int, anchors: Callable[[], Any], token: str | None = None
) -> tuple[list[Chunk], list[Chunk]]:
    """(shard chunks, anchor chunks): one per storage unit holding shard rows, and S in fixed slices.

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
    return shard_chunks, anchor_chunks


def _unit_loader(plan: Plan, unit, ids: np.ndarray, token: str | None) -> Callable[[], list[Any]]:
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


def _concat(outputs: Sequence[ChunkOutput], output_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, features, bad ids) of chunks in order; chunks are in id order, so ids stay sorted."""
    ids = np.concatenate([o.ids for o in outputs]) if outputs else np.zeros(0, np.int64)
    features = np.concatenate([o.features for o in outputs]) if outputs else np.zeros((0, output_dim), np.float32)
    bad = np.concatenate([o.bad_ids for o in outputs]) if outputs else np.zeros(0, np.int64)
    return ids, features, bad


# The job ---------------------------------------------------------------------------------------


def optimize_shard(
    hub: Hub,
    repo: str,
    shard: int,
    prior: Prior | Callable[[], Prior],
    *,
    workdir: Path,
    options: OptimizeOptions = OptimizeOptions(),
    collective: Collective = SingleProcess(),
    messages: Progress | None = None,
) -> OptimizeResult | None:
    """Label shard `shard` of `repo`'s plan with `prior`, align it, write it, and push it if asked.

    `prior` may be a function that loads the prior: it is then called after the plan has been
    checked, so a wrong shard number fails before a model is loaded. Every rank calls this with
    the same arguments; rank 0 returns the result, the other ranks None once their part is handed over.
    """
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    root = collective.rank == 0
    say = (messages or LogProgress()) if root else Silent()
    notes: list[str] = []

    def check_plan() -> Plan:
        plan = load_plan(hub, repo)
        plan.shard_ids(shard)  # PlanError when the shard does not exist
        if root:
            note = check_source_pin(plan, hub.token)
            if note:
                notes.append(note)
                say.info(note)
        return plan

    plan = agreed(collective, check_plan)
    hashes = collective.all_gather(plan.plan_hash)
    if len(set(hashes)) > 1:
        raise ConflictError(f"The plan of {repo} changed while the processes started.", hint="Rerun the command.")
    given = prior

    def check_prior() -> Prior:
        loaded = given if isinstance(given, Prior) else given()
        if root and options.push and not options.overwrite:
            # Before hours of encoding, not at the end: the branch may hold someone else's shard.
            check_branch_owner(hub, repo, shard, loaded.fingerprint)
        return loaded

    prior = agreed(collective, check_prior)

    run_dir = run_directory(workdir, repo, shard, plan, prior)
    store = ChunkStore(run_dir)
    shard_chunks, anchor_chunks = job_chunks(plan, shard, cache(lambda: load_anchors(hub, repo, plan)), hub.token)
    chunks = shard_chunks + anchor_chunks
    mine = rank_chunks(chunks, collective.rank, collective.world_size)
    say.info(f"Shard {shard} of {repo}: {len(plan.shard_ids(shard))} rows + {len(plan.anchor_ids)} anchors in "
             f"{len(chunks)} chunks, {collective.world_size} process(es); work in {run_dir}")

    labeling_started = time.perf_counter()
    stats = agreed(
        collective,
        lambda: label_chunks(
            prior, mine, store, batch_size=options.batch_size, workers=options.workers,
            stop_on_bad_image=options.on_bad_image == "error", progress=options.progress and root,
        ),
    )
    all_stats: list[LabelingStats] = collective.all_gather(stats)
    labeling_seconds = time.perf_counter() - labeling_started
    bad = sorted({i for s in all_stats for i in s.bad_ids})
    if bad and options.on_bad_image == "error":
        raise BadImageError(
            f"{len(bad)} image(s) of shard {shard} or the anchors cannot be decoded: ids {_id_list(bad)}.",
            ids=bad,
            hint="Fix those rows in the source, or rerun with --on-bad-image skip to leave them out "
            "(they are recorded in the report); finished chunks are kept.",
        )
    agreed(collective, lambda: collect_chunks(store, [c.name for c in chunks], collective))
    if not root:
        return None

    result = _finish(hub, repo, shard, plan, prior, store, shard_chunks, anchor_chunks, all_stats,
                     labeling_seconds, options, say)
    result.notes = notes + result.notes
    result.report["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    # The report goes last: its presence marks the result as complete.
    write_text_atomically(result.files[2], json.dumps(result.report, indent=2, sort_keys=True) + "\n")
    write_text_atomically(shard_workdir(workdir, repo, shard) / LATEST_FILE, run_dir.name + "\n")
    if options.push:
        result.commit, result.pushed = publish_result(hub, repo, shard, result.directory, options.overwrite, say)
    return result


def _finish(
    hub: Hub,
    repo: str,
    shard: int,
    plan: Plan,
    prior: Prior,
    store: ChunkStore,
    shard_chunks: list[Chunk],
    anchor_chunks: list[Chunk],
    all_stats: list[LabelingStats],
    labeling_seconds: float,
    options: OptimizeOptions,
    say: Progress,
) -> OptimizeResult:
    """Rank 0: from the gathered chunks to the three files of the shard."""
    ids, features, skipped = _concat([store.read(c.name) for c in shard_chunks], prior.output_dim)
    anchor_outputs = [store.read(c.name) for c in anchor_chunks]
    anchor_ids, anchor_features, skipped_anchors = _concat(anchor_outputs, prior.output_dim)
    if ids.size == 0:
        raise BadImageError(f"No image of shard {shard} could be decoded.", ids=[int(i) for i in skipped],
                            hint="Check the source's image column.")
    if anchor_ids.size < 2:
        raise BadImageError(f"Fewer than two anchor images could be decoded ({anchor_ids.size}).",
                            ids=[int(i) for i in skipped_anchors], hint="Check the source's image column.")
    notes: list[str] = []
    if skipped.size or skipped_anchors.size:
        note = (f"Skipped {skipped.size} undecodable image(s) of the shard and {skipped_anchors.size} of the "
                f"anchors (ids recorded in the report; the shard's also in the header).")
        notes.append(note)
        say.warn(note)

    images = sum(s.images for s in all_stats)
    aligning_started = time.perf_counter()
    projection = plan.projection(prior.output_dim)
    raw = features @ projection
    projected_anchors = anchor_features @ projection
    value = uniformity(anchor_features, t=plan.temperature)
    if anchor_ids.size < plan.dim:
        note = (f"Only {anchor_ids.size} anchors for {plan.dim} target dimensions: alignment to the reference is "
                "under-determined (ridge-regularised) and loses part of its information. The platform should "
                "use at least as many anchors as dimensions, or a smaller --dim.")
        notes.append(note)
        say.warn(note)
    reference = find_reference(hub, repo, plan, shard, value)
    if reference is None:
        aligned, residual = raw, 0.0
        say.info(f"Uniformity V = {value:.4f}: the best prior pushed so far; this shard is its own reference.")
    else:
        reference_ids, reference_projected = read_reference_anchors(
            hub, repo, plan, reference.shard, reference.commit, reference.fingerprint
        )
        common, own_rows, reference_rows = np.intersect1d(anchor_ids, reference_ids, return_indices=True)
        if common.size < 2:
            raise PlanError(f"Shard {reference.shard}'s anchors and this shard's share {common.size} decodable rows.",
                            hint="Both must have labeled the plan's anchors; check the source images.")
        with warnings.catch_warnings():
            # The under-determined case was reported above, in the participant's words.
            warnings.simplefilter("ignore", AlignmentWarning)
            transform, residual = fit_alignment(projected_anchors[own_rows], reference_projected[reference_rows])
        aligned = apply_alignment(raw, transform)
        say.info(f"Uniformity V = {value:.4f}; aligned to shard {reference.shard} (V = {reference.uniformity:.4f}, "
                 f"commit {reference.commit[:8]}), relative fit residual {residual:.4f}.")
    aligning_seconds = time.perf_counter() - aligning_started
    if not np.isfinite(aligned).all():
        raise PriorError("The aligned targets hold NaN or infinite values.",
                         hint="The reference's anchors or this prior's outputs are degenerate; try another prior.")

    header = ShardHeader(
        shard=shard,
        plan_hash=plan.plan_hash,
        source_revision=plan.source_revision,
        prior=prior.spec.to_dict(),
        preprocessing=prior.preprocessing.to_dict(),
        fingerprint=prior.fingerprint,
        output_dim=prior.output_dim,
        dim=plan.dim,
        uniformity=value,
        reference=None if reference is None else reference.to_header(),
        residual=float(residual),
        num_rows=int(ids.size),
        tool_version=__version__,
        checksums={},
        skipped_ids=sorted(int(i) for i in skipped),
    )
    directory = result_directory(store.directory)
    files = directory / shard_prefix(shard)
    (files / REPORT_FILE).unlink(missing_ok=True)  # until the new report is written, no result is complete
    write_shard(
        files,
        ShardResult(header=header, ids=ids, raw=raw, aligned=aligned),
        AnchorOutputs(ids=anchor_ids, features=anchor_features, projected=projected_anchors),
    )
    report = {
        "tool_version": __version__,
        "repo": repo,
        "shard": shard,
        "branch": shard_branch(shard),
        "participant": options.participant,
        "plan_hash": plan.plan_hash,
        "source": {"repo": plan.source_repo, "revision": plan.source_revision, "split": plan.split},
        "prior": header.prior,
        "preprocessing": header.preprocessing,
        "fingerprint": prior.fingerprint,
        "random_init": bool(prior.random_init),
        "output_dim": prior.output_dim,
        "dim": plan.dim,
        "uniformity": value,
        "temperature": plan.temperature,
        "reference": None if reference is None else {**reference.to_header(), "uniformity": reference.uniformity},
        "residual": float(residual),
        "counts": {
            "shard_rows": int(len(plan.shard_ids(shard))),
            "rows": int(ids.size),
            "anchors": len(plan.anchor_ids),
            "anchor_rows": int(anchor_ids.size),
            "skipped": int(skipped.size + skipped_anchors.size),
        },
        "skipped_ids": {"shard": [int(i) for i in skipped], "anchors": [int(i) for i in skipped_anchors]},
        "chunks": {
            "total": len(shard_chunks) + len(anchor_chunks),
            "computed": sum(len(s.computed) for s in all_stats),
            "reused": sum(len(s.reused) for s in all_stats),
        },
        "run": {"world_size": len(all_stats), "batch_size": options.batch_size, "workers": options.workers},
        "timings": {"labeling_s": round(labeling_seconds, 3), "alignment_s": round(aligning_seconds, 3)},
        "images_per_s": round(images / labeling_seconds, 2) if images and labeling_seconds > 0 else None,
        "checksums": header.checksums,
        "files": {name: _file_sha256(files / name) for name in (TARGETS_FILE, ANCHORS_FILE)},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return OptimizeResult(repo=repo, shard=shard, directory=directory, report=report, notes=notes)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _id_list(ids: Sequence[int], limit: int = 20) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


# The reference --------------------------------------------------------------------------------








# Publishing -----------------------------------------------------------------------------------






