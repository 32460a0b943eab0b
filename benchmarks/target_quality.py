"""How much of what its best prior knows the merged dataset keeps, measured without training.

The digits source published as the demo publishes it, on an embedded hub; for each plan seed:
`init` (3 shards, 150 anchors, dim 256), three participants with random-init open_clip priors of
different architectures and output sizes (the demo's, at its 64 px input), `merge`, then
`evaluate`: the fixed probe of core.quality (cross-validated over all rows, and leave-one-shard-out)
on the merged aligned targets and on the raw (unaligned) ones. The alignment is chosen by the
participants and merge on the anchors alone; labels only ever reach the probe.

Each single prior is scored the same way on its own targets over ALL rows: every row encoded by
that prior alone (same preprocessing, batch 64), projected to the common size as the plan projects
its outputs, and probed by the very functions evaluate uses, on the rows in the same (id) order and
with the same shard split, so folds and groups are those of the merged figures. A prior's features
do not depend on the plan (its random weights are seeded), so each prior encodes the rows once.

Then, clearly apart, offline refits on each seed's very inputs (the native features every prior
gave every row, the plan's shards and anchors, the same probe), computed with core.align's functions
rather than by the commands: every alignment variant (the old fixed ridge, the CV ridge, Procrustes,
reduced rank, and the method selected by CV on the anchors as the commands do), each with the plan's
random W and with per-shard PCA bases, against the unaligned targets and each prior alone under the
same projection; and, for the CV ridge and the selected method, a sweep of the anchor count (the
plan's 150, then more rows drawn offline) that says where the goals are reached.

    python benchmarks/target_quality.py            # 3 plan seeds
    python benchmarks/target_quality.py --quick    # 1 seed

Last line: `aligned/best-single leave-one-shard-out ratio: <x>` (goal >= 0.9; the mixed ratio's
goal is >= 0.95, and aligned must beat unaligned by >= 8 points).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(tempfile.mkdtemp(prefix="coopt-target-quality-bench-"))
SOURCE = "bench/digits"
PRIORS = ("ViT-S-32-alt", "ViT-S-16", "ViT-M-32")  # output sizes 256, 384, 512, as in the demo
IMAGE_SIZE = 64  # the demo's prior input size
BATCH = 64
SHARDS, ANCHORS, DIM = 3, 150, 256
GOALS = {"margin": 0.08, "mixed": 0.95, "loso": 0.9}


def start_server():
    """The hub, and the client environment set before huggingface_hub and datasets are imported."""
    from coopt_hub.server import HubServer

    server = HubServer(ROOT / "hub", tokens=["bench-token"]).start()
    os.environ.update(server.env())
    os.environ.update({"HF_HOME": str(ROOT / "hf-home"), "HF_DATASETS_CACHE": str(ROOT / "datasets-cache"),
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    return server


def load_prior(model: str):
    from coopt_hub.priors import PriorSpec, load_prior as load

    return load(PriorSpec(model=model, image_size=IMAGE_SIZE))


@dataclass(frozen=True)
class Scores:
    mixed: float  # the cross-validated probe over all rows
    loso: float  # the leave-one-shard-out probe


@dataclass(frozen=True)
class SeedResult:
    seed: int
    aligned: Scores
    raw: Scores
    single: dict[str, Scores]
    methods: str  # each shard's alignment as merge chose it
    offline: Offline

    @property
    def best(self) -> str:
        return max(self.single, key=lambda name: self.single[name].mixed)


def encode_all_rows(model: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the source's train split encoded by `model` alone (native features, row order), and the labels."""
    import datasets
    import torch

    rows = datasets.load_dataset(SOURCE, split="train")
    prior = load_prior(model)
    features = []
    for start in range(0, rows.num_rows, BATCH):
        batch = rows[start:start + BATCH]
        pixels = torch.stack([prior.preprocess(image.convert("RGB")) for image in batch["image"]])
        features.append(prior.encode_batch(pixels).numpy())
    return np.concatenate(features).astype(np.float32), np.asarray(rows["label"])


