"""Priors' published weights come from the weights endpoint, whatever hub the collaboration runs on.

Two embedded hubs: the session's (HF_ENDPOINT, the collaboration) and a mirror holding a model repo
that `coopt-hub hub import-model` put there (a small random open_clip model, saved as open_clip's
`hf-hub:` loader expects it). `optimize --model hf-hub:ORG/NAME --weights-endpoint MIRROR` labels
with exactly those weights; a wrong weights endpoint fails naming the URL, with a next step that works.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx2
import open_clip
import timm
import pytest
import torch
from cli_run import Outcome
from cli_run import run_main as run_cli
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.hf_api import RepoFile
from network_faults import free_port
from safetensors.torch import save_file

from coopt_hub.priors import PriorSpec, load_prior
from coopt_hub.priors.base import fingerprint_weights
from coopt_hub.priors.weights import WEIGHTS_ENDPOINT_ENV
from coopt_hub.server import HubServer

BIN = Path(sys.executable).parent
MIRROR_TOKEN = "mirror-write-token"
# A CLIP small enough to label 150 images of 32 px in a moment: 2 vision blocks of width 64.
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
}


def run_main(argv: list[str]) -> Outcome:
    """The weights endpoint that --weights-endpoint sets for the process is put back afterwards."""
    return run_cli(argv, {WEIGHTS_ENDPOINT_ENV: None, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


@dataclass(frozen=True)
class SavedModel:
    repo_id: str
    folder: Path
    fingerprint: str  # of the image tower, as coopt-hub records a prior's


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> SavedModel:
    """A random open_clip model in the layout of an `hf-hub:` repo: open_clip_config.json and its weights."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = open_clip.model.CLIP(**TINY_CLIP["model_cfg"])
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return SavedModel(f"org/tiny-clip-{uuid.uuid4().hex[:8]}", folder, fingerprint_weights(model.visual.eval()))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("mirror"), tokens=[MIRROR_TOKEN]) as server:
        yield server


@pytest.fixture(scope="module")
def imported(mirror, saved_model) -> dict:
    """The model put into the mirror with `coopt-hub hub import-model`; its --json answer."""
    done = run_main(["hub", "import-model", saved_model.repo_id, "--from", str(saved_model.folder),
                     "--endpoint", mirror.endpoint, "--token", MIRROR_TOKEN, "--json"])
    assert done.code == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def collab(small_source, new_collaboration):
    """On the session's hub (HF_ENDPOINT): 2 shards of 120 rows and 32 anchors."""
    return new_collaboration(small_source, "weights", shards=2, anchors=32, dim=16)


def file_digests(api: HfApi, repo_id: str) -> dict[str, str]:
    """Path -> sha256 (LFS files) or git blob id (the others), as the hub states them."""
    return {entry.path: entry.lfs.sha256 if entry.lfs else entry.blob_id
            for entry in api.list_repo_tree(repo_id, recursive=True) if isinstance(entry, RepoFile)}


def test_import_model_is_one_commit_of_the_folder_and_a_rerun_commits_nothing(mirror, saved_model, imported):
    api = HfApi(endpoint=mirror.endpoint, token=MIRROR_TOKEN)
    weights = saved_model.folder / "open_clip_model.safetensors"
    digests = file_digests(api, saved_model.repo_id)
    assert digests["open_clip_model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "open_clip_config.json" in digests
    assert imported["created"] and sorted(imported["sent"]) == ["open_clip_config.json", "open_clip_model.safetensors"]
    commits = api.list_repo_commits(saved_model.repo_id)
    assert commits[0].commit_id == imported["commit"]

    again = run_main(["hub", "import-model", saved_model.repo_id, "--from", str(saved_model.folder),
                      "--endpoint", mirror.endpoint, "--token", MIRROR_TOKEN, "--json"])
    assert again.code == 0, again.stderr
    rerun = json.loads(again.stdout)
    assert not rerun["created"] and rerun["sent"] == [] and rerun["commit"] == imported["commit"]
    assert len(api.list_repo_commits(saved_model.repo_id)) == len(commits), "a rerun made a commit"


def test_optimize_loads_hf_hub_weights_from_the_mirror_while_collaborating_on_another_hub(
        collab, mirror, saved_model, imported, tmp_path):
    collaboration_endpoint = os.environ["HF_ENDPOINT"]
    assert collaboration_endpoint != mirror.endpoint
    assert not HfApi().repo_exists(saved_model.repo_id), "the collaboration's hub must not hold the model"
    done = run_main(["optimize", collab.repo, "--shard", "0", "--model", f"hf-hub:{saved_model.repo_id}",
                     "--weights-endpoint", mirror.endpoint, "--workdir", str(tmp_path), "--json"])
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)["report"]
    assert report["fingerprint"] == saved_model.fingerprint, "not the weights saved into the mirror"
    assert report["prior"]["model"] == f"hf-hub:{saved_model.repo_id}", "the recorded prior names the repo"
    assert os.environ["HF_ENDPOINT"] == collaboration_endpoint, "the collaboration's endpoint was changed"
    assert "WARNING:root" not in done.stderr and "ERROR:root" not in done.stderr, done.stderr


