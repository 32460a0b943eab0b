"""`merge` against the embedded hub, read back with the real `datasets` and safetensors clients."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
from helpers_hub import Collaboration, FakePrior, digits_source, skipping, start_collaboration

from coopt_hub.core.align import apply_alignment, fit_alignment
from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_FILE, TARGETS_PATH
from coopt_hub.core.manifest import next_tag
from coopt_hub.errors import ConflictError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.merge import parquet as merge_module
from coopt_hub.platform.merge.run import merge

# Worse to better: fewer latent dimensions seen means a more collapsed prior and a higher V.
WEAK = FakePrior("weak-net", output_dim=20, rank=6)
MID = FakePrior("mid-net", output_dim=28, rank=12)
GOOD = FakePrior("good-net", output_dim=40, rank=18)
BEST = FakePrior("best-net", output_dim=48, rank=24)


@pytest.fixture(scope="module")
def hub(hub_server) -> Hub:
    return Hub(token=hub_server.token)


@pytest.fixture(scope="module")
def source(hub, hub_server) -> str:
    return digits_source(f"org/digits-{uuid.uuid4().hex[:8]}", hub_server.token)


@pytest.fixture
def collab(hub, source, new_repo_id) -> Collaboration:
    return start_collaboration(hub, new_repo_id("digits-coopt"), source, shards=3, anchors=96, dim=16)


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


def test_merge_publishes_a_dataset_that_loads_at_its_tag(hub, collab, source):
    commits = push_all(collab)
    result = merge(hub, collab.repo)
    assert (result.tag, result.created) == ("v1", True)
    plan = collab.plan

    data = load(collab.repo, "v1")
    train, test = data["train"], data["test"]
    assert train.num_rows == plan.num_rows and test.num_rows > 0
    assert train.column_names == ["id", "image", "target", "shard", "label"]
    assert train[0]["image"].mode == "RGB" and train[0]["image"].size == (16, 16)
    columns = train.with_format("numpy")[:]
    targets = columns["target"]
    assert targets.dtype == np.float32 and targets.shape == (plan.num_rows, plan.dim)
    assert np.array_equal(columns["id"], np.arange(plan.num_rows))
    for k in range(3):
        assert np.array_equal(np.flatnonzero(columns["shard"] == k), plan.shard_ids(k))
    labels = source_labels(source)
    assert np.array_equal(columns["label"], labels["train"])
    assert np.array_equal(np.asarray(test["label"]), labels["test"]) and test[0]["target"] is None

    # The reference (lowest V) is shard 0, to which the others aligned: nothing is re-aligned and
    # the targets are the participants' own, bit for bit (fp16) in safetensors and as float32 in parquet.
    stored = read_targets(hub, collab.repo, "v1")
    assert np.array_equal(stored["ids"], np.arange(plan.num_rows))
    assert stored["targets"].dtype == np.float16 and np.array_equal(stored["targets"].astype(np.float32), targets)
    for k, prior in ((0, GOOD), (1, WEAK), (2, MID)):
        ids = plan.shard_ids(k)
        _, raw = collab.projected(prior, ids)
        assert np.allclose(stored["raw"][ids], raw, atol=2e-3)

    manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, "v1").read_text())
    assert manifest["tag"] == "v1" and manifest["images"] == "copy" and manifest["dim"] == plan.dim
    assert manifest["label_column"] == "label" and manifest["plan_hash"] == plan.plan_hash
    assert manifest["source"] == {
        "repo": source, "revision": plan.source_revision, "split": "train", "image_column": "image"
    }
    assert manifest["reference"]["shard"] == 0 and not manifest["partial"]
    assert {s["shard"]: s["commit"] for s in manifest["shards"]} == commits
    assert not any(s["realigned"] for s in manifest["shards"])
    assert set(manifest["splits"]) == {"train", "test"}

    card = hub.download(collab.repo, "README.md", "v1").read_text()
    assert "license: cc-by-4.0" in card and "length: 16" in card
    assert f'load_dataset("{collab.repo}", revision="v1")' in card
    assert f"accelerate launch recipes/train_from_hub.py --dataset {collab.repo} --revision v1 --arch resnet18" in card
    assert "coopt/plan.json" in hub.list_files(collab.repo, "v1")
    assert load(collab.repo, "v1", name="anchors")["anchors"].num_rows == len(plan.anchor_ids)

    streamed = load(collab.repo, "v1", streaming=True)["train"]
    first = next(iter(streamed))
    assert first["id"] == 0 and len(first["target"]) == plan.dim and first["image"].mode == "RGB"

    # Nothing new: a rerun changes nothing, and an explicit existing tag is refused before writing.
    head = hub.head(collab.repo)
    again = merge(hub, collab.repo)
    assert (again.tag, again.created, hub.head(collab.repo)) == ("v1", False, head)
    with pytest.raises(ConflictError, match="v1 already exists"):
        merge(hub, collab.repo, tag="v1", images="reference")
    assert hub.head(collab.repo) == head


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
    assert partial.tag == "v1" and partial.manifest.partial and partial.manifest.missing == (2,)
    v1_files = [f for f in hub.list_files(collab.repo, "v1") if f.startswith("data/train-")]
    assert len(v1_files) > 1
    assert "**Partial merge**: shard 2 had not been pushed" in hub.download(collab.repo, "README.md", "v1").read_text()
    v1 = load(collab.repo, "v1")["train"].with_format("numpy")[:]
    present = np.sort(np.concatenate([plan.shard_ids(0), plan.shard_ids(1)]))
    assert np.array_equal(v1["id"], present)

    # A late participant brings a better prior: v2 re-aligns shards 0 and 1 to it without re-labeling.
    collab.push(2, BEST)
    assert collab.uniformity(BEST) < min(collab.uniformity(p) for p in (GOOD, WEAK))
    result = merge(hub, collab.repo)
    assert result.tag == "v2" and result.manifest.reference.shard == 2 and not result.manifest.partial
    realigned = {s.shard: s for s in result.manifest.shards if s.realigned}
    assert set(realigned) == {0, 1}
    anchor_ids = np.asarray(plan.anchor_ids)
    v2 = load(collab.repo, "v2")["train"].with_format("numpy")[:]
    assert np.array_equal(v2["id"], np.arange(plan.num_rows))
    for k, prior in ((0, GOOD), (1, WEAK)):
        transform, residual = fit_alignment(
            collab.projected(prior, anchor_ids)[1], collab.projected(BEST, anchor_ids)[1]
        )
        assert realigned[k].realigned_residual == pytest.approx(residual, rel=1e-6)
        expected = apply_alignment(collab.projected(prior, plan.shard_ids(k))[1], transform)
        assert np.allclose(v2["target"][plan.shard_ids(k)], expected, atol=2e-2)
    card = hub.download(collab.repo, "README.md", "v2").read_text()
    assert "Shards 0, 1 had been aligned to another reference by their participants" in card and "Partial" not in card
    assert [f for f in hub.list_files(collab.repo, "v2") if f.startswith("data/train-")] == [
        "data/train-00000-of-00001.parquet"
    ]

    # v1 still loads exactly its own data.
    again = load(collab.repo, "v1")["train"].with_format("numpy")[:]
    assert np.array_equal(again["id"], v1["id"]) and np.array_equal(again["target"], v1["target"])


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
    assert hub.head(collab.repo) == head and hub.refs(collab.repo)[1] == {}


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
    assert results and len(results) + len(errors) == 2
    return results


def test_concurrent_identical_merges_make_one_version(hub, collab):
    push_all(collab)
    results = _merge_concurrently(hub, collab.repo, ("copy", "copy"))
    _, tags = hub.refs(collab.repo)
    assert set(tags) == {"v1"} and tags["v1"] == hub.head(collab.repo)
    assert all(result.tag == "v1" and result.commit == tags["v1"] for result in results)
    assert load(collab.repo, "v1")["train"].num_rows == collab.plan.num_rows


def test_concurrent_different_merges_each_get_a_version(hub, collab):
    push_all(collab)
    results = _merge_concurrently(hub, collab.repo, ("copy", "reference"))
    _, tags = hub.refs(collab.repo)
    assert {result.tag for result in results} == set(tags) == {"v1", "v2"}
    for result in results:
        manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, result.tag).read_text())
        assert manifest["tag"] == result.tag and manifest["images"] == result.manifest.images
        assert tags[result.tag] == result.commit
        assert load(collab.repo, result.tag)["train"].num_rows == collab.plan.num_rows
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
    assert result.tag == "v2" and tags == {"v1": before, "v2": result.commit}
    assert result.commit == hub.head(collab.repo)
    assert json.loads(hub.download(collab.repo, MANIFEST_PATH, "v2").read_text())["tag"] == "v2"
    assert 'revision="v2"' in hub.download(collab.repo, "README.md", "v2").read_text()


def test_rows_a_shard_skipped_as_undecodable_are_left_out_and_recorded(hub, collab):
    plan = collab.plan
    skipped = [int(i) for i in plan.shard_ids(1)[[0, 7, 8, -1]]]
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first), edit=skipping(*skipped))
    collab.push(2, MID, reference=(0, GOOD, first))
    result = merge(hub, collab.repo)
    kept = np.setdiff1d(np.arange(plan.num_rows), skipped)

    train = load(collab.repo, result.tag)["train"]
    assert train.num_rows == plan.num_rows - len(skipped)
    columns = train.with_format("numpy")[:]
    assert np.array_equal(columns["id"], kept) and not set(skipped) & set(columns["id"].tolist())
    assert np.array_equal(np.sort(columns["id"][columns["shard"] == 1]), np.setdiff1d(plan.shard_ids(1), skipped))
    assert np.array_equal(columns["label"], source_labels(collab.source)["train"][kept])
    stored = read_targets(hub, collab.repo, result.tag)
    assert np.array_equal(stored["ids"], kept)
    _, raw = collab.projected(WEAK, kept[np.isin(kept, plan.shard_ids(1))])
    assert np.allclose(stored["raw"][np.isin(kept, plan.shard_ids(1))], raw, atol=2e-3)

    manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, result.tag).read_text())
    assert {s["shard"]: s["skipped_ids"] for s in manifest["shards"]} == {0: [], 1: skipped, 2: []}
    assert manifest["splits"]["train"]["num_rows"] == plan.num_rows - len(skipped)
    card = hub.download(collab.repo, "README.md", result.tag).read_text()
    assert "4 samples of the merged shards could not be decoded" in card and "4 in shard 1." in card
    assert "`skipped_ids` of each shard in `coopt/manifest.json`" in card
    again = merge(hub, collab.repo)  # the manifest read back is the same merge
    assert (again.tag, again.created) == (result.tag, False) and again.manifest.shards[1].skipped_ids == tuple(skipped)


def test_reference_mode_writes_no_images(hub, source, new_repo_id):
    collab = start_collaboration(hub, new_repo_id("digits-ref"), source, shards=1, anchors=64, dim=8)
    collab.push(0, MID)
    result = merge(hub, collab.repo, images="reference", tag="first")
    assert result.tag == "first" and result.manifest.images == "reference"
    data = load(collab.repo, "first")
    assert data["train"].column_names == ["id", "target", "shard", "label"]
    assert data["test"].column_names == ["id", "target", "shard", "label"]
    assert next_tag(hub.refs(collab.repo)[1]) == "v1"


def test_merge_verify_refuses_targets_of_another_model_than_declared(hub, source, new_repo_id):
    """Shard 1 labeled with open_clip prior B but declaring prior A, with consistent checksums, as in
    test_verify: only re-encoding tells. `merge --verify` refuses it and a plain merge publishes it;
    once shard 1 is honest, a verified merge of the same kind makes a new version that says so."""
    from dataclasses import replace

    from click.testing import CliRunner
    from test_verify import PRIOR_A, PRIOR_B, Pushed, label
    from test_verify import Collaboration as Participants

    from coopt_hub.cli import cli
    from coopt_hub.core.shardfile import ShardResult
    from coopt_hub.platform.init import initialize
    from coopt_hub.platform.verify import PriorLoader

    repo = new_repo_id("digits-verified")
    plan = initialize(hub, repo, source=source, source_revision=None, split="train", image_column="image",
                      shards=2, anchors=32, dim=16, seed=0, temperature=2.0).plan
    people = Participants(hub, repo, plan, PriorLoader(keep=2), {})
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
    assert refused.exit_code == 1 and isinstance(refused.exception, VerificationError), refused.output
    assert "shard 1 fail (targets, anchors)" in str(refused.exception) and "shard 0" not in str(refused.exception)
    assert "Nothing was written" in str(refused.exception)
    assert hub.head(repo) == head and hub.refs(repo)[1] == {}

    plain = runner.invoke(cli, ["merge", repo, "--images", "reference", "--json"])
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["verified"] is False
    assert json.loads(hub.download(repo, MANIFEST_PATH, "v1").read_text())["verification"] is None
    assert "re-encoded with their declared priors" in hub.download(repo, "README.md", "v1").read_text()

    people.push(1, honest, honest_anchors)
    verified = runner.invoke(cli, ["merge", repo, "--images", "reference", "--verify", "--verify-sample", "16",
                                   "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["tag"] == "v2" and json.loads(verified.stdout)["verified"] is True
    manifest = json.loads(hub.download(repo, MANIFEST_PATH, "v2").read_text())
    assert manifest["verification"] == {"sample": 16, "seed": 0, "min_cosine": 0.999, "tolerance": 1e-4}
    assert "Every merged shard was verified" in hub.download(repo, "README.md", "v2").read_text()
    # The same verified merge again changes nothing; a plain merge accepts the verified version.
    for again in (["--verify", "--verify-sample", "16"], []):
        unchanged = runner.invoke(cli, ["merge", repo, "--images", "reference", "--json", *again])
        assert unchanged.exit_code == 0 and json.loads(unchanged.stdout)["created"] is False, unchanged.output
    assert set(hub.refs(repo)[1]) == {"v1", "v2"}


def test_verify_sample_needs_verify():
    from click.testing import CliRunner

    from coopt_hub.cli import cli

    refused = CliRunner().invoke(cli, ["merge", "org/any", "--verify-sample", "8"])
    assert refused.exit_code == 2 and "pass --verify too" in refused.output


def test_next_tag():
    assert next_tag([]) == "v1"
    assert next_tag(["v1", "v9", "v10", "release", "v2a"]) == "v11"
