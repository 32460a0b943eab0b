"""datasets.push_to_hub and load_dataset (normal and streaming) against the embedded server."""

from __future__ import annotations

import datasets


def test_push_to_hub_then_load_at_a_tag(hf_api, repo_id):
    datasets.Dataset.from_dict({"id": [0, 1, 2], "label": ["a", "b", "c"]}).push_to_hub(repo_id)
    hf_api.create_tag(repo_id, tag="v1", repo_type="dataset")
    datasets.Dataset.from_dict({"id": [9], "label": ["z"]}).push_to_hub(repo_id)

    tagged = datasets.load_dataset(repo_id, revision="v1", split="train")
    assert tagged["id"] == [0, 1, 2] and tagged["label"] == ["a", "b", "c"]
    latest = datasets.load_dataset(repo_id, split="train")
    assert latest["id"] == [9]

    streamed = datasets.load_dataset(repo_id, revision="v1", split="train", streaming=True)
    assert [row["id"] for row in streamed] == [0, 1, 2]


def test_push_to_hub_on_a_shard_branch(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.create_branch(repo_id, branch="shard/3", repo_type="dataset")
    datasets.Dataset.from_dict({"x": list(range(50))}).push_to_hub(repo_id, revision="shard/3")
    loaded = datasets.load_dataset(repo_id, revision="shard/3", split="train")
    assert loaded["x"] == list(range(50))
    assert [row["x"] for row in datasets.load_dataset(repo_id, revision="shard/3", split="train",
                                                      streaming=True)][:3] == [0, 1, 2]
