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


def own_targets(plan, features: np.ndarray) -> np.ndarray:
    """A single prior's targets over all rows: its outputs through the plan's projection (with "pca",
    a basis fitted on its own outputs, as a participant fits one on its shard)."""
    from coopt_hub.core.align import fit_pca_basis
    from coopt_hub.core.shardfile import project

    basis = fit_pca_basis(features, plan.dim) if plan.projection_kind == "pca" else None
    return project(plan, basis, features)


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
    from coopt_hub.core.quality import cv_probe_accuracy, leave_one_group_out_probe
    from coopt_hub.platform.evaluate import FOLDS, SEED

    plan, evaluation, methods = collaborate(seed, projection, ROOT / "work")
    quality = evaluation.quality
    if quality.sampled != plan.num_rows:
        raise SystemExit(f"evaluate probed {quality.sampled} of {plan.num_rows} rows: the single priors would "
                         "not be scored on the same rows.")
    shards = np.empty(plan.num_rows, dtype=np.int64)
    for k in range(plan.num_shards):
        shards[plan.shard_ids(k)] = k
    single = {}
    for model, features in native.items():
        # evaluate's own two figures (its per-shard ones are not needed here, and cost twice these)
        targets = own_targets(plan, features)
        single[model] = Scores(cv_probe_accuracy(targets, labels, folds=FOLDS, seed=SEED),
                               leave_one_group_out_probe(targets, labels, shards).accuracy)
    return SeedResult(
        seed=seed,
        aligned=Scores(quality.aligned.overall.probe, quality.aligned.leave_one_shard_out.accuracy),
        raw=Scores(quality.raw.overall.probe, quality.raw.leave_one_shard_out.accuracy),
        single=single, methods=methods,
    )


def report_seed(result: SeedResult) -> None:
    print(f"seed {result.seed} ({result.methods}):")
    print(f"  merged aligned   probe {result.aligned.mixed:.3f}  leave-one-shard-out {result.aligned.loso:.3f}")
    print(f"  merged unaligned probe {result.raw.mixed:.3f}  leave-one-shard-out {result.raw.loso:.3f}")
    for model, scores in result.single.items():
        print(f"  single {model:<13} probe {scores.mixed:.3f}  leave-one-shard-out {scores.loso:.3f}")


def summarise(results: list[SeedResult]) -> None:
    def mean(get) -> float:
        return float(np.mean([get(r) for r in results]))

    aligned = Scores(mean(lambda r: r.aligned.mixed), mean(lambda r: r.aligned.loso))
    raw = Scores(mean(lambda r: r.raw.mixed), mean(lambda r: r.raw.loso))
    single = {m: Scores(mean(lambda r: r.single[m].mixed), mean(lambda r: r.single[m].loso)) for m in PRIORS}
    best = max(single, key=lambda m: single[m].mixed)  # chosen by the mixed probe, scored on both
    print(f"\nmean over {len(results)} plan seed(s) {[r.seed for r in results]}:")
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
        summarise(results)
    finally:
        server.stop()
        shutil.rmtree(ROOT, ignore_errors=True)  # a hub, three runs' chunks and a merge per seed


if __name__ == "__main__":
    main()