def own_targets(plan, projection: str, features: np.ndarray) -> np.ndarray:
    """A single prior's targets over all rows: its outputs through `projection` (with "pca", a basis
    fitted on its own outputs, as a participant fits one on its shard; "random", the plan's W)."""
    from coopt_hub.core.align import fit_pca_basis

    if projection == "pca":
        return fit_pca_basis(features, plan.dim).project(features)
    return features @ plan.projection(features.shape[1])


def collaborate(seed: int, projection: str, workdir: Path):
    """init, the three participants, merge and evaluate, as the demo runs them; (plan, evaluation, methods)."""
    from coopt_hub.core.progress import Silent
    from coopt_hub.hub.client import Hub
    from coopt_hub.participant.job import OptimizeOptions, optimize_shard
    from coopt_hub.platform.evaluate import evaluate
    from coopt_hub.platform.init import initialize
    from coopt_hub.platform.merge import merge

    hub, repo = Hub(), f"bench/digits-coopt-s{seed}"
    plan = initialize(hub, repo, source=SOURCE, source_revision=None, split="train", image_column="image",
                      shards=SHARDS, anchors=ANCHORS, dim=DIM, seed=seed, temperature=2.0, projection=projection,
                      progress=Silent()).plan
    for shard, model in enumerate(PRIORS):
        optimize_shard(hub, repo, shard, lambda model=model: load_prior(model), workdir=workdir,
                       options=OptimizeOptions(batch_size=BATCH, workers=2, push=True), progress=Silent())
    merged = merge(hub, repo, no_evaluate=True, progress=Silent())
    evaluation = evaluate(hub, repo, merged.tag, label_column="label", progress=Silent())
    methods = ", ".join(f"shard {s.shard}: {s.alignment['method'] if s.alignment else 'reference'}"
                        for s in merged.manifest.shards)
    return plan, evaluation, methods


def run_seed(seed: int, projection: str, native: dict[str, np.ndarray], labels: np.ndarray) -> SeedResult:
    plan, evaluation, methods = collaborate(seed, projection, ROOT / "work")
    quality = evaluation.quality
    if quality.sampled != plan.num_rows:
        raise SystemExit(f"evaluate probed {quality.sampled} of {plan.num_rows} rows: the single priors would "
                         "not be scored on the same rows.")
    shards = np.empty(plan.num_rows, dtype=np.int64)
    for k in range(plan.num_shards):
        shards[plan.shard_ids(k)] = k
    offline = refit_offline(Inputs(plan, native, labels, shards))
    return SeedResult(
        seed=seed,
        aligned=Scores(quality.aligned.overall.probe, quality.aligned.leave_one_shard_out.accuracy),
        raw=Scores(quality.raw.overall.probe, quality.raw.leave_one_shard_out.accuracy),
        # evaluate's own two figures on each prior alone (its per-shard ones are not needed here)
        single={model: offline.scores[(plan.projection_kind, f"single {model}", ANCHORS)] for model in PRIORS},
        methods=methods, offline=offline,
    )


# Offline refits ---------------------------------------------------------------------------------
# Every alignment variant on the very inputs of a seed's pipeline run: the native features each prior
# gave every row, the plan's shards and anchors, the same probe. Computed here with core.align's
# functions, not by the commands. As in the commands, each shard projects its own prior's outputs
# (the plan's W, or a PCA basis fitted on its shard) and is aligned on the anchors alone from its
# projected outputs to the reference's; the reference is the one rank_priors picks from the native
# anchor outputs (as merge does). Labels only ever reach the probe.
VARIANTS = {"fixed ridge": None, "CV ridge": ("ridge",), "Procrustes": ("procrustes",),
            "reduced rank": ("reduced_rank",), "selected by CV": "auto"}
