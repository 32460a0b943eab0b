"""`merge` against the embedded hub, read back with the real `datasets` and safetensors clients."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers_hub import Collaboration, FakePrior, skipping

from coopt_hub.core.align import select_alignment
from coopt_hub.core.halves import to_float16, to_float32
from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_FILE, TARGETS_PATH
from coopt_hub.core.manifest import next_tag
from coopt_hub.core.plan import Unit, make_plan
from coopt_hub.core.shardfile import ExpectedIds, ShardRows, TensorFile, expected_ids
from coopt_hub.errors import ConflictError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.merge import parquet as merge_module
from coopt_hub.platform.merge.commit import MergeResult
from coopt_hub.platform.merge.run import merge
from coopt_hub.platform.merge.targets import (
    IdLayout,
    ReusedBuffers,
    _aligned,
    _Maps,
    _Realignment,
    _side_by_side,
    write_at,
)

# Worse to better: fewer latent dimensions seen means a more collapsed prior and a higher V.
WEAK = FakePrior("weak-net", output_dim=20, rank=6)
MID = FakePrior("mid-net", output_dim=28, rank=12)
GOOD = FakePrior("good-net", output_dim=40, rank=18)
BEST = FakePrior("best-net", output_dim=48, rank=24)


def new_digits_collaboration(new_collaboration, digits_source) -> Collaboration:
    return new_collaboration(digits_source, "digits-coopt", shards=3, anchors=96, dim=16)


@pytest.fixture
def collab(new_collaboration, digits_source) -> Collaboration:
    return new_digits_collaboration(new_collaboration, digits_source)


def push_all(collab: Collaboration) -> dict[int, str]:
    """Shard 0 pushes first with the best prior so far; the others align to it."""
    first = collab.push(0, GOOD)
    return {
        0: first,
        1: collab.push(1, WEAK, reference=(0, GOOD, first)),
        2: collab.push(2, MID, reference=(0, GOOD, first)),
    }


def load(repo: str, revision: str, **kwargs):
    import datasets

    return datasets.load_dataset(repo, revision=revision, **kwargs)


def read_targets(hub: Hub, repo: str, revision: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(hub.download(repo, TARGETS_PATH, revision))


def source_labels(source: str) -> dict[str, np.ndarray]:
    data = load(source, "main")
    return {split: np.asarray(data[split]["label"]) for split in data}


# One complete merge, read back every way a user reads it ------------------------------------------


@dataclass
class Published:
    collab: Collaboration
    commits: dict[int, str]  # shard -> the commit pushed
    result: MergeResult


@pytest.fixture(scope="module")
def published(hub, new_collaboration, digits_source) -> Published:
    """Every shard pushed, shard 0 with the best prior, then merged once."""
    collab = new_digits_collaboration(new_collaboration, digits_source)
    commits = push_all(collab)
    return Published(collab, commits, merge(hub, collab.repo))


@pytest.fixture(scope="module")
def v1(published):
    """The published merge, loaded at its tag with `datasets`."""
    return load(published.collab.repo, "v1")


@pytest.fixture(scope="module")
def v1_train(v1) -> dict[str, np.ndarray]:
    return v1["train"].with_format("numpy")[:]


def test_the_first_merge_creates_v1(published):
    assert (published.result.tag, published.result.created) == ("v1", True)


def test_the_train_split_holds_every_row_with_its_image_and_target(published, v1, v1_train):
    plan, train = published.collab.plan, v1["train"]
    assert train.num_rows == plan.num_rows
    assert train.column_names == ["id", "image", "target", "shard", "label"]
    assert train[0]["image"].mode == "RGB"
    assert train[0]["image"].size == (16, 16)
    assert v1_train["target"].dtype == np.float32
    assert v1_train["target"].shape == (plan.num_rows, plan.dim)


def test_targets_are_stored_byte_stream_split_with_zstd_and_the_rest_with_snappy(hub, published):
    """The target column's pages are byte-stream-split float32s (widened float16s: their low bytes are
    zeros, which zstd removes), without statistics; every other column keeps pyarrow's defaults,
    dictionary, snappy and statistics."""
    from huggingface_hub import hf_hub_download

    repo, manifest = published.collab.repo, published.result.manifest
    path = hf_hub_download(repo, manifest.splits["train"].files[0], repo_type="dataset", revision=manifest.tag)
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema.split(".")[0]: group.column(i) for i in range(group.num_columns)}
    assert columns["target"].compression == "ZSTD"
    assert "BYTE_STREAM_SPLIT" in columns["target"].encodings
    assert "RLE_DICTIONARY" not in columns["target"].encodings
    assert "RLE_DICTIONARY" in columns["id"].encodings
    assert {name: c.compression for name, c in columns.items() if name != "target"} == \
        dict.fromkeys(set(columns) - {"target"}, "SNAPPY")
    assert not columns["target"].is_stats_set, "the targets have statistics"
    assert columns["id"].is_stats_set and columns["id"].statistics.min == 0, "the ids lost their statistics"


def test_rows_keep_their_ids_shards_and_labels(published, digits_source, v1_train):
    plan = published.collab.plan
    assert np.array_equal(v1_train["id"], np.arange(plan.num_rows)), "ids"
    for k in range(3):
        assert np.array_equal(np.flatnonzero(v1_train["shard"] == k), plan.shard_ids(k)), f"rows of shard {k}"
    assert np.array_equal(v1_train["label"], source_labels(digits_source)["train"]), "labels"


def test_the_test_split_is_the_sources_without_targets(digits_source, v1):
    test = v1["test"]
    assert test.num_rows > 0
    assert np.array_equal(np.asarray(test["label"]), source_labels(digits_source)["test"])
    assert test[0]["target"] is None


def test_targets_are_the_participants_own_bit_for_bit(hub, published, v1_train):
    # The reference (lowest V) is shard 0, to which the others aligned: nothing is re-aligned and
    # the targets are the participants' own, bit for bit (fp16) in safetensors and as float32 in parquet.
    collab, plan = published.collab, published.collab.plan
    stored = read_targets(hub, collab.repo, "v1")
    assert np.array_equal(stored["ids"], np.arange(plan.num_rows)), "ids"
    assert stored["targets"].dtype == np.float16
    assert np.array_equal(stored["targets"].astype(np.float32), v1_train["target"]), "safetensors and parquet differ"
    for k, prior in ((0, GOOD), (1, WEAK), (2, MID)):
        ids = plan.shard_ids(k)
        _, raw = collab.projected(prior, ids)
        assert np.allclose(stored["raw"][ids], raw, atol=2e-3), f"raw targets of shard {k}"


def test_the_manifest_records_source_reference_and_shards(hub, published, digits_source):
    collab, plan = published.collab, published.collab.plan
    manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, "v1").read_text())
    assert manifest["tag"] == "v1"
    assert manifest["images"] == "copy"
    assert manifest["dim"] == plan.dim
    assert manifest["label_column"] == "label"
    assert manifest["plan_hash"] == plan.plan_hash
    assert manifest["source"] == {
        "repo": digits_source, "revision": plan.source_revision, "split": "train", "image_column": "image"
    }
    assert manifest["reference"]["shard"] == 0
    assert not manifest["partial"]
    assert {s["shard"]: s["commit"] for s in manifest["shards"]} == published.commits
    assert not any(s["realigned"] for s in manifest["shards"])
    assert set(manifest["splits"]) == {"train", "test"}


def test_the_card_says_how_to_load_and_train(hub, published):
    repo = published.collab.repo
    card = hub.download(repo, "README.md", "v1").read_text()
    assert "license: cc-by-4.0" in card
    assert "length: 16" in card
    assert f'load_dataset("{repo}", revision="v1")' in card
    assert f"accelerate launch recipes/train_from_hub.py --dataset {repo} --revision v1 --arch resnet18" in card
    assert "coopt/plan.json" in hub.list_files(repo, "v1")


def test_the_anchors_load_as_their_own_config(published):
    anchors = load(published.collab.repo, "v1", name="anchors")["anchors"]
    assert anchors.num_rows == len(published.collab.plan.anchor_ids)


def test_the_merge_streams(published):
    streamed = load(published.collab.repo, "v1", streaming=True)["train"]
    first = next(iter(streamed))
    assert first["id"] == 0
    assert len(first["target"]) == published.collab.plan.dim
    assert first["image"].mode == "RGB"


def test_a_large_split_is_written_in_parts_side_by_side_with_the_same_rows(hub, collab, published, v1_train,
                                                                          monkeypatch):
    """Parts (made here for a small split) are read, joined and encoded on threads of their own;
    the dataset reads back row for row as the one-part merge of the same shards."""
    monkeypatch.setattr(merge_module, "PART_MIN_BYTES", 0)
    push_all(collab)
    result = merge(hub, collab.repo)
    train_files = result.manifest.splits["train"].files
    assert len(train_files) == merge_module.PARTS, train_files
    assert train_files == tuple(f"data/train-{i:05d}-of-{len(train_files):05d}.parquet" for i in range(len(train_files)))
    train = load(collab.repo, result.tag)["train"].with_format("numpy")[:]
    for column in ("id", "shard", "label", "target"):
        assert np.array_equal(train[column], v1_train[column]), column


def test_a_rerun_changes_nothing_and_an_existing_tag_is_refused_before_writing(hub, published):
    repo = published.collab.repo
    head = hub.head(repo)
    again = merge(hub, repo)
    assert (again.tag, again.created, hub.head(repo)) == ("v1", False, head), "the rerun made a new version"
    with pytest.raises(ConflictError, match="v1 already exists"):
        merge(hub, repo, tag="v1", images="reference")
    assert hub.head(repo) == head, "the refused merge moved main"


# More versions, bad shards, concurrent merges ------------------------------------------------------


def test_partial_then_better_prior_makes_v2_and_v1_still_loads(hub, collab, monkeypatch):
    plan = collab.plan
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first))
    head = hub.head(collab.repo)
    with pytest.raises(VerificationError, match=r"Shard\(s\) 2 .* not been pushed"):
        merge(hub, collab.repo)
    assert hub.head(collab.repo) == head

    monkeypatch.setattr(merge_module, "FILE_BYTES", 20_000)  # several files, to see v2 delete them
    partial = merge(hub, collab.repo, allow_partial=True)
    monkeypatch.undo()
    assert partial.tag == "v1", "partial merge: not v1"
    assert partial.manifest.partial, "partial merge: the manifest does not say partial"
    assert partial.manifest.missing == (2,), "partial merge: the manifest does not say shard 2 is missing"
    v1_files = [f for f in hub.list_files(collab.repo, "v1") if f.startswith("data/train-")]
    assert len(v1_files) > 1, "partial merge: one train file, though FILE_BYTES asks for several"
    v1_card = hub.download(collab.repo, "README.md", "v1").read_text()
    assert "**Partial merge**: shard 2 had not been pushed" in v1_card, "partial merge: the card does not say so"
    v1 = load(collab.repo, "v1")["train"].with_format("numpy")[:]
    present = np.sort(np.concatenate([plan.shard_ids(0), plan.shard_ids(1)]))
    assert np.array_equal(v1["id"], present), "partial merge: not the rows of shards 0 and 1"

    # A late participant brings a better prior: v2 re-aligns shards 0 and 1 to it without re-labeling.
    collab.push(2, BEST)
    assert collab.uniformity(BEST) < min(collab.uniformity(p) for p in (GOOD, WEAK)), "BEST is not the lowest V"
    result = merge(hub, collab.repo)
    assert result.tag == "v2", "full merge: not v2"
    assert result.manifest.reference.shard == 2, "full merge: the reference is not the better prior's shard"
    assert not result.manifest.partial, "full merge: the manifest says partial"
    realigned = {s.shard: s for s in result.manifest.shards if s.realigned}
    assert set(realigned) == {0, 1}, "full merge: not exactly shards 0 and 1 re-aligned"
    # Shard 2, which needs no map, merged beside shards 0 and 1 (two lanes); the manifest keeps shard order.
    assert [s.shard for s in result.manifest.shards] == [0, 1, 2], "full merge: the manifest's shards out of order"
    anchor_ids = np.asarray(plan.anchor_ids)
    v2 = load(collab.repo, "v2")["train"].with_format("numpy")[:]
    assert np.array_equal(v2["id"], np.arange(plan.num_rows)), "full merge: rows missing"
    for k, prior in ((0, GOOD), (1, WEAK)):
        # Re-aligned by the map chosen on held-out anchors, recorded with both residuals.
        fit = select_alignment(collab.projected(prior, anchor_ids)[1], collab.projected(BEST, anchor_ids)[1])
        assert realigned[k].realigned_residual == pytest.approx(fit.residual, rel=1e-6), f"residual of shard {k}"
        assert realigned[k].alignment["cv_residual"] == pytest.approx(fit.cv_residual, rel=1e-6), \
            f"held-out residual of shard {k}"
        expected = fit.apply(collab.projected(prior, plan.shard_ids(k))[1])
        assert np.allclose(v2["target"][plan.shard_ids(k)], expected, atol=2e-2), f"re-aligned targets of shard {k}"
    card = hub.download(collab.repo, "README.md", "v2").read_text()
    assert "Shards 0, 1 had been aligned to another reference by their participants" in card, \
        "full merge: the card does not say which shards were re-aligned"
    assert "Partial" not in card, "full merge: the card says partial"
    assert [f for f in hub.list_files(collab.repo, "v2") if f.startswith("data/train-")] == [
        "data/train-00000-of-00001.parquet"
    ], "full merge: v1's train files were not replaced"

    # v1 still loads exactly its own data.
    again = load(collab.repo, "v1")["train"].with_format("numpy")[:]
    assert np.array_equal(again["id"], v1["id"]), "v1 after v2: other ids"
    assert np.array_equal(again["target"], v1["target"]), "v1 after v2: other targets"


def _flip_raw_byte(directory):
    path = directory / TARGETS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes, past the header
    path.write_bytes(bytes(data))


def _duplicate_an_id(result, anchors):
    """Claim one id of a neighbouring shard instead of one of its own (still sorted and unique)."""
    ids = result.ids.copy()
    if ids[0] > 0:
        ids[0] -= 1
    else:
        ids[-1] += 1
    result.ids = ids


def _other_plan(result, anchors):
    result.header.plan_hash = "0" * 64


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"tamper": _flip_raw_byte}, r"Shard 1 .*does not match its checksum"),
        ({"edit": _duplicate_an_id}, r"Shard 1 .*not the plan's ids"),
        ({"edit": _other_plan}, r"shard 1 .*made for plan 000000000000"),
    ],
    ids=["tampered-file", "duplicate-id", "mismatched-plan"],
)
def test_a_bad_shard_is_refused_and_main_untouched(hub, collab, damage, message):
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first), **damage)
    collab.push(2, MID, reference=(0, GOOD, first))
    head = hub.head(collab.repo)
    with pytest.raises(VerificationError, match=message):
        merge(hub, collab.repo)
    assert hub.head(collab.repo) == head, "main moved"
    assert hub.refs(collab.repo)[1] == {}, "a tag was made"


def _merge_concurrently(hub: Hub, repo: str, modes: tuple[str, str]) -> list:
    results, errors = [], []

    def run(images: str) -> None:
        try:
            results.append(merge(hub, repo, images=images))
        except ConflictError as err:  # a clean refusal is acceptable; a half-written main is not
            errors.append(err)

    threads = [threading.Thread(target=run, args=(images,)) for images in modes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results, f"every merge was refused: {errors}"
    assert len(results) + len(errors) == 2, "a merge neither finished nor was refused"
    return results


def test_concurrent_identical_merges_make_one_version(hub, collab):
    push_all(collab)
    results = _merge_concurrently(hub, collab.repo, ("copy", "copy"))
    _, tags = hub.refs(collab.repo)
    assert set(tags) == {"v1"}
    assert tags["v1"] == hub.head(collab.repo), "v1 is not main"
    assert [result.tag for result in results] == ["v1"] * len(results)
    assert [result.commit for result in results] == [tags["v1"]] * len(results)
    assert load(collab.repo, "v1")["train"].num_rows == collab.plan.num_rows


def test_concurrent_different_merges_each_get_a_version(hub, collab):
    push_all(collab)
    results = _merge_concurrently(hub, collab.repo, ("copy", "reference"))
    _, tags = hub.refs(collab.repo)
    assert {result.tag for result in results} == set(tags) == {"v1", "v2"}
    for result in results:
        manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, result.tag).read_text())
        assert manifest["tag"] == result.tag, f"{result.tag}: the manifest names another tag"
        assert manifest["images"] == result.manifest.images, f"{result.tag}: the manifest has another image mode"
        assert tags[result.tag] == result.commit, f"{result.tag} is not the merge's commit"
        assert load(collab.repo, result.tag)["train"].num_rows == collab.plan.num_rows, f"{result.tag}: rows missing"
    assert hub.head(collab.repo) in {result.commit for result in results}


def test_a_tag_taken_between_commit_and_tag_moves_this_merge_to_the_next_version(hub, collab, monkeypatch):
    push_all(collab)
    before = hub.head(collab.repo)
    create_tag = hub.create_tag

    def someone_else_tags_first(repo, tag, revision, message):
        if tag == "v1" and "v1" not in hub.refs(repo)[1]:
            create_tag(repo, "v1", before, "a concurrent merge")
        create_tag(repo, tag, revision, message)

    monkeypatch.setattr(hub, "create_tag", someone_else_tags_first)
    result = merge(hub, collab.repo)
    _, tags = hub.refs(collab.repo)
    assert result.tag == "v2"
    assert tags == {"v1": before, "v2": result.commit}
    assert result.commit == hub.head(collab.repo)
    assert json.loads(hub.download(collab.repo, MANIFEST_PATH, "v2").read_text())["tag"] == "v2"
    assert 'revision="v2"' in hub.download(collab.repo, "README.md", "v2").read_text()


@dataclass
class SkippedMerge:
    collab: Collaboration
    skipped: list[int]  # ids of shard 1 its participant could not decode
    result: MergeResult

    @property
    def kept(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.collab.plan.num_rows), self.skipped)


@pytest.fixture(scope="module")
def skipped_merge(hub, new_collaboration, digits_source) -> SkippedMerge:
    """A merge of three shards, shard 1 having skipped four undecodable rows."""
    collab = new_digits_collaboration(new_collaboration, digits_source)
    skipped = [int(i) for i in collab.plan.shard_ids(1)[[0, 7, 8, -1]]]
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first), edit=skipping(*skipped))
    collab.push(2, MID, reference=(0, GOOD, first))
    return SkippedMerge(collab, skipped, merge(hub, collab.repo))


def test_rows_a_shard_skipped_as_undecodable_are_left_out_of_the_dataset(skipped_merge):
    collab, skipped, kept = skipped_merge.collab, skipped_merge.skipped, skipped_merge.kept
    plan = collab.plan
    train = load(collab.repo, skipped_merge.result.tag)["train"]
    assert train.num_rows == plan.num_rows - len(skipped)
    columns = train.with_format("numpy")[:]
    assert np.array_equal(columns["id"], kept), "ids"
    assert not set(skipped) & set(columns["id"].tolist()), "a skipped id is in the dataset"
    assert np.array_equal(np.sort(columns["id"][columns["shard"] == 1]), np.setdiff1d(plan.shard_ids(1), skipped)), \
        "rows of shard 1"
    assert np.array_equal(columns["label"], source_labels(collab.source)["train"][kept]), "labels"


def test_rows_a_shard_skipped_as_undecodable_are_left_out_of_the_targets(hub, skipped_merge):
    collab, kept = skipped_merge.collab, skipped_merge.kept
    stored = read_targets(hub, collab.repo, skipped_merge.result.tag)
    assert np.array_equal(stored["ids"], kept), "ids"
    _, raw = collab.projected(WEAK, kept[np.isin(kept, collab.plan.shard_ids(1))])
    assert np.allclose(stored["raw"][np.isin(kept, collab.plan.shard_ids(1))], raw, atol=2e-3), "raw targets of shard 1"


def test_rows_a_shard_skipped_as_undecodable_are_recorded_in_the_manifest_and_card(hub, skipped_merge):
    collab, skipped, tag = skipped_merge.collab, skipped_merge.skipped, skipped_merge.result.tag
    manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, tag).read_text())
    assert {s["shard"]: s["skipped_ids"] for s in manifest["shards"]} == {0: [], 1: skipped, 2: []}
    assert manifest["splits"]["train"]["num_rows"] == collab.plan.num_rows - len(skipped)
    card = hub.download(collab.repo, "README.md", tag).read_text()
    assert "4 samples of the merged shards could not be decoded" in card
    assert "4 in shard 1." in card
    assert "`skipped_ids` of each shard in `coopt/manifest.json`" in card


def test_a_merge_with_skipped_rows_reads_back_as_the_same_merge(hub, skipped_merge):
    again = merge(hub, skipped_merge.collab.repo)
    assert (again.tag, again.created) == (skipped_merge.result.tag, False), "the rerun made a new version"
    assert again.manifest.shards[1].skipped_ids == tuple(skipped_merge.skipped)


def test_reference_mode_writes_no_images(hub, digits_source, new_collaboration):
    collab = new_collaboration(digits_source, "digits-ref", shards=1, anchors=64, dim=8)
    collab.push(0, MID)
    result = merge(hub, collab.repo, images="reference", tag="first")
    assert result.tag == "first"
    assert result.manifest.images == "reference"
    data = load(collab.repo, "first")
    assert data["train"].column_names == ["id", "target", "shard", "label"]
    assert data["test"].column_names == ["id", "target", "shard", "label"]
    assert next_tag(hub.refs(collab.repo)[1]) == "v1"


@pytest.mark.slow
def test_merge_verify_refuses_targets_of_another_model_than_declared(hub, digits_source, new_repo_id):
    """Shard 1 labeled with open_clip prior B but declaring prior A, with consistent checksums, as in
    test_verify: only re-encoding tells. `merge --verify` refuses it and a plain merge publishes it;
    once shard 1 is honest, a verified merge of the same kind makes a new version that says so."""
    from dataclasses import replace

    from click.testing import CliRunner
    from real_shards import PRIOR_A, PRIOR_B, Pushed, RealCollaboration, label

    from coopt_hub.cli import cli
    from coopt_hub.core.shardfile import ShardResult
    from coopt_hub.platform.init import initialize
    from coopt_hub.platform.verify import PriorLoader

    repo = new_repo_id("digits-verified")
    plan = initialize(hub, repo, source=digits_source, source_revision=None, split="train", image_column="image",
                      shards=2, anchors=32, dim=16, seed=0, temperature=2.0).plan
    people = RealCollaboration(hub, repo, plan, PriorLoader(keep=2), {})
    result, anchors = label(people, 0, PRIOR_A, None)
    people.shards[0] = Pushed(0, people.push(0, result, anchors), result, anchors)
    honest, honest_anchors = label(people, 1, PRIOR_B, people.shards[0])
    declared = people.shards[0].result.header
    claims_a = ShardResult(replace(honest.header, prior=declared.prior, fingerprint=declared.fingerprint),
                           honest.ids, honest.raw, honest.aligned)
    people.push(1, claims_a, honest_anchors)

    runner = CliRunner()
    head = hub.head(repo)
    refused = runner.invoke(cli, ["merge", repo, "--images", "reference", "--verify", "--verify-sample", "16"])
    assert refused.exit_code == 1, f"verified merge of a false shard: {refused.output}"
    assert isinstance(refused.exception, VerificationError), f"verified merge of a false shard: {refused.output}"
    assert "shard 1 fail (targets, anchors)" in str(refused.exception), "verified merge: shard 1 not failed"
    assert "shard 0" not in str(refused.exception), "verified merge: the honest shard 0 failed"
    assert "Nothing was written" in str(refused.exception), "verified merge: the error does not say nothing changed"
    assert hub.head(repo) == head, "verified merge of a false shard moved main"
    assert hub.refs(repo)[1] == {}, "verified merge of a false shard made a tag"

    plain = runner.invoke(cli, ["merge", repo, "--images", "reference", "--json"])
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["verified"] is False, "plain merge: said verified"
    assert json.loads(hub.download(repo, MANIFEST_PATH, "v1").read_text())["verification"] is None, \
        "plain merge: the manifest records a verification"
    assert "re-encoded with their declared priors" in hub.download(repo, "README.md", "v1").read_text(), \
        "plain merge: the card does not say the shards were not re-encoded"

    people.push(1, honest, honest_anchors)
    verified = runner.invoke(cli, ["merge", repo, "--images", "reference", "--verify", "--verify-sample", "16",
                                   "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["tag"] == "v2", "verified merge of honest shards: not v2"
    assert json.loads(verified.stdout)["verified"] is True, "verified merge of honest shards: not said verified"
    manifest = json.loads(hub.download(repo, MANIFEST_PATH, "v2").read_text())
    assert manifest["verification"] == {"sample": 16, "seed": 0, "min_cosine": 0.999, "tolerance": 1e-4}, \
        "verified merge: the manifest does not record the verification"
    assert "Every merged shard was verified" in hub.download(repo, "README.md", "v2").read_text(), \
        "verified merge: the card does not say so"
    # The same verified merge again changes nothing; a plain merge accepts the verified version.
    for again in (["--verify", "--verify-sample", "16"], []):
        unchanged = runner.invoke(cli, ["merge", repo, "--images", "reference", "--json", *again])
        assert unchanged.exit_code == 0, f"merge {again} after v2: {unchanged.output}"
        assert json.loads(unchanged.stdout)["created"] is False, f"merge {again} after v2 made a version"
    assert set(hub.refs(repo)[1]) == {"v1", "v2"}


def test_verify_sample_needs_verify():
    from click.testing import CliRunner

    from coopt_hub.cli import cli

    refused = CliRunner().invoke(cli, ["merge", "org/any", "--verify-sample", "8"])
    assert refused.exit_code == 2, refused.output
    assert "pass --verify too" in refused.output


def test_next_tag():
    assert next_tag([]) == "v1"
    assert next_tag(["v1", "v9", "v10", "release", "v2a"]) == "v11"


# Writing fast without changing a byte -----------------------------------------------------------


@pytest.mark.parametrize("spread", ["units", "rows"])
def test_rows_written_at_their_positions_give_the_bytes_of_a_write_per_row(tmp_path, spread):
    rows, dim = 40_000, 8
    rng = np.random.default_rng(0)
    if spread == "units":  # runs of consecutive positions, as a shard of a plan by storage units
        positions = np.concatenate([np.arange(start, start + 700) for start in range(0, rows - 700, 2100)])
    else:  # single rows scattered over the whole file, as a plan with granularity "row"
        positions = np.flatnonzero(rng.random(rows) < 0.3)
    values = rng.standard_normal((positions.size, dim)).astype(np.float16)
    before = rng.standard_normal((rows, dim)).astype(np.float16)  # rows other shards wrote already
    files = {}
    for name in ("at", "per-row"):
        path = tmp_path / f"{name}.safetensors"
        with TensorFile(path, {"t": (np.dtype(np.float16), (rows, dim))}, metadata={}) as file:
            file.write_rows("t", 0, before)
            if name == "at":
                write_at(file, "t", positions, values)
            else:
                for position, row in zip(positions, values):
                    file.write_rows("t", int(position), row[None])
        files[name] = path.read_bytes()
    assert files["at"] == files["per-row"]
    expected = before.copy()
    expected[positions] = values
    assert files["at"].endswith(expected.tobytes())


def _plan_with_skipped_rows(units: int) -> tuple:
    """A plan of 4 shards over `units` storage units of random sizes (the first two empty): by units
    at 60, by rows at 5; and shards 0, 1 and 3 as merged (2 is missing), each having skipped 25 of
    its rows and recorded 3 ids of the next shard as skipped, which do not count."""
    sizes = np.random.default_rng(1).integers(0, 900, units)
    sizes[:2] = 0
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    plan = make_plan(source_repo="org/src", source_revision="b" * 40, split="train", image_column="image",
                     units=[Unit("data/train.parquet", g, int(a), int(n)) for g, (a, n) in enumerate(zip(starts, sizes))],
                     num_shards=4, anchors=8, dim=4, seed=0, temperature=2.0)
    assert plan.granularity == ("row_group" if units == 60 else "row")
    rng = np.random.default_rng(2)
    merged = []
    for k in (0, 1, 3):
        own = plan.shard_ids(k)
        skipped = np.union1d(rng.choice(own, 25, replace=False), rng.choice(plan.shard_ids((k + 1) % 4), 3))
        merged.append(SimpleNamespace(shard=k, header=SimpleNamespace(skipped_ids=skipped.tolist())))
    return plan, merged


@pytest.mark.parametrize("units", [60, 5], ids=["by units", "by rows"])
def test_the_id_layout_places_every_id_as_a_slot_per_id_would(units):
    """IdLayout keeps the plan's units and the absent ids, not a slot per id: each id's shard and
    merged row are those of a table over every id."""
    plan, merged = _plan_with_skipped_rows(units)
    table = np.full(plan.num_rows, -1)
    for status in merged:
        table[expected_ids(plan, status.shard, status.header)] = status.shard
    present = np.flatnonzero(table >= 0)

    layout = IdLayout(plan, merged)
    assert layout.num_rows == present.size
    assert np.array_equal(layout.shard_of(np.arange(plan.num_rows)), table)
    assert np.array_equal(layout.position(present), np.arange(present.size))
    assert np.array_equal(np.concatenate(list(layout.present_ids(block=1000))), present)


@pytest.mark.parametrize("units", [60, 5], ids=["by units", "by rows"])
def test_a_shards_expected_ids_by_range_are_the_slices_of_all_of_them(units):
    """ExpectedIds gives a range of a shard's rows without all of them: every range (across units,
    within one, at unit edges, empty, past the end) is the slice of expected_ids."""
    plan, merged = _plan_with_skipped_rows(units)
    rng = np.random.default_rng(3)
    for status in merged:
        every = expected_ids(plan, status.shard, status.header)
        by_range = ExpectedIds(plan, status.shard, status.header)
        edges = np.cumsum([0] + [u.num_rows for u in plan.shard_units(status.shard)]) if units == 60 else []
        bounds = [(0, every.size), (0, 0), (every.size, every.size + 10), (every.size - 5, every.size + 5),
                  *((int(e), int(e) + 700) for e in edges[:6]), *(sorted(rng.integers(0, every.size, 2)) for _ in range(40))]
        for start, stop in bounds:
            assert np.array_equal(by_range.rows(int(start), int(stop)), every[start:stop]), (status.shard, start, stop)


def test_targets_narrowed_to_float16_have_the_bits_of_numpys_cast():
    rng = np.random.default_rng(2)
    # Unit scale, values below float16's normal range (re-aligned by a map between unrelated priors),
    # float32 bit patterns across that boundary (ties included), signed zeros, and the extremes.
    values = np.concatenate([
        rng.standard_normal(4096).astype(np.float32),
        (rng.standard_normal(4096) * 1e-6).astype(np.float32),
        np.arange(0x37000000, 0x38900000, 101, dtype=np.uint32).view(np.float32),
        -np.arange(0x37000000, 0x38900000, 103, dtype=np.uint32).view(np.float32),
        np.array([0.0, -0.0, 1e-45, -1e-45, 65504.0, np.inf, np.nan], np.float32),
    ])
    assert np.array_equal(to_float16(values).view(np.uint16), values.astype(np.float16).view(np.uint16))
    unit = values[:4096]
    assert np.array_equal(to_float16(unit).view(np.uint16), unit.astype(np.float16).view(np.uint16))


def test_float16_narrowing_matches_numpys_cast_on_every_kind_of_float32():
    """Random bit patterns over the whole float32 range (NaN payloads, infinities, overflow to
    infinity, subnormals of both formats), in an array larger than one conversion block."""
    patterns = np.random.default_rng(3).integers(0, 2**32, size=300_000, dtype=np.uint64).astype(np.uint32)
    values = patterns.view(np.float32).reshape(-1, 100)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
    assert np.array_equal(to_float16(values).view(np.uint16), expected.view(np.uint16))
    assert to_float16(values[:0]).shape == (0, 100)


def test_re_aligned_targets_that_overflow_float16_are_refused_not_written():
    """A map that takes a shard's targets past float16's range (from 65520 up, which rounds to
    infinity) is refused with the shard named; one that stays just below (65504) is kept, bit for bit."""
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((64, 8)).astype(np.float16)
    fit = select_alignment(raw.astype(np.float32), raw.astype(np.float32) @ rng.standard_normal((8, 8)))
    rows = ShardRows(0, np.arange(64), raw, None)
    status = SimpleNamespace(shard=3)

    def aligned(transform: np.ndarray) -> np.ndarray:
        return _aligned(status, rows, _Realignment(realigned=True, fit=replace(fit, transform=transform)))

    expected = (raw.astype(np.float32) @ fit.transform.astype(np.float32)).astype(np.float16)
    assert np.array_equal(aligned(fit.transform).view(np.uint16), expected.view(np.uint16))
    # One value scaled to exactly 65504 is finite; the same row scaled past 65520 is not.
    row, column = np.unravel_index(np.abs(raw.astype(np.float32)).argmax(), raw.shape)
    onto_one = np.zeros((8, 8))
    onto_one[column, 0] = 65504.0 / float(raw[row, column])
    kept = aligned(onto_one).astype(np.float32)
    assert np.isfinite(kept).all() and np.abs(kept).max() == 65504
    with pytest.raises(VerificationError, match=r"Shard 3: re-aligned targets overflow float16"):
        aligned(onto_one * 1.001)
    with pytest.raises(VerificationError, match="overflow float16"):
        aligned(np.full((8, 8), np.nan))


def test_float16_widening_matches_numpys_cast_on_every_bit_pattern():
    """Every float16 bit pattern (subnormals, both zeros, infinities, NaN payloads), shuffled into an
    array larger than one lookup block, in a non-contiguous view and in big-endian order."""
    patterns = np.random.default_rng(5).permutation(np.tile(np.arange(1 << 16, dtype=np.uint32), 3)).astype(np.uint16)
    halves = patterns.view(np.float16).reshape(-1, 96)
    with np.errstate(all="ignore"):
        expected = halves.astype(np.float32)
    widened = to_float32(halves)
    assert widened.shape == halves.shape and widened.dtype == np.float32
    assert np.array_equal(widened.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(to_float32(halves[:, ::3]).view(np.uint32), expected[:, ::3].view(np.uint32))
    assert np.array_equal(to_float32(halves.astype(">f2")).view(np.uint32), expected.view(np.uint32))
    assert to_float32(halves[:0]).shape == (0, 96)
    out = np.full(halves.shape, np.nan, np.float32)
    assert to_float32(halves, out=out) is out and np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError, match="contiguous float32"):
        to_float32(halves, out=np.empty((halves.shape[1], halves.shape[0]), np.float32))


def test_a_reused_buffer_is_handed_out_again_only_once_no_arrow_array_holds_it():
    import pyarrow as pa

    buffers = ReusedBuffers(np.float32, keep=2)
    first = buffers.take(1024)
    first[:] = 1.0
    table = pa.table({"target": pa.FixedSizeListArray.from_arrays(pa.array(first.reshape(4, 256).reshape(-1)), 256)})
    del first
    second = buffers.take(1024)
    assert not np.shares_memory(second, buffers._buffers[0]), "a buffer an Arrow table still holds was handed out"
    second[:] = 2.0
    assert table.column("target").combine_chunks().flatten().to_numpy().tolist() == [1.0] * 1024
    del table, second
    again = buffers.take(512)
    assert np.shares_memory(again, buffers._buffers[0]) and again.size == 512, "a free buffer was not reused"
    held, extra = buffers.take(1024), buffers.take(1024)
    assert len(buffers._buffers) == 2 and not any(np.shares_memory(extra, b) for b in buffers._buffers), \
        "past `keep`, a request gets memory of its own, not kept"
    assert held.size == 1024


class _BlockingAnchors:
    """A reference choice whose paired anchors record the thread that asked, and hold shard `held` until released."""

    def __init__(self, held: int):
        self.held, self.entered, self.release = held, threading.Event(), threading.Event()
        self.calls: list[tuple[int, str]] = []

    def paired_anchors(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((shard, threading.current_thread().name))
        if shard == self.held:
            self.entered.set()
            assert self.release.wait(30), "the test never released the held fit"
        rng = np.random.default_rng(shard)
        source = rng.standard_normal((64, 12))
        return source, source @ rng.standard_normal((12, 8)) + 0.1 * rng.standard_normal((64, 8))


def test_maps_are_fitted_on_a_thread_until_the_first_is_asked_for_and_then_in_turn():
    choice = _BlockingAnchors(held=5)
    with _Maps(choice, [3, 5, 6], background=True) as maps:
        assert choice.entered.wait(30), "the maps were not fitted on a thread before any was asked for"
        threading.Timer(0.2, choice.release.set).start()
        first = maps.fit(3)  # waits for the fit under way (5); 6 is left for when it is asked for
        assert [shard for shard, _ in choice.calls] == [3, 5], "a fit started after the first map was asked for"
        assert not [t for t in threading.enumerate() if t.name.startswith("coopt-merge-fit")], \
            "the fitting thread outlived the first request, so it could fit beside a product"
        later = [maps.fit(6), maps.fit(5)]
    assert choice.calls[2:] == [(6, threading.current_thread().name)], "shard 6 was not fitted in turn when asked for"
    assert all(name.startswith("coopt-merge-fit") for _, name in choice.calls[:2]), "3 and 5 not fitted on the thread"
    for shard, fit in zip((3, 6, 5), [first, *later]):
        expected = select_alignment(*choice.paired_anchors(shard))
        assert np.array_equal(fit.transform, expected.transform), f"shard {shard}: not select_alignment's map"


def test_maps_are_fitted_only_when_asked_for_without_the_background():
    choice = _BlockingAnchors(held=-1)
    with _Maps(choice, [1, 2], background=False) as maps:
        assert choice.calls == [], "a map was fitted before it was asked for"
        maps.fit(2)
    assert choice.calls == [(2, threading.current_thread().name)], "not fitted in turn on the asking thread"


def test_lanes_run_side_by_side_each_in_its_order():
    seen, lock = [], threading.Lock()
    both_started = threading.Barrier(2, timeout=30)  # broken unless the two lanes' first items overlap

    def run(lane, stop):
        for position, item in enumerate(lane):
            if position == 0:
                both_started.wait()
            with lock:
                seen.append((item, threading.current_thread().name))

    _side_by_side([["k0", "k1"], ["m0", "m1", "m2"]], run, name="test-lane")
    assert [item for item, _ in seen if item[0] == "k"] == ["k0", "k1"]
    assert [item for item, _ in seen if item[0] == "m"] == ["m0", "m1", "m2"]
    assert len({name for _, name in seen}) == 2, "not one thread per lane"


def test_a_failing_lane_stops_the_other_at_its_next_item_and_its_error_is_raised():
    done, other_started = [], threading.Event()

    def run(lane, stop):
        for item in lane:
            if stop.is_set():
                return
            if item == "bad":
                assert other_started.wait(30), "the other lane did not start"
                raise VerificationError("Shard 1: bad.")
            other_started.set()
            assert stop.wait(30), "the other lane's failure did not set stop"  # the item under way finishes
            done.append(item)

    with pytest.raises(VerificationError, match="Shard 1: bad"):
        _side_by_side([["bad"], ["m0", "m1", "m2"]], run, name="test-lane")
    assert done == ["m0"], "the other lane went on after the failure"


def test_when_both_lanes_fail_the_first_lanes_error_is_raised():
    def run(lane, stop):
        raise VerificationError(f"Shard {lane[0]}: bad.")

    with pytest.raises(VerificationError, match="Shard 4: bad"):
        _side_by_side([[4], [0]], run, name="test-lane")


class _InterruptedLanes:
    """Two lanes whose first items start together with a Ctrl-C in the thread waiting for them (a
    stand-in for concurrent.futures.wait), then finish once stop is set, taking `seconds`."""

    def __init__(self, seconds: float = 0.0):
        self.all_started, self.done, self.seconds = threading.Barrier(3, timeout=30), [], seconds

    def wait(self, futures):
        self.all_started.wait()
        raise KeyboardInterrupt

    def run(self, lane, stop):
        for item in lane:
            if stop.is_set():
                return
            self.all_started.wait()
            assert stop.wait(30), "the interrupt did not set stop"
            time.sleep(self.seconds)
            self.done.append(item)


def test_an_interrupt_while_the_lanes_run_stops_each_at_its_next_item(monkeypatch):
    from coopt_hub.platform.merge import targets as targets_module

    lanes = _InterruptedLanes()
    monkeypatch.setattr(targets_module, "wait", lanes.wait)
    with pytest.raises(KeyboardInterrupt):
        _side_by_side([["k0", "k1"], ["m0", "m1"]], lanes.run, name="test-lane")
    assert sorted(lanes.done) == ["k0", "m0"], "a lane went on after the interrupt, or did not finish its item"


def test_a_second_interrupt_still_waits_for_the_lanes(monkeypatch):
    """Interrupted again while the lanes finish their items, it still returns only once they have:
    the merge's scratch files are theirs until then."""
    from concurrent.futures import ThreadPoolExecutor

    from coopt_hub.platform.merge import targets as targets_module

    class InterruptedOnce(ThreadPoolExecutor):
        interrupted = False

        def shutdown(self, wait=True, **kwargs):
            if not InterruptedOnce.interrupted:
                InterruptedOnce.interrupted = True
                raise KeyboardInterrupt  # the second Ctrl-C, before the lanes are joined
            super().shutdown(wait=wait, **kwargs)

    lanes = _InterruptedLanes(seconds=0.2)  # the items take a while to finish
    monkeypatch.setattr(targets_module, "wait", lanes.wait)
    monkeypatch.setattr(targets_module, "ThreadPoolExecutor", InterruptedOnce)
    with pytest.raises(KeyboardInterrupt):
        _side_by_side([["k0", "k1"], ["m0", "m1"]], lanes.run, name="test-lane")
    assert InterruptedOnce.interrupted
    assert sorted(lanes.done) == ["k0", "m0"], "returned before the lanes had finished their items"
