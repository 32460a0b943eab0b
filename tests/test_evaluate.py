"""`platform.evaluate`: target quality figures on fixtures whose answers are known, from arrays, from
local files, and from a merged version on the embedded hub (as `coopt-hub evaluate` reads it)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakes import LATENT_DIM, FakePrior, RecordingProgress
from safetensors.numpy import save_file

from coopt_hub.core.layout import MANIFEST_PATH
from coopt_hub.core.quality import knn_chance, sample_rows
from coopt_hub.errors import ConfigError, VerificationError
from coopt_hub.platform import evaluate as evaluate_module
from coopt_hub.platform.evaluate import (
    ProjectedAnchors,
    TargetSample,
    evaluate,
    measure_quality,
    read_target_sample,
)
from coopt_hub.platform.merge.run import merge

CLASSES = 10


def clustered(rows: int, dims: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn around one of CLASSES well-separated centres, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, rows)
    centres = 4.0 * rng.standard_normal((CLASSES, dims))
    return centres[labels] + rng.standard_normal((rows, dims)), labels


def rotation(dims: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dims, dims)))
    return q


# Known answers from arrays ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotated():
    """Three shards of one clustered latent, each shard's raw targets through its own rotation and
    its aligned targets the latent itself; anchors: 80 more rows of the latent, rotated per shard."""
    dims, shards = 16, 3
    latent, labels = clustered(900, dims, seed=1)
    anchor_latent, _ = clustered(80, dims, seed=1)
    shard_of = np.arange(latent.shape[0]) % shards
    rotations = [rotation(dims, seed=10 + k) for k in range(shards)]
    raw = np.concatenate([latent[shard_of == k] @ rotations[k] for k in range(shards)])
    order = np.concatenate([np.flatnonzero(shard_of == k) for k in range(shards)])
    sample = TargetSample(rows=latent.shape[0], ids=order, aligned=latent[order].astype(np.float32),
                          raw=raw.astype(np.float32), shards=shard_of[order], labels=labels[order])
    anchor_ids = np.arange(anchor_latent.shape[0])
    anchors = {k: ProjectedAnchors(anchor_ids, anchor_latent @ rotations[k]) for k in range(shards)}
    return measure_quality(sample, anchors, reference=0, label_column="label", progress=RecordingProgress())


def test_aligned_targets_of_one_space_probe_high_across_shards(rotated):
    aligned = rotated.aligned
    assert aligned.overall.probe > 0.95, "cross-validated probe of the aligned targets"
    assert aligned.overall.knn > 0.95, "k-NN accuracy of the aligned targets"
    assert aligned.leave_one_shard_out.accuracy > 0.95, "leave-one-shard-out probe of the aligned targets"
    assert set(aligned.shards) == {0, 1, 2}, "per-shard figures"
    assert all(scores.probe > 0.9 for scores in aligned.shards.values()), "per-shard probes"


def test_raw_targets_of_different_spaces_do_not_transfer_between_shards(rotated):
    raw = rotated.raw
    # Within a shard a rotation changes nothing a probe sees...
    assert all(scores.probe > 0.9 for scores in raw.shards.values()), "per-shard probes of the raw targets"
    # ...across shards the probe meets another space: near chance (0.1 with ten balanced classes).
    assert raw.leave_one_shard_out.accuracy < 0.4, "leave-one-shard-out probe of the raw targets"
    assert rotated.majority < 0.15, "the majority baseline of ten balanced classes"


def test_both_kinds_probed_side_by_side_give_the_figures_of_one_after_the_other():
    """measure_quality probes the aligned and the raw targets on two threads, one BLAS and one
    OpenMP thread each, on float16 targets as a merge stores them: the figures are those of each
    kind probed alone, and the process's thread limits are as they were."""
    from threadpoolctl import threadpool_info

    latent, labels = clustered(1200, 24, seed=3)
    shards = np.arange(latent.shape[0]) % 3
    aligned = latent.astype(np.float16)
    raw = np.concatenate([latent[shards == k] @ rotation(24, seed=20 + k) for k in range(3)]).astype(np.float16)
    order = np.concatenate([np.flatnonzero(shards == k) for k in range(3)])
    aligned, labels, shards = aligned[order], labels[order], shards[order]
    alone = [evaluate_module.target_scores(x, labels, shards, seed=0) for x in (aligned, raw)]
    limits = {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()}  # scikit-learn's loaded now
    both = evaluate_module._both_scores((aligned, raw), labels, shards, seed=0)
    assert {pool["filepath"]: pool["num_threads"] for pool in threadpool_info()} == limits
    assert [scores.to_dict() for scores in both] == [scores.to_dict() for scores in alone]
    assert both[0].leave_one_shard_out.accuracy > 0.95 > 0.4 > both[1].leave_one_shard_out.accuracy


