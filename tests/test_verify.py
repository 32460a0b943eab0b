"""`verify` against the embedded hub with real random-init open_clip priors on the digits source.

Honest shards are made the way a participant makes them (tests/real_shards.py: prior outputs,
L2-normalised, projected with the plan's W, stored fp16, aligned to the reference on the anchors);
tampered ones start from an honest shard, are edited, rewritten with valid checksums and pushed to
the shard's branch, so only the recomputation can tell them apart.
"""

from __future__ import annotations

import json
import uuid
import warnings
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from real_shards import PRIOR_A, PRIOR_B, Pushed, RealCollaboration, label

from coopt_hub.cli import cli
from coopt_hub.core.align import AlignmentWarning, apply_alignment, fit_alignment
from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.shardfile import AnchorOutputs, ShardResult
from coopt_hub.errors import VerificationError
from coopt_hub.platform.init import initialize
from coopt_hub.platform.verify import (
    CHECKS,
    FAILED,
    MISSING,
    PASSED,
    SKIPPED,
    UNVERIFIABLE,
    PriorLoader,
    ShardVerification,
    failure_error,
    sample_ids,
    verify_repo,
)

# Every test here but one reads the module's collaboration, whose shards take about a minute to
# label and verify with real priors on two busy cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collab(hub, digits_source) -> RealCollaboration:
    """Shard 0 labeled with prior A (its own reference), shard 1 with prior B aligned to shard 0; 2-4 not pushed."""
    repo = f"org/digits-verify-{uuid.uuid4().hex[:8]}"
    plan = initialize(hub, repo, source=digits_source, source_revision=None, split="train", image_column="image",
                      shards=5, anchors=64, dim=16, seed=0, temperature=2.0).plan
    collab = RealCollaboration(hub, repo, plan, PriorLoader(keep=2), {})
    for shard, spec in ((0, PRIOR_A), (1, PRIOR_B)):
        result, anchors = label(collab, shard, spec, collab.shards.get(0))
        commit = collab.push(shard, result, anchors)
        # Read back as stored (fp16 targets), which is what tampering starts from.
        collab.shards[shard] = Pushed(shard, commit, *_stored(result, anchors))
    return collab


def _stored(result: ShardResult, anchors: AnchorOutputs) -> tuple[ShardResult, AnchorOutputs]:
    return replace(result, raw=result.raw.astype(np.float16), aligned=result.aligned.astype(np.float16)), anchors


def statuses(report: ShardVerification) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


@pytest.fixture(scope="module")
def honest(collab) -> dict[int, ShardVerification]:
    """The verification of each honest shard at the commit it was pushed at."""
    reports = {shard: collab.verify(shard, collab.shards[shard].commit) for shard in (0, 1)}
    for shard, report in reports.items():
        print(f"honest shard {shard}: targets {report.targets}, anchors {report.anchors}, aligned {report.aligned}, "
              f"dV {report.uniformity_delta}, dresidual {report.residual_delta}")
    return reports


@pytest.mark.parametrize("shard", [0, 1])
def test_an_honest_shard_passes_every_check(collab, honest, shard):
    report = honest[shard]
    assert report.status == PASSED, report.problems()
    assert report.passed, report.problems()
    assert statuses(report) == dict.fromkeys(CHECKS, PASSED)
    assert report.fingerprint == report.loaded_fingerprint == collab.shards[shard].result.header.fingerprint


@pytest.mark.parametrize("shard", [0, 1])
def test_an_honest_shard_has_every_figure(collab, honest, shard):
    report = honest[shard]
    assert report.targets.rows == 64, "targets: not every sampled row was re-encoded"
    assert report.targets.min_cosine > 0.9999, "targets: re-encoding differs"
    assert report.anchors.rows == len(collab.plan.anchor_ids), "anchors: not every anchor was re-encoded"
    assert report.anchors.min_cosine > 0.9999, "anchors: re-encoding differs"
    assert report.aligned.rows == len(collab.plan.shard_ids(shard)), "aligned: not every row was checked"
    assert report.aligned.min_cosine > 0.9999, "aligned: raw @ T differs"
    assert report.uniformity_delta < 1e-6, "uniformity: recomputed V differs"
    assert report.residual_delta < 1e-6, "alignment: recomputed residual differs"
    assert set(report.sample_ids) <= set(collab.plan.shard_ids(shard).tolist()), "sampled ids of another shard"