PROJECTIONS = ("random", "pca")
# The plan's anchors, then more drawn offline from the other rows (seeded): where the goals are reached.
SWEEP_ANCHORS = (ANCHORS, 300, 450, 600)
SWEEP_VARIANTS = ("CV ridge", "selected by CV")
RANKING_NEIGHBOURS = 10  # as merge (platform/merge/reference.py)


@dataclass(frozen=True)
class Inputs:
    plan: object
    native: dict[str, np.ndarray]  # every row, each prior's native outputs
    labels: np.ndarray
    shards: np.ndarray  # the shard of every row


@dataclass(frozen=True)
class Offline:
    scores: dict[tuple[str, str, int], Scores]  # (projection, variant | "unaligned" | "single <prior>", anchors)
    chosen: dict[tuple[str, int], list[str]]  # (projection, anchors): the methods "selected by CV" chose


def refit_offline(inputs: Inputs) -> Offline:
    plan, scores, chosen = inputs.plan, {}, {}
    anchor_sets = sweep_anchors(plan)
    for projection in PROJECTIONS:
        spaces = shard_spaces(inputs, projection)
        for model in PRIORS:
            scores[(projection, f"single {model}", ANCHORS)] = probe(
                inputs, own_targets(plan, projection, inputs.native[model]))
        scores[(projection, "unaligned", ANCHORS)] = probe(inputs, merged_targets(inputs, spaces, None, 0, None)[0])
        for count, anchors in anchor_sets.items():
            reference = reference_shard(inputs, anchors)
            for variant in VARIANTS if count == ANCHORS else SWEEP_VARIANTS:
                targets, methods = merged_targets(inputs, spaces, anchors, reference, variant)
                scores[(projection, variant, count)] = probe(inputs, targets)
                if variant == "selected by CV":
                    chosen[(projection, count)] = methods
    return Offline(scores, chosen)


def sweep_anchors(plan) -> dict[int, np.ndarray]:
    base = np.asarray(plan.anchor_ids)
    if base.size != ANCHORS:
        raise SystemExit(f"The plan has {base.size} anchors, {ANCHORS} were asked for.")
    extra = np.random.default_rng(plan.seed).permutation(np.setdiff1d(np.arange(plan.num_rows), base))
    return {count: np.sort(np.concatenate([base, extra[:count - base.size]])) for count in SWEEP_ANCHORS}


def shard_spaces(inputs: Inputs, projection: str) -> list[np.ndarray]:
    """Per shard k, every row through shard k's prior and projection: the plan's W, or a basis fitted
    on shard k's rows as its participant fits one."""
    from coopt_hub.core.align import fit_pca_basis
    from coopt_hub.core.quality import sample_rows
    from coopt_hub.participant.job import PCA_FIT_ROWS

    plan, spaces = inputs.plan, []
    for k, model in enumerate(PRIORS):
        features = inputs.native[model]
        if projection == "pca":
            own = features[plan.shard_ids(k)]
            basis = fit_pca_basis(own[sample_rows(own.shape[0], PCA_FIT_ROWS, seed=plan.seed)], plan.dim)
            spaces.append(basis.project(features))
        else:
            spaces.append(features @ plan.projection(features.shape[1]))
    return spaces


def reference_shard(inputs: Inputs, anchors: np.ndarray) -> int:
    from coopt_hub.core.quality import rank_priors

    ranking = rank_priors({str(k): inputs.native[model][anchors] for k, model in enumerate(PRIORS)},
                          dim=inputs.plan.dim, t=inputs.plan.temperature, k=min(RANKING_NEIGHBOURS, anchors.size - 1))
    return int(ranking.reference if ranking.reference is not None else ranking.scores[0].name)


