"""`coopt-hub prepare-source`: a dataset published with `push_to_hub` (one row group per file) becomes
a copy that `init` splits by row group, so that each participant downloads only its share; the same
rows, ids and splits, in one commit, and a rerun commits nothing."""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, hf_hub_download
from PIL import Image

from coopt_hub.cli import main
from coopt_hub.platform.init import initialize
from coopt_hub.platform.prepare import GROUPS_PER_SHARD, RECORD_PATH

_spec = importlib.util.spec_from_file_location("download_bench", Path(__file__).parents[1] / "benchmarks/download.py")
download_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download_bench)

SHARDS = 3


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `coopt-hub ARGV` in this process, through the console script's error handling."""
    with CliRunner().isolation(env={"COOPT_HUB_DEBUG": None, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}) as (out, err, _):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture(scope="module")
def pushed(hub_server) -> str:
    """Incompressible 64 px images (train: 480 rows, test: 60) published the usual way, with push_to_hub."""
    rng = np.random.default_rng(3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def split(first: int, count: int) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict({"image": images, "label": list(range(first, first + count))},
                                          features=features)

    repo = f"org/pushed-{uuid.uuid4().hex[:8]}"
    datasets.DatasetDict({"train": split(0, 480), "test": split(480, 60)}).push_to_hub(repo, token=hub_server.token)
    return repo


@pytest.fixture(scope="module")
def prepared(pushed) -> dict:
    """`coopt-hub prepare-source` of `pushed` for SHARDS shards; its --json answer."""
    code, stdout, stderr = run_main(["prepare-source", pushed, f"{pushed}-prepared", "--shards", str(SHARDS),
                                     "--json"])
    assert code == 0, stderr
    return json.loads(stdout)


def split_files(repo: str) -> dict[str, list[Path]]:
    """The local copies of each split's parquet files, as `load_dataset` resolves them, in id order."""
    found: dict[str, list[Path]] = {}
    for split, urls in datasets.load_dataset_builder(repo).config.data_files.items():
        for url in urls:  # hf://datasets/ORG/NAME@SHA/PATH
            revision, path = url.removeprefix(f"hf://datasets/{repo}@").split("/", 1)
            found.setdefault(str(split), []).append(
                Path(hf_hub_download(repo, path, repo_type="dataset", revision=revision)))
    return found


def rows(files: list[Path]) -> list[dict]:
    return [row for file in files for row in pq.read_table(file).to_pylist()]


def test_the_copy_holds_the_same_rows_ids_and_splits_in_row_groups_sized_for_the_shards(pushed, prepared):
    source, copy = split_files(pushed), split_files(prepared["dest"])
    assert sorted(copy) == sorted(source) == ["test", "train"]
    assert [pq.ParquetFile(file).metadata.num_row_groups for file in source["train"]] == [1], \
        "push_to_hub writes one row group: the case prepare-source is for"
    for split in source:
        assert rows(copy[split]) == rows(source[split]), f"split {split}: other rows or another order"
    groups = [pq.ParquetFile(file).metadata.row_group(i).num_rows
              for file in copy["train"] for i in range(pq.ParquetFile(file).metadata.num_row_groups)]
    assert groups == [40] * (GROUPS_PER_SHARD * SHARDS), groups
    features = datasets.load_dataset_builder(prepared["dest"]).info.features
    assert isinstance(features["image"], datasets.Image), "the copy lost the Image feature"


def test_participants_of_the_copy_fetch_only_their_share(hub, hub_server, pushed, prepared, new_repo_id, tmp_path):
    settings = dict(source_revision=None, split="train", image_column="image", shards=SHARDS, anchors=6, dim=8,
                    seed=1, temperature=2.0)
    assert initialize(hub, new_repo_id("as-pushed"), source=pushed, **settings).plan.granularity == "row"
    repo = new_repo_id("prepared-coopt")
    plan = initialize(hub, repo, source=prepared["dest"], **settings).plan
    assert plan.granularity == "row_group"
    copy_bytes = sum(file.stat().st_size for file in split_files(prepared["dest"])["train"])
    fetched = download_bench.participant_bytes(hub_server, repo, SHARDS, tmp_path)
    for shard, nbytes in enumerate(fetched):
        share = copy_bytes * len(plan.shard_ids(shard)) / plan.num_rows
        assert nbytes <= 1.2 * share, (shard, nbytes, share)


def test_a_rerun_makes_no_commit_and_other_sizes_replace_the_copy(pushed, prepared):
    api = HfApi()
    dest = prepared["dest"]
    commits = len(api.list_repo_commits(dest, repo_type="dataset"))
    code, stdout, stderr = run_main(["prepare-source", pushed, dest, "--shards", str(SHARDS), "--json"])
    assert code == 0, stderr
    again = json.loads(stdout)
    assert not again["created"] and again["commit"] == prepared["commit"] and again["splits"] == prepared["splits"]
    assert len(api.list_repo_commits(dest, repo_type="dataset")) == commits, "a rerun made a commit"

    code, stdout, stderr = run_main(["prepare-source", pushed, dest, "--rows-per-group", "100", "--json"])
    assert code == 0, stderr
    resized = json.loads(stdout)
    assert resized["created"] and len(api.list_repo_commits(dest, repo_type="dataset")) == commits + 1
    record = json.loads(Path(hf_hub_download(dest, RECORD_PATH, repo_type="dataset")).read_text())
    assert record["rows_per_group"] == {"train": 100, "test": 100} and record["revision"] == prepared["revision"]
    data = [path for path in api.list_repo_files(dest, repo_type="dataset") if path.startswith("data/")]
    assert sorted(data) == sorted(f for split in resized["splits"] for f in split["files"]), "stale data files"
    assert rows(split_files(dest)["train"]) == rows(split_files(pushed)["train"])


def test_the_options_are_checked_before_anything_is_read(pushed):
    code, _, stderr = run_main(["prepare-source", pushed, pushed, "--shards", "2"])
    assert code == 2 and "give it a new repo" in stderr, stderr
    code, _, stderr = run_main(["prepare-source", pushed, "org/elsewhere", "--shards", "2", "--rows-per-group", "5"])
    assert code == 2 and "not both" in stderr, stderr