def test_a_shard_aligned_to_another_is_refitted_to_its_declared_reference(honest):
    assert "shard 0@" in honest[1].check("alignment").message


def test_honest_shards_make_no_failure(collab, honest):
    assert failure_error(list(honest.values()), collab.repo) is None


def test_files_in_hand_are_not_downloaded_again(collab, monkeypatch):
    honest = collab.shards[0]

    def no_shard_downloads(repo, path, revision, local_dir=None):
        assert not path.startswith("shards/0/"), path
        return original(repo, path, revision, local_dir)

    original = collab.hub.download
    monkeypatch.setattr(collab.hub, "download", no_shard_downloads)
    report = collab.verify(0, honest.commit, sample=8, files=(honest.result, honest.anchors))
    assert report.passed, report.problems()
    assert report.commit == honest.commit


def test_damaged_files_fail_and_nothing_else_is_checked(collab):
    from huggingface_hub import CommitOperationAdd

    paths = remote_paths(1)
    truncated = [CommitOperationAdd(paths.targets, b"not a safetensors file")]
    commit = collab.hub.commit(collab.repo, shard_branch(1), lambda head: truncated, message="damage")
    report = collab.verify(1, commit)
    assert report.status == FAILED
    assert report.check("files").status == FAILED
    assert {check.status for check in report.checks[1:]} == {SKIPPED}, "checks ran past damaged files"


def test_sample_is_seeded_and_stable():
    ids = np.arange(100, 600, dtype=np.int64)
    first = sample_ids(ids, 64, seed=0, shard=1)
    assert np.array_equal(first, sample_ids(ids, 64, seed=0, shard=1)), "the same seed drew another sample"
    assert np.all(np.diff(first) > 0), "the sample is not sorted and unique"
    assert not np.array_equal(first, sample_ids(ids, 64, seed=1, shard=1)), "another seed drew the same sample"
    assert not np.array_equal(first, sample_ids(ids, 64, seed=0, shard=2)), "another shard drew the same sample"
    assert np.array_equal(sample_ids(ids[:10], 64, seed=0, shard=1), ids[:10]), "a small shard is not taken whole"


def _shuffle_rows(result: ShardResult, anchors: AnchorOutputs) -> None:
    order = np.random.default_rng(0).permutation(len(result.ids))
    result.raw, result.aligned = result.raw[order], result.aligned[order]


def test_shuffled_targets_are_caught(collab):
    report = collab.verify(1, collab.tampered(1, _shuffle_rows))
    print(f"shuffled targets: {report.targets}")
    assert report.status == FAILED
    assert statuses(report) == {**dict.fromkeys(CHECKS, PASSED), "targets": FAILED}
    assert report.targets.min_cosine < 0.9
    assert "not the declared prior's outputs" in report.check("targets").message


def test_targets_of_another_model_than_declared_are_caught(collab):
    """Shard 1 was made with prior B; declaring prior A instead must not pass, however it is declared."""
    declared = collab.shards[0].result.header

    def claim_a(result: ShardResult, anchors: AnchorOutputs) -> None:
        result.header.prior, result.header.fingerprint = declared.prior, declared.fingerprint

    report = collab.verify(1, collab.tampered(1, claim_a))
    print(f"other model, declared as A: targets {report.targets}, anchors {report.anchors}")
    assert report.status == FAILED
    assert statuses(report) == {**dict.fromkeys(CHECKS, PASSED), "targets": FAILED, "anchors": FAILED}
    assert report.targets.min_cosine < 0.9
    assert report.anchors.min_cosine < 0.9

    def claim_a_keep_fingerprint(result: ShardResult, anchors: AnchorOutputs) -> None:
        result.header.prior = declared.prior

    report = collab.verify(1, collab.tampered(1, claim_a_keep_fingerprint))
    assert report.check("prior").status == FAILED
    assert "another model than declared" in report.check("prior").message
    assert report.loaded_fingerprint == declared.fingerprint != report.fingerprint