def merged_targets(inputs: Inputs, spaces: list[np.ndarray], anchors: np.ndarray | None, reference: int,
                   variant: str | None) -> tuple[np.ndarray, list[str]]:
    """Every shard's rows in its own projected space (variant None: unaligned), or mapped onto the
    reference's by `variant` fitted on the anchors; and the method of each map."""
    plan = inputs.plan
    merged, methods = np.empty((plan.num_rows, plan.dim), dtype=np.float32), []
    for k in range(plan.num_shards):
        rows = plan.shard_ids(k)
        if variant is None or k == reference:
            merged[rows] = spaces[k][rows]
            continue
        transform, method = fit_map(variant, spaces[k][anchors], spaces[reference][anchors])
        merged[rows] = spaces[k][rows] @ transform.astype(np.float32)
        methods.append(method)
    return merged, methods


def fit_map(variant: str, source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, str]:
    from coopt_hub.core.align import AlignmentWarning, fit_alignment, select_alignment

    if VARIANTS[variant] is None:  # the old default: a fixed fraction of the Gram scale, never validated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AlignmentWarning)
            return fit_alignment(source, target)[0], "ridge"
    fit = select_alignment(source, target, methods=VARIANTS[variant])
    return fit.transform, fit.method


def probe(inputs: Inputs, targets: np.ndarray) -> Scores:
    """evaluate's two figures: the fixed probe over all rows, and leave-one-shard-out."""
    from coopt_hub.core.quality import cv_probe_accuracy, leave_one_group_out_probe
    from coopt_hub.platform.evaluate import FOLDS, SEED

    return Scores(cv_probe_accuracy(targets, inputs.labels, folds=FOLDS, seed=SEED),
                  leave_one_group_out_probe(targets, inputs.labels, inputs.shards).accuracy)


# Reports ----------------------------------------------------------------------------------------


def report_seed(result: SeedResult) -> None:
    print(f"seed {result.seed} ({result.methods}):")
    print(f"  merged aligned   probe {result.aligned.mixed:.3f}  leave-one-shard-out {result.aligned.loso:.3f}")
    print(f"  merged unaligned probe {result.raw.mixed:.3f}  leave-one-shard-out {result.raw.loso:.3f}")
    for model, scores in result.single.items():
        print(f"  single {model:<13} probe {scores.mixed:.3f}  leave-one-shard-out {scores.loso:.3f}")


def mean_scores(scores: list[Scores]) -> Scores:
    return Scores(float(np.mean([s.mixed for s in scores])), float(np.mean([s.loso for s in scores])))


def goals(aligned: Scores, raw: Scores, best: Scores) -> tuple[float, float, float, bool]:
    """(margin over unaligned, mixed ratio, leave-one-shard-out ratio, every goal met)."""
    margin, mixed, loso = aligned.mixed - raw.mixed, aligned.mixed / best.mixed, aligned.loso / best.loso
    return margin, mixed, loso, margin >= GOALS["margin"] and mixed >= GOALS["mixed"] and loso >= GOALS["loso"]


def summarise_offline(results: list[SeedResult]) -> None:
    def mean(key) -> Scores:
        return mean_scores([r.offline.scores[key] for r in results])

    print(f"\noffline refits (core.align on each seed's native features, shards, anchors and probe; "
          f"mean over {len(results)} seed(s)); goals: margin >= {GOALS['margin']:.2f}, "
          f"mixed ratio >= {GOALS['mixed']}, leave-one-shard-out ratio >= {GOALS['loso']}")
    for projection in PROJECTIONS:
        single = {m: mean((projection, f"single {m}", ANCHORS)) for m in PRIORS}
        best = max(single, key=lambda m: single[m].mixed)
        raw = mean((projection, "unaligned", ANCHORS))
        print(f"projection {projection}: best single {best} probe {single[best].mixed:.3f}, leave-one-shard-out "
              f"{single[best].loso:.3f}; unaligned probe {raw.mixed:.3f}, leave-one-shard-out {raw.loso:.3f}")
        print(f"  {'variant':<15}{'anchors':>8}{'probe':>8}{'loso':>8}{'margin':>8}{'mixed/best':>11}"
              f"{'loso/best':>10}  goals")
        for variant in VARIANTS:
            for count in SWEEP_ANCHORS if variant in SWEEP_VARIANTS else (ANCHORS,):
                aligned = mean((projection, variant, count))
                margin, mixed, loso, met = goals(aligned, raw, single[best])
                print(f"  {variant:<15}{count:>8}{aligned.mixed:>8.3f}{aligned.loso:>8.3f}{margin:>8.3f}"
                      f"{mixed:>11.3f}{loso:>10.3f}  {'all met' if met else 'not met'}")
        for variant in SWEEP_VARIANTS:
            reached = [c for c in SWEEP_ANCHORS if goals(mean((projection, variant, c)), raw, single[best])[3]]
            print(f"  {variant}: every goal {f'reached at {reached[0]} anchors' if reached else 'not reached'} "
                  f"(of {', '.join(map(str, SWEEP_ANCHORS))})")
        for count in SWEEP_ANCHORS:
            methods = Counter(m for r in results for m in r.offline.chosen[(projection, count)])
            print(f"  selected by CV at {count} anchors chose: "
                  + ", ".join(f"{method} x{n}" for method, n in methods.most_common()))


