"""Target quality on the participant's side, end to end on the embedded hub with priors that load
instantly (tests/fakes.py's pixel prior, and a noise prior registered here as a backend):

- the reference is chosen by V in the common space recomputed from every pushed shard's stored
  anchor outputs, and a prior whose outputs are noise is flagged and never silently chosen;
- the alignment is the one select_alignment chooses, recorded in the version 2 header and report;
- status shows the held-out residual and the noise flag; verify refits the declared alignment;
- a plan with the pca projection works from optimize through verify, status and merge.
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import PIXEL_MODEL, PixelPrior, RecordingProgress
from helpers_hub import publish_digit_rows

from coopt_hub.core.align import select_alignment, uniformity
from coopt_hub.core.layout import remote_paths, shard_branch, shard_prefix
from coopt_hub.core.quality import common_uniformity
from coopt_hub.core.shardfile import SCHEMA_VERSION, AnchorOutputs, ShardResult, read_shard, write_shard
from coopt_hub.hub.repo import read_manifest, read_shard_anchors
from coopt_hub.participant.job import OptimizeOptions, optimize_shard
from coopt_hub.platform.init import initialize
from coopt_hub.platform.merge.run import merge
from coopt_hub.platform.status import DONE, collaboration_status
from coopt_hub.platform.verify import CHECKS, FAILED, PASSED, PriorLoader, verify_shard
from coopt_hub.priors import Prior, PriorSpec, load_prior
from coopt_hub.priors.registry import register_backend, unregister_backend

NOISE_BACKEND = "noise"


class NoisePrior(PixelPrior):
    """Outputs that know nothing of the image: a Gaussian vector seeded by the image's pixels (the same
    image always gets the same vector, two images unrelated ones). Maximally uniform: the best V of all."""

    def __init__(self, spec: PriorSpec):
        super().__init__(spec)
        self.fingerprint = hashlib.sha256(b"noise" + self.fingerprint.encode()).hexdigest()

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        rows = [np.random.default_rng(list(hashlib.sha256(image.numpy().tobytes()).digest())).standard_normal(
            self.output_dim) for image in pixels]
        return torch.from_numpy(np.stack(rows)).float()


@pytest.fixture(scope="module")
def backends(fake_backends):
    """`--model pixel:net` and `--model noise:net` load as priors (verify loads them by name too)."""
    register_backend(NOISE_BACKEND, lambda spec, device="cpu", precision="fp32": NoisePrior(spec), replace=True)
    yield
    unregister_backend(NOISE_BACKEND)


def pixel(seed: int) -> Prior:
    return load_prior(PriorSpec(model=PIXEL_MODEL, seed=seed))


@pytest.fixture(scope="module")
def source(hub) -> str:
    # 480 rows in 12 row groups. 128 anchors: the pixel priors' anchors share ~0.23 of their 10 nearest
    # neighbours, three times chance (0.08), so only noise falls below the noise flag's 2x chance.
    return publish_digit_rows(hub, rows=480, rows_per_group=40, name="quality-digits")


def new_plan(hub, source: str, **settings):
    repo = f"org/quality-{uuid.uuid4().hex[:12]}"
    args = {"source": source, "source_revision": None, "split": "train", "image_column": "image", "shards": 3,
            "anchors": 128, "dim": 16, "seed": 0, "temperature": 2.0}
    return repo, initialize(hub, repo, **{**args, **settings}).plan


def push(hub, repo: str, shard: int, prior: Prior, workdir: Path, progress: RecordingProgress | None = None):
    return optimize_shard(hub, repo, shard, prior, workdir=workdir, progress=progress or RecordingProgress(),
                          options=OptimizeOptions(push=True))


@pytest.fixture(scope="module")
def with_noise(hub, source, backends, tmp_path_factory):
    """Shard 0 by the pixel prior (seed 0), shard 1 by the noise prior, then shard 2 by the pixel prior (seed 1)."""
    repo, plan = new_plan(hub, source)
    workdir = tmp_path_factory.mktemp("with-noise")
    progress = {k: RecordingProgress() for k in range(3)}
    results = {0: push(hub, repo, 0, pixel(0), workdir, progress[0]),
               1: push(hub, repo, 1, load_prior(PriorSpec(model=f"{NOISE_BACKEND}:net")), workdir, progress[1]),
               2: push(hub, repo, 2, pixel(1), workdir, progress[2])}
    return repo, plan, results, progress


def test_a_noise_prior_is_flagged_and_never_the_reference(with_noise):
    _, _, results, progress = with_noise
    report = results[2].report
    ranking = {p["name"]: p for p in report["ranking"]["priors"]}
    assert ranking[shard_branch(1)]["noise_like"], "the noise prior is not flagged"
    assert [p["name"] for p in report["ranking"]["priors"]][-1] == shard_branch(1), "noise is not ranked last"
    assert ranking[shard_branch(1)]["common_uniformity"] < ranking[shard_branch(0)]["common_uniformity"], \
        "noise should have the best V of all (it is what makes it dangerous)"
    assert not ranking[shard_branch(0)]["noise_like"] and not ranking[shard_branch(2)]["noise_like"], \
        "a pixel prior is flagged"
    assert report["reference"]["shard"] == 0, "shard 2 is not aligned to the best prior that is not noise"
    assert not report["noise_like"], "shard 2's own prior is flagged"
    # With only a pixel prior and noise pushed, nothing tells which is noise: said, not silent.
    assert any("look noise-like" in w for w in progress[1].warnings), progress[1].warnings


def test_the_ranking_is_recomputed_from_stored_outputs_not_reports(hub, with_noise):
    """Shard 2's report shows V and the flag as recomputed from the anchors files pushed, whatever the
    headers and reports of the other shards say."""
    repo, plan, results, _ = with_noise
    stored = {k: read_shard_anchors(hub, repo, plan, k, results[k].commit)[1] for k in range(3)}
    ranking = {p["name"]: p for p in results[2].report["ranking"]["priors"]}
    for k, anchors in stored.items():
        assert ranking[shard_branch(k)]["common_uniformity"] == pytest.approx(
            common_uniformity(anchors.features, plan.dim, t=plan.temperature), abs=1e-6), f"shard {k}: V"


def test_the_header_records_the_selected_alignment_and_both_uniformities(hub, with_noise):
    repo, plan, results, _ = with_noise
    ours, our_anchors = read_shard(results[2].directory / shard_prefix(2))
    _, best = read_shard_anchors(hub, repo, plan, 0, results[0].commit)
    fit = select_alignment(our_anchors.projected, best.projected)
    header = ours.header
    assert header.schema_version == SCHEMA_VERSION, "schema version"
    assert header.projection == "random", "projection"
    assert header.alignment == fit.to_dict(), "the header's alignment is not select_alignment's"
    assert header.residual == pytest.approx(fit.residual), "in-sample residual"
    assert 0 < header.cv_residual < 1, "held-out residual out of range"
    assert header.uniformity == pytest.approx(common_uniformity(our_anchors.features, plan.dim, t=2.0)), "V"
    assert header.uniformity_native == pytest.approx(uniformity(our_anchors.features, t=2.0)), "native V"
    np.testing.assert_allclose(ours.aligned.astype(np.float32), fit.apply(ours.raw.astype(np.float32)),
                               rtol=2e-2, atol=2e-3, err_msg="aligned targets are not raw @ T")
    report = results[2].report
    assert report["alignment"] == header.alignment, "report: alignment"
    assert report["uniformity_native"] == header.uniformity_native, "report: native V"
    assert results[0].report["alignment"] is None, "the first shard is its own reference: no fit"


def test_the_under_determined_warning_only_where_it_applies(with_noise):
    _, _, _, progress = with_noise
    # 128 anchors for 16 dimensions: no shard's fit is under-determined, and shard 0 fitted none.
    assert not any("under-determined" in w for p in progress.values() for w in p.warnings)


def test_status_shows_the_held_out_residual_and_the_noise_flag(hub, with_noise):
    repo, _, results, _ = with_noise
    status = collaboration_status(hub, repo)
    by_shard = {s.shard: s for s in status.shards}
    assert [s.state for s in status.shards] == [DONE] * 3, "states"
    assert status.best.shard == 0, "status takes the noise prior (best V) for the best"
    assert by_shard[1].noise_like, "status: the noise prior is not flagged"
    assert any("noise-like" in c for c in by_shard[1].concerns), by_shard[1].concerns
    assert by_shard[2].cv_residual == results[2].report["alignment"]["cv_residual"], "status: held-out residual"
    assert by_shard[2].concerns == (), by_shard[2].concerns
    document = status.to_dict()
    assert document["shards"][2]["cv_residual"] == by_shard[2].cv_residual, "to_dict: cv_residual"
    assert document["shards"][1]["noise_like"] is True, "to_dict: noise_like"
    assert "candidates" not in document["shards"][2]["alignment"], "to_dict: the alignment summary"
    assert document["ranking"]["reference"] == shard_branch(0), "to_dict: ranking"


def test_verify_refits_the_declared_alignment_and_its_held_out_residual(hub, with_noise):
    repo, plan, results, _ = with_noise
    priors = PriorLoader(keep=2)
    honest = verify_shard(hub, repo, plan, 2, sample=16, commit=results[2].commit, priors=priors)
    assert {c.name: c.status for c in honest.checks} == dict.fromkeys(CHECKS, PASSED), honest.problems()
    assert honest.cv_residual == pytest.approx(results[2].report["alignment"]["cv_residual"], abs=1e-9)
    assert "held-out residual recomputed" in honest.check("alignment").message

    files, anchors = read_shard(results[2].directory / shard_prefix(2))
    files.header.alignment = {**files.header.alignment, "cv_residual": files.header.cv_residual / 2}
    commit = _push_files(hub, repo, 2, files, anchors)
    claimed = verify_shard(hub, repo, plan, 2, sample=16, commit=commit, priors=priors)
    assert claimed.check("alignment").status == FAILED, claimed.check("alignment")
    assert "declared held-out residual" in claimed.check("alignment").message
    assert claimed.cv_residual_delta > 1e-3


def _push_files(hub, repo: str, shard: int, result: ShardResult, anchors: AnchorOutputs) -> str:
    from huggingface_hub import CommitOperationAdd

    result.header.checksums = {}
    with tempfile.TemporaryDirectory() as scratch:
        write_shard(Path(scratch), result, anchors)
        paths = remote_paths(shard)
        operations = [CommitOperationAdd(paths.targets, (Path(scratch) / "targets.safetensors").read_bytes()),
                      CommitOperationAdd(paths.anchors, (Path(scratch) / "anchors.safetensors").read_bytes())]
    return hub.commit(repo, shard_branch(shard), lambda head: operations, message="edited header")


# The pca projection ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pca(hub, source, backends, tmp_path_factory):
    """A pca plan: shard 0 by the pixel prior of seed 1, then shard 1 by the better one of seed 0 (lower
    V), which is its own reference; merge must re-align shard 0 to it from the stored files."""
    repo, plan = new_plan(hub, source, shards=2, projection="pca")
    workdir = tmp_path_factory.mktemp("pca")
    results = {0: push(hub, repo, 0, pixel(1), workdir), 1: push(hub, repo, 1, pixel(0), workdir)}
    return repo, plan, results


def test_a_pca_plan_stores_each_shards_basis_and_projects_through_it(pca):
    _, plan, results = pca
    assert plan.projection_kind == "pca"
    assert '"projection": "pca"' in plan.to_json()
    for k, result in results.items():
        files, anchors = read_shard(result.directory / shard_prefix(k))
        assert files.header.projection == "pca", f"shard {k}: header projection"
        assert anchors.basis is not None, f"shard {k}: no basis stored"
        assert anchors.basis.components.shape == (24, plan.dim), f"shard {k}: basis shape"
        np.testing.assert_allclose(anchors.projected, anchors.basis.project(anchors.features), rtol=1e-5, atol=1e-5,
                                   err_msg=f"shard {k}: projected anchors are not the basis' projection")
    assert results[1].report["reference"] is None, "the better prior is not its own reference"


def test_a_pca_collaboration_verifies_reports_and_merges(hub, pca):
    repo, plan, results = pca
    priors = PriorLoader(keep=2)
    for k, result in results.items():
        report = verify_shard(hub, repo, plan, k, sample=16, commit=result.commit, priors=priors)
        assert report.passed, (k, report.problems())
        assert "PCA basis" in report.check("anchors").message
    status = collaboration_status(hub, repo)
    assert [s.state for s in status.shards] == [DONE, DONE], [s.problems for s in status.shards]
    assert status.best.shard == 1, "status: the best prior"
    merged = merge(hub, repo)
    assert merged.created, "merge: nothing published"
    shards = {s.shard: s for s in read_manifest(hub, repo, "main").shards}
    assert shards[0].realigned, "merge: shard 0 was not re-aligned to the better prior"
    assert not shards[1].realigned, "merge: the reference was re-aligned"