_LATE_SCIKIT_LEARN = """
import json, sys
import numpy as np
from threadpoolctl import threadpool_info
from coopt_hub.platform import evaluate
assert "sklearn" not in sys.modules, "loaded by the probe, as in a merge"
seen, probe = [], evaluate.probe_scores

def recorded(*args):
    scores = probe(*args)
    seen.append([(pool["user_api"], pool["filepath"], pool["num_threads"]) for pool in threadpool_info()])
    return scores

evaluate.probe_scores = recorded
rng = np.random.default_rng(0)
x = rng.standard_normal((600, 8)).astype(np.float16)
evaluate._both_scores((x, x), rng.integers(0, 3, 600), np.arange(600) % 2, seed=0)
print(json.dumps(seen))
"""


def test_probes_side_by_side_run_one_blas_and_one_openmp_thread_each_when_scikit_learn_loads_late():
    """A merge loads scikit-learn only once it probes, and with it scipy's BLAS and an OpenMP
    runtime: the limit around the two probe threads covers those too (each part would otherwise
    run OpenMP and scipy's BLAS on as many threads as cores, two such parts on two cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}  # defaults above one
    completed = subprocess.run([sys.executable, "-c", _LATE_SCIKIT_LEARN], env=env, capture_output=True, text=True,
                               check=True)
    seen = json.loads(completed.stdout)
    assert len(seen) == 2 * 3, "each kind: two shards and all rows"
    pools = {(api, path) for part in seen for api, path, _ in part}
    assert {api for api, _ in pools} == {"blas", "openmp"}
    assert len([path for api, path in pools if api == "blas"]) >= 2, "numpy's BLAS and scipy's"
    assert all(threads == 1 for part in seen for _, _, threads in part), seen


def test_the_parts_over_all_rows_never_run_two_at_once(monkeypatch):
    """Both kinds' per-shard parts share two threads; the parts over (nearly) all rows, the largest
    in memory, run one at a time, and every part runs once."""
    import threading
    import time

    latent, labels = clustered(900, 16, seed=4)
    shards = np.arange(latent.shape[0]) % 3
    running, spans, lock = [], [], threading.Lock()

    def timed(call):
        def wrapper(x, *args):
            with lock:
                running.append(x.shape[0])
                spans.append(sorted(running))
            try:
                time.sleep(0.01)  # long enough for the other thread to start a part meanwhile
                return call(x, *args)
            finally:
                with lock:
                    running.remove(x.shape[0])
        return wrapper

    monkeypatch.setattr(evaluate_module, "probe_scores", timed(evaluate_module.probe_scores))
    monkeypatch.setattr(evaluate_module, "leave_one_group_out_probe", timed(evaluate_module.leave_one_group_out_probe))
    x = latent.astype(np.float16)
    evaluate_module._both_scores((x, x), labels, shards, seed=0)
    assert len(spans) == 2 * (3 + 2), "each kind: three shards, all rows, leave-one-shard-out"
    assert all(sum(rows == 900 for rows in span) <= 1 for span in spans)
    assert any(len(span) == 2 for span in spans), "two parts ran side by side"


def test_agreement_on_anchors_recovers_a_rotation(rotated):
    assert [a.shard for a in rotated.agreement] == [1, 2], "every shard but the reference"
    for agreement in rotated.agreement:
        assert agreement.anchors == 80
        assert agreement.cosine > 0.99, f"shard {agreement.shard}: held-out cosine"
        assert agreement.knn_overlap > 0.95, f"shard {agreement.shard}: held-out k-NN overlap"
        assert agreement.chance == pytest.approx(knn_chance(80, 10))


def test_agreements_two_at_a_time_are_those_of_one_after_the_other():
    rng = np.random.default_rng(6)
    latent, ids = rng.standard_normal((120, 8)), np.arange(120)
    anchors = {k: ProjectedAnchors(ids, latent @ rng.standard_normal((8, 24))
                                   + 0.1 * k * rng.standard_normal((120, 24)))
               for k in range(4)}
    fits = {1: evaluate_module.select_alignment(*evaluate_module.paired_anchors(anchors[1], anchors[2]), seed=0)}
    together = evaluate_module._agreements(anchors, 2, 0, fits)
    alone = [evaluate_module.anchor_agreement(anchors[k], anchors[2], k, 0, fits.get(k)) for k in (0, 1, 3)]
    assert [a.to_dict() for a in together] == [a.to_dict() for a in alone]
    assert [a.shard for a in together] == [0, 1, 3]


def test_unrelated_anchors_agree_at_chance():
    rng = np.random.default_rng(0)
    ids = np.arange(120)
    anchors = {0: ProjectedAnchors(ids, rng.standard_normal((120, 16))),
               1: ProjectedAnchors(ids, rng.standard_normal((120, 16)))}
    sample = TargetSample(rows=0, ids=np.zeros(0, np.int64), aligned=np.zeros((0, 16), np.float32),
                          raw=np.zeros((0, 16), np.float32), shards=np.zeros(0, np.int64), labels=None)
    quality = measure_quality(sample, anchors, reference=0, label_column=None, progress=RecordingProgress())
    assert quality.aligned is None and quality.raw is None, "label figures without labels"
    (agreement,) = quality.agreement
    assert agreement.cosine < 0.3, "held-out cosine of unrelated anchors"
    assert agreement.knn_overlap < 3 * agreement.chance, "held-out k-NN overlap of unrelated anchors"


def test_the_figures_are_json_ready(rotated):
    document = json.loads(json.dumps(rotated.to_dict()))
    assert document["aligned"]["leave_one_shard_out"]["groups"].keys() == {"0", "1", "2"}
    assert document["reference"] == 0
    assert [a["shard"] for a in document["agreement"]] == [1, 2]


def test_the_figures_tabulate_per_kind_and_shard(rotated):
    rows = rotated.probe_rows()
    assert [(row["targets"], row["scope"]) for row in rows] == [
        (kind, scope) for kind in ("aligned", "raw") for scope in ("all", "shard 0", "shard 1", "shard 2")]
    assert rows[0]["held_out"] == rotated.aligned.leave_one_shard_out.accuracy
    assert rows[5]["held_out"] == rotated.raw.leave_one_shard_out.groups["0"]
    assert rows[5]["probe"] == rotated.raw.shards[0].probe


# A sample read from files ------------------------------------------------------------------------


def _merged_files(directory, rows: int, dim: int = 4):
    """A merged targets file and its split as two parquet files, in id order; every 7th label null."""
    ids = np.arange(0, 2 * rows, 2, dtype=np.int64)  # ids need not be row numbers
    targets = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    save_file({"ids": ids, "targets": targets, "raw": -targets}, str(directory / "targets.safetensors"))
    labels = pa.array([None if i % 7 == 0 else int(i % 3) for i in range(rows)], pa.int64())
    table = pa.table({"id": ids, "target": pa.array(list(targets.astype(np.float32))), "shard": ids % 2,
                      "label": labels})
    half = rows // 2
    paths = [directory / "a.parquet", directory / "b.parquet"]
    pq.write_table(table.slice(0, half), paths[0])
    pq.write_table(table.slice(half), paths[1])
    return directory / "targets.safetensors", [functools.partial(open, path, "rb") for path in paths], targets


def test_a_sample_is_bounded_and_read_by_row(tmp_path, monkeypatch):
    targets_path, parquet, targets = _merged_files(tmp_path, rows=500)
    monkeypatch.setattr(evaluate_module, "MAX_PROBE_ROWS", 120)
    sample = read_target_sample(targets_path, parquet, "label")
    assert sample.rows == 500
    positions = sample.ids // 2
    drawn = sample_rows(500, 120, seed=0)
    assert np.array_equal(positions, drawn[drawn % 7 != 0]), "120 rows drawn, those without a label left out"
    assert np.array_equal(sample.aligned, targets[positions].astype(np.float32)), "aligned targets of the rows"
    assert np.array_equal(sample.raw, -targets[positions].astype(np.float32)), "raw targets of the rows"
    assert np.array_equal(sample.labels, positions % 3), "labels of the rows"
    assert np.array_equal(sample.shards, sample.ids % 2), "shards of the rows"


def test_a_missing_label_column_is_named(tmp_path):
    targets_path, parquet, _ = _merged_files(tmp_path, rows=20)
    with pytest.raises(ConfigError, match="no column 'class'.*id, target, shard, label"):
        read_target_sample(targets_path, parquet, "class")


# A merged version on the hub -----------------------------------------------------------------------

PRIORS = (FakePrior("alpha-net", output_dim=20, seed=1), FakePrior("beta-net", output_dim=28, seed=2),
          FakePrior("gamma-net", output_dim=36, seed=3))


@pytest.fixture(scope="module")
def published(hub, new_collaboration, digits_source):
    """Three priors of one latent clustered by the digit labels, each shard aligned to shard 0 by its
    participant; merged with the default evaluation."""
    import datasets

    collab = new_collaboration(digits_source, "digits-quality", shards=3, anchors=96, dim=16)
    labels = np.asarray(datasets.load_dataset(digits_source, split="train")["label"])
    centres = 3.0 * np.random.default_rng(5).standard_normal((CLASSES, LATENT_DIM))
    latent = centres[labels] + np.random.default_rng(6).standard_normal((labels.size, LATENT_DIM))
    collab = dataclasses.replace(collab, latent=latent)
    first = collab.push(0, PRIORS[0])
    for k in (1, 2):
        collab.push(k, PRIORS[k], reference=(0, PRIORS[0], first))
    return collab, merge(hub, collab.repo)


def test_evaluate_measures_a_published_version(hub, published):
    collab, result = published
    evaluation = evaluate(hub, collab.repo, "v1", progress=RecordingProgress())
    quality = evaluation.quality
    assert (evaluation.tag, evaluation.commit) == ("v1", result.commit)
    assert quality.label_column == "label" and quality.rows == collab.plan.num_rows
    assert quality.sampled == collab.plan.num_rows, "every row of a split below MAX_PROBE_ROWS"
    assert quality.aligned.overall.probe > 0.9, "aligned targets, all shards"
    assert quality.aligned.leave_one_shard_out.accuracy > 0.85, "aligned targets, leave one shard out"
    assert quality.raw.leave_one_shard_out.accuracy < 0.5, "raw targets of three priors, leave one shard out"
    assert quality.aligned.leave_one_shard_out.accuracy > quality.raw.leave_one_shard_out.accuracy + 0.3
    reference = result.manifest.reference.shard
    assert quality.reference == reference
    assert [a.shard for a in quality.agreement] == [k for k in range(3) if k != reference], \
        "agreement of every shard but the reference"
    assert all(a.knn_overlap > 3 * a.chance for a in quality.agreement), "held-out k-NN overlap above chance"


def test_merge_records_the_figures_evaluate_measures(hub, published):
    collab, _ = published
    recorded = json.loads(hub.download(collab.repo, MANIFEST_PATH, "v1").read_text())["quality"]
    measured = json.loads(json.dumps(evaluate(hub, collab.repo, "v1", progress=RecordingProgress()).quality.to_dict()))
    # The same rows of the same files through the same seeded figures: the same numbers.
    assert recorded == measured


def test_evaluate_refuses_an_unknown_column_or_version(hub, published):
    collab, _ = published
    with pytest.raises(ConfigError, match="no column 'digit'"):
        evaluate(hub, collab.repo, "v1", label_column="digit", progress=RecordingProgress())
    with pytest.raises(VerificationError, match="holds no merged version"):
        evaluate(hub, collab.repo, "v9", progress=RecordingProgress())