def summarise(results: list[SeedResult]) -> None:
    aligned = mean_scores([r.aligned for r in results])
    raw = mean_scores([r.raw for r in results])
    single = {m: mean_scores([r.single[m] for r in results]) for m in PRIORS}
    best = max(single, key=lambda m: single[m].mixed)  # chosen by the mixed probe, scored on both
    print(f"\nthe commands (init, optimize, merge, evaluate): mean over {len(results)} plan seed(s) "
          f"{[r.seed for r in results]}:")
    print(f"merged aligned:   probe {aligned.mixed:.3f}, leave-one-shard-out {aligned.loso:.3f}")
    print(f"merged unaligned: probe {raw.mixed:.3f}, leave-one-shard-out {raw.loso:.3f}")
    for model, scores in single.items():
        print(f"single {model}: probe {scores.mixed:.3f}, leave-one-shard-out {scores.loso:.3f}")
    print(f"best single prior: {best} (probe {single[best].mixed:.3f}, "
          f"leave-one-shard-out {single[best].loso:.3f})")
    margin = aligned.mixed >= raw.mixed + GOALS["margin"]
    print(f"merged aligned >= unaligned + 8 points: {'yes' if margin else 'no'} "
          f"({aligned.mixed:.3f} vs {raw.mixed:.3f})")
    print(f"aligned/best-single mixed ratio: {aligned.mixed / single[best].mixed:.3f} (goal >= {GOALS['mixed']})")
    print(f"aligned/best-single leave-one-shard-out ratio: {aligned.loso / single[best].loso:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="plan seeds to average over")
    parser.add_argument("--quick", action="store_true", help="one plan seed (the first of --seeds)")
    parser.add_argument("--projection", choices=("random", "pca"), default="random",
                        help="init --projection of every plan (the single priors are projected alike)")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    server = start_server()
    try:
        from coopt_hub.demo.sample_data import publish_digits

        started = time.perf_counter()
        publish_digits(SOURCE, token="bench-token")
        native = {}
        for model in PRIORS:
            native[model], labels = encode_all_rows(model)
        print(f"digits train split: {labels.size} rows; {SHARDS} shards, {ANCHORS} anchors, dim {DIM}, "
              f"projection {args.projection}; priors {', '.join(f'{m} ({f.shape[1]})' for m, f in native.items())} "
              f"at {IMAGE_SIZE} px, random init; encoded in {time.perf_counter() - started:.1f}s")
        results = []
        for seed in seeds:
            started = time.perf_counter()
            results.append(run_seed(seed, args.projection, native, labels))
            report_seed(results[-1])
            print(f"  ({time.perf_counter() - started:.1f}s)")
        summarise_offline(results)
        summarise(results)
    finally:
        server.stop()
        shutil.rmtree(ROOT, ignore_errors=True)  # a hub, three runs' chunks and a merge per seed


if __name__ == "__main__":
    main()
