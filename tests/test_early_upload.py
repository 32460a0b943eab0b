"""Uploading big files ahead of the commit that adds them (merge's targets file, then each parquet
file as it is written, during the parquet stage)."""

import threading
from pathlib import Path

import numpy as np

from coopt_hub.platform.merge.commit import EarlyUpload, Publication


class Notes:
    def __init__(self):
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def bar(self, *args, **kwargs):  # pragma: no cover - not used here
        raise AssertionError("no bars expected")


def publication(uploaded) -> Publication:
    return Publication(plan=None, uploads=[], draft=None, card_for=str, message="", uploaded=uploaded)


def test_an_early_upload_is_committed_without_uploading_again(hub, repo_id, tmp_path: Path, hf_api):
    hub.ensure_repo(repo_id)
    big = tmp_path / "targets.safetensors"
    big.write_bytes(np.random.default_rng(0).bytes(12 << 20))  # past the size huggingface_hub sends inline
    notes = Notes()
    operations = EarlyUpload(hub, repo_id, [(big, "data/targets.safetensors")]).operations(notes)
    assert notes.warnings == []
    (early,) = operations.values()
    assert early._is_uploaded, "uploaded before any commit"
    assert "data/targets.safetensors" not in hf_api.list_repo_files(repo_id, repo_type="dataset"), "not committed yet"

    plan = publication(operations)
    assert plan.addition(big, "data/targets.safetensors") is early
    again = plan.addition(big, "data/targets.safetensors")
    assert again is not early and not again._is_uploaded, "used once; a retried commit gets a fresh one"

    hub.commit(repo_id, "main", lambda head: [early], message="add")
    assert hub.download(repo_id, "data/targets.safetensors", "main").read_bytes() == big.read_bytes()


def test_files_added_later_under_provisional_names_are_committed_under_their_final_names(
        hub, repo_id, tmp_path: Path, hf_api):
    """Parquet files upload as each is written, named by their local names; the commit names them
    `-of-N` (known once all are written) and sends only pointers: the provisional names never reach the repo."""
    hub.ensure_repo(repo_id)
    files = [tmp_path / f"train-{part}-0.parquet" for part in range(2)]
    for seed, local in enumerate(files):
        local.write_bytes(np.random.default_rng(seed).bytes(11 << 20))
    early = EarlyUpload(hub, repo_id)
    for local in files:
        early.add(local, f"data/{local.name}")
    notes = Notes()
    operations = early.operations(notes)
    assert notes.warnings == [] and set(operations) == set(files)
    assert all(operation._is_uploaded for operation in operations.values())

    plan = publication(dict(operations))
    final = [f"data/train-{i:05d}-of-00002.parquet" for i in range(2)]
    additions = [plan.addition(local, path) for local, path in zip(files, final)]
    assert [a.path_in_repo for a in additions] == final and all(a._is_uploaded for a in additions)
    assert [operations[local].path_in_repo for local in files] == [f"data/{local.name}" for local in files], \
        "the uploaded operations themselves are left as they were"
    assert [a.upload_info.sha256 for a in additions] == [operations[local].upload_info.sha256 for local in files]

    hub.commit(repo_id, "main", lambda head: additions, message="add")
    in_repo = hf_api.list_repo_files(repo_id, repo_type="dataset")
    assert set(final) <= set(in_repo) and not {f"data/{local.name}" for local in files} & set(in_repo)
    for local, path in zip(files, final):
        assert hub.download(repo_id, path, "main").read_bytes() == local.read_bytes()


def test_a_failed_early_upload_is_said_and_left_to_the_commit(hub, new_repo_id, tmp_path: Path):
    big, later = tmp_path / "targets.safetensors", tmp_path / "train-0-0.parquet"
    big.write_bytes(b"x" * (12 << 20))
    later.write_bytes(b"y" * (12 << 20))
    notes = Notes()
    early = EarlyUpload(hub, new_repo_id("never-created"), [(big, "data/targets.safetensors")])
    early.add(later, "data/train-0-0.parquet")
    assert early.operations(notes) == {}
    assert len(notes.warnings) == 1 and "data/targets.safetensors, data/train-0-0.parquet" in notes.warnings[0]
    assert "the commit uploads it" in notes.warnings[0]


class _HeldHub:
    """A hub whose upload of the targets file lasts until another file has started uploading."""

    def __init__(self):
        self.other_started = threading.Event()

    def preupload(self, repo: str, branch: str, files):
        from huggingface_hub import CommitOperationAdd

        ((local, path),) = files
        if path.endswith("targets.safetensors"):
            assert self.other_started.wait(10), "the next file waited for the targets file's upload"
        else:
            self.other_started.set()
        return [CommitOperationAdd(path, str(local))]


def test_the_parquet_files_upload_beside_the_targets_file_not_behind_it(tmp_path: Path):
    big, later = tmp_path / "targets.safetensors", tmp_path / "train-0-0.parquet"
    big.write_bytes(b"x" * 1024)
    later.write_bytes(b"y" * 1024)
    notes = Notes()
    early = EarlyUpload(_HeldHub(), "org/repo", [(big, "data/targets.safetensors")])
    early.add(later, "data/train-0-0.parquet")
    operations = early.operations(notes)
    assert notes.warnings == [], notes.warnings
    assert {local: op.path_in_repo for local, op in operations.items()} == {
        big: "data/targets.safetensors", later: "data/train-0-0.parquet"}