def test_slightly_noised_targets_are_caught(collab):
    """Noise of 7% of each row's norm, with aligned targets refitted to match: only re-encoding can tell."""
    honest = collab.shards[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlignmentWarning)
        transform, _ = fit_alignment(honest.anchors.projected, collab.shards[0].anchors.projected)

    def add_noise(result: ShardResult, anchors: AnchorOutputs) -> None:
        raw = result.raw.astype(np.float32)
        noise = np.random.default_rng(1).standard_normal(raw.shape).astype(np.float32)
        noise *= 0.07 * np.linalg.norm(raw, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
        result.raw = raw + noise
        result.aligned = apply_alignment(result.raw, transform)

    report = collab.verify(1, collab.tampered(1, add_noise))
    print(f"7% noise: targets {report.targets}, aligned {report.aligned}")
    assert report.status == FAILED
    assert statuses(report) == {**dict.fromkeys(CHECKS, PASSED), "targets": FAILED}
    assert 0.99 < report.targets.min_cosine < 0.999


def test_shuffled_aligned_targets_only_are_caught(collab):
    def shuffle_aligned(result: ShardResult, anchors: AnchorOutputs) -> None:
        result.aligned = result.aligned[np.random.default_rng(2).permutation(len(result.ids))]

    report = collab.verify(1, collab.tampered(1, shuffle_aligned))
    print(f"shuffled aligned: targets {report.targets}, aligned {report.aligned}")
    assert statuses(report) == {**dict.fromkeys(CHECKS, PASSED), "alignment": FAILED}
    assert report.aligned.min_cosine < 0.9
    assert report.targets.min_cosine > 0.9999
    assert "aligned targets are not raw @ T" in report.check("alignment").message


def test_declared_uniformity_and_residual_are_recomputed(collab):
    def flatter(result: ShardResult, anchors: AnchorOutputs) -> None:
        result.header.uniformity -= 0.05  # claims a better prior, to become everyone's reference
        result.header.residual /= 2

    report = collab.verify(1, collab.tampered(1, flatter), sample=8)
    assert statuses(report) == {**dict.fromkeys(CHECKS, PASSED), "uniformity": FAILED, "alignment": FAILED}
    assert report.uniformity_delta == pytest.approx(0.05, abs=1e-6)
    assert report.residual_delta > 1e-3
    assert "declared residual" in report.check("alignment").message


def test_unavailable_weights_cannot_verify_and_do_not_pass(collab):
    def private_checkpoint(result: ShardResult, anchors: AnchorOutputs) -> None:
        result.header.prior = {**result.header.prior, "checkpoint": "/home/participant/vit-s-32-finetuned.pt"}

    report = collab.verify(1, collab.tampered(1, private_checkpoint))
    assert report.status == UNVERIFIABLE
    assert not report.passed
    assert report.check("prior").message.startswith("cannot verify: weights unavailable")
    assert statuses(report) == {"files": PASSED, "prior": UNVERIFIABLE, "targets": UNVERIFIABLE,
                                "anchors": UNVERIFIABLE, "uniformity": PASSED, "alignment": PASSED}
    error = failure_error([report], collab.repo)
    assert isinstance(error, VerificationError)
    assert "--checkpoint-dir" in error.hint


def test_cli_prints_a_table_and_exits_0_when_shards_pass(collab):
    passing = CliRunner().invoke(cli, ["verify", collab.repo, "--shard", "0", "--sample", "16"])
    assert passing.exit_code == 0, passing.output
    assert "1 pass" in passing.stdout, passing.stdout
    assert "ViT-S-32 (random init, seed 0)" in passing.stdout, passing.stdout


def test_cli_json_and_exit_code_when_a_shard_fails(collab):
    tampered = collab.tampered(1, _shuffle_rows)  # now the head of shard/1
    failing = CliRunner().invoke(cli, ["verify", collab.repo, "--shard", "1", "--shard", "2", "--sample", "16",
                                       "--json"])
    assert failing.exit_code == 1, failing.output
    assert isinstance(failing.exception, VerificationError), failing.output
    assert "shard 1 fail (targets)" in str(failing.exception)
    document = json.loads(failing.stdout)
    by_shard = {entry["shard"]: entry for entry in document["shards"]}
    assert [by_shard[k]["status"] for k in (1, 2)] == [FAILED, MISSING]
    assert by_shard[1]["commit"] == tampered
    assert by_shard[1]["targets"]["min_cosine"] < 0.9
    assert document["passed"] is False
    assert document["thresholds"]["min_cosine"] == 0.999


def test_verify_repo_reports_unpushed_shards_as_missing(collab):
    results = verify_repo(collab.hub, collab.repo, shards=[2], priors=collab.priors)
    assert [(r.shard, r.status, r.checks) for r in results] == [(2, MISSING, [])]
