"""Uploading big files ahead of the commit that adds them (merge's targets file, during the parquet stage)."""

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


def publication(**uploaded) -> Publication:
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

    plan = publication(**operations)
    assert plan.addition(big, "data/targets.safetensors") is early
    again = plan.addition(big, "data/targets.safetensors")
    assert again is not early and not again._is_uploaded, "used once; a retried commit gets a fresh one"

    hub.commit(repo_id, "main", lambda head: [early], message="add")
    assert hub.download(repo_id, "data/targets.safetensors", "main").read_bytes() == big.read_bytes()


def test_a_failed_early_upload_is_said_and_left_to_the_commit(hub, new_repo_id, tmp_path: Path):
    big = tmp_path / "targets.safetensors"
    big.write_bytes(b"x" * (12 << 20))
    notes = Notes()
    operations = EarlyUpload(hub, new_repo_id("never-created"), [(big, "data/targets.safetensors")]).operations(notes)
    assert operations == {}
    assert len(notes.warnings) == 1 and "data/targets.safetensors" in notes.warnings[0]
    assert "the commit uploads it" in notes.warnings[0]