def test_a_pretrained_open_clip_tag_loads_from_the_weights_endpoint_with_the_tags_preprocessing(
        mirror, saved_model, imported, monkeypatch):
    # Every real tag names a model too large to make up here; this one names the mirror's small model.
    tag = {"hf_hub": f"{saved_model.repo_id}/", "mean": (0.1, 0.2, 0.3), "std": (0.3, 0.2, 0.1)}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test-clip", TINY_CLIP["model_cfg"])
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test-clip", {"mirror": tag})
    monkeypatch.setenv(WEIGHTS_ENDPOINT_ENV, mirror.endpoint)
    prior = load_prior(PriorSpec("tiny-test-clip", pretrained="mirror"))
    assert prior.fingerprint == saved_model.fingerprint, "not the weights of the tag's repo"
    assert (prior.preprocessing.mean, prior.preprocessing.std) == (tag["mean"], tag["std"]), \
        "not the tag's preprocessing"


def test_a_pretrained_timm_tag_loads_from_the_weights_endpoint(mirror, tmp_path, monkeypatch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        published = timm.create_model("resnet10t")  # with its classifier, as timm publishes weights
    folder = tmp_path / "resnet10t"
    folder.mkdir()
    save_file(published.state_dict(), str(folder / "model.safetensors"))
    done = run_main(["hub", "import-model", "timm/resnet10t.c3_in1k", "--from", str(folder),
                     "--endpoint", mirror.endpoint, "--token", MIRROR_TOKEN])
    assert done.code == 0, done.stderr
    features = timm.create_model("resnet10t", num_classes=0)
    features.load_state_dict({key: value for key, value in published.state_dict().items() if not key.startswith("fc.")})

    # A cache of this test's own: the session's must not hold timm's real tag for the tests that expect none.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv(WEIGHTS_ENDPOINT_ENV, mirror.endpoint)
    prior = load_prior(PriorSpec("timm:resnet10t", pretrained="c3_in1k", image_size=32))
    assert prior.fingerprint == fingerprint_weights(features.eval()), "not the weights imported into the mirror"


def test_a_weights_endpoint_without_the_repo_names_the_url_and_how_to_put_it_there(collab, tmp_path):
    # A repo the hf cache has never held: huggingface_hub serves cached files whatever the endpoint answers.
    collaboration_endpoint, repo_id = os.environ["HF_ENDPOINT"], "org/not-on-this-hub"
    done = run_main(["optimize", collab.repo, "--shard", "0", "--model", f"hf-hub:{repo_id}",
                     "--weights-endpoint", collaboration_endpoint, "--workdir", str(tmp_path)])
    assert done.code == 1, done.stderr
    assert f"{collaboration_endpoint}/{repo_id}/resolve/main/open_clip_config.json" in done.stderr, done.stderr
    assert f"coopt-hub hub import-model {repo_id} --from DIR --endpoint {collaboration_endpoint}" in done.stderr, \
        done.stderr
    assert "ERROR:root" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_unreachable_weights_endpoint_fails_fast_naming_the_url(collab, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_main(["optimize", collab.repo, "--shard", "0", "--model", "hf-hub:org/never-downloaded",
                     "--weights-endpoint", endpoint, "--workdir", str(tmp_path)])
    assert done.code == 1, done.stderr
    assert time.monotonic() - started < 10, "waited for an endpoint that refuses connections"
    assert f"{endpoint}/org/never-downloaded/resolve/main/open_clip_config.json" in done.stderr, done.stderr
    assert f"Start the hub at {endpoint}" in done.stderr, "the next step names the endpoint to start"
    assert "ERROR:root" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_import_model_from_the_hf_cache_into_an_air_gapped_hub(mirror, saved_model, imported, tmp_path):
    # Into this machine's hf cache, as on a machine that reaches the mirror.
    snapshot_download(saved_model.repo_id, endpoint=mirror.endpoint, token=MIRROR_TOKEN)
    with HubServer(tmp_path / "air-gapped", tokens=["air"]) as air_gapped:
        done = run_main(["hub", "import-model", saved_model.repo_id, "--from", constants.HF_HUB_CACHE,
                         "--endpoint", air_gapped.endpoint, "--token", "air", "--json"])
        assert done.code == 0, done.stderr
        copied = file_digests(HfApi(endpoint=air_gapped.endpoint, token="air"), saved_model.repo_id)
    original = file_digests(HfApi(endpoint=mirror.endpoint, token=MIRROR_TOKEN), saved_model.repo_id)
    assert copied == {path: digest for path, digest in original.items() if path in copied}
    assert set(copied) >= {"open_clip_config.json", "open_clip_model.safetensors"}


def test_import_model_without_the_repo_in_the_cache_says_where_it_looked(tmp_path):
    done = run_main(["hub", "import-model", "org/not-cached", "--from", str(tmp_path)])
    assert done.code == 2 and "holds no files" in done.stderr, done.stderr
    (tmp_path / "models--org--not-cached").mkdir()
    done = run_main(["hub", "import-model", "org/not-cached", "--from", str(tmp_path)])
    assert done.code == 2 and f"The hf cache {tmp_path} holds no snapshot of org/not-cached" in done.stderr, \
        done.stderr


def test_serve_links_answers_to_its_public_url(tmp_path):
    port = free_port()
    public = f"http://localhost:{port}"
    server = subprocess.Popen([str(BIN / "coopt-hub"), "hub", "serve", "--root", str(tmp_path / "root"),
                               "--port", str(port), "--token", "t", "--public-url", public, "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = dict(server.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(3))
        assert printed["HF_ENDPOINT"] == public
        # Reached at the address it listens on, as a reverse proxy would reach it.
        created = httpx2.post(f"http://127.0.0.1:{port}/api/repos/create", headers={"Authorization": "Bearer t"},
                              json={"type": "dataset", "organization": "org", "name": "linked"})
        assert created.json()["url"] == f"{public}/datasets/org/linked", created.text
    finally:
        server.terminate()
        server.wait(timeout=30)
