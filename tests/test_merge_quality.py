"""What `merge` records of target quality: the reference recomputed from stored anchor outputs (a
noise-like prior is never it), re-alignment chosen on held-out anchors, the quality figures in the
manifest, and a card that states only what was measured."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import yaml
from fakes import FakePrior, RecordingProgress
from helpers_hub import Collaboration

from coopt_hub.core.align import normalize, select_alignment
from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_PATH
from coopt_hub.core.manifest import MANIFEST_VERSION
from coopt_hub.core.shardfile import AnchorOutputs, ShardResult
from coopt_hub.platform.card import prior_label, size_category
from coopt_hub.platform.merge.commit import MergeResult
from coopt_hub.platform.evaluate import ProjectedAnchors, anchor_agreement
from coopt_hub.platform.merge.run import merge

GOOD = FakePrior("good-net", output_dim=40, rank=18)
MID = FakePrior("mid-net", output_dim=28, rank=12)
NOISE = FakePrior("noise-net", output_dim=32, rank=24, seed=7)


class NoiseOutputs:
    """An `edit` that swaps a shard's outputs for noise (unrelated to the images) and makes its header
    claim the best V of all, as a participant gaming the reference choice would."""

    def __init__(self, plan):
        self.plan = plan
        self.anchor_projected: np.ndarray | None = None

    def __call__(self, result: ShardResult, anchors: AnchorOutputs) -> None:
        rng = np.random.default_rng(11)
        projection = self.plan.projection(anchors.features.shape[1])
        anchors.features = normalize(rng.standard_normal(anchors.features.shape))
        anchors.projected = anchors.features @ projection
        result.raw = normalize(rng.standard_normal((result.ids.size, anchors.features.shape[1]))) @ projection
        result.aligned = result.raw
        result.header.uniformity = -100.0
        self.anchor_projected = anchors.projected


@dataclass
class Merged:
    collab: Collaboration
    result: MergeResult
    progress: RecordingProgress
    noise: NoiseOutputs
    manifest: dict
    card: str


@pytest.fixture(scope="module")
def merged(hub, new_collaboration, digits_source) -> Merged:
    """Shard 0 (GOOD) its own reference, shard 1 (MID) aligned to it, shard 2 noise that claims the best V."""
    collab = new_collaboration(digits_source, "digits-noise", shards=3, anchors=96, dim=16)
    first = collab.push(0, GOOD)
    collab.push(1, MID, reference=(0, GOOD, first))
    noise = NoiseOutputs(collab.plan)
    collab.push(2, NOISE, edit=noise)
    progress = RecordingProgress()
    result = merge(hub, collab.repo, progress=progress)
    manifest = json.loads(hub.download(collab.repo, MANIFEST_PATH, result.tag).read_text())
    card = hub.download(collab.repo, "README.md", result.tag).read_text()
    return Merged(collab, result, progress, noise, manifest, card)


def _card_yaml(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


# The reference and the alignment ---------------------------------------------------------------------


def test_a_noise_like_prior_claiming_the_best_v_is_not_the_reference(merged):
    manifest = merged.manifest
    assert manifest["reference"]["shard"] == 0, "the reference"
    by_shard = {s["shard"]: s for s in manifest["shards"]}
    assert by_shard[2]["noise_like"] and not by_shard[0]["noise_like"] and not by_shard[1]["noise_like"]
    assert by_shard[2]["uniformity"] != -100.0, "the header's claimed V was taken"
    ranking = manifest["ranking"]
    assert ranking["reference"] == "shard/0"
    assert [p["name"] for p in ranking["priors"]][-1] == "shard/2", "the noise-like prior is not ranked last"
    assert any("shard/2" in w and "noise" in w for w in merged.progress.warnings), merged.progress.warnings


def test_v_is_recomputed_in_the_common_space(merged):
    by_shard = {s["shard"]: s for s in merged.manifest["shards"]}
    priors = {p["name"]: p for p in merged.manifest["ranking"]["priors"]}
    for k in range(3):
        assert by_shard[k]["uniformity"] == priors[f"shard/{k}"]["common_uniformity"], f"shard {k}: common V"
        assert by_shard[k]["uniformity_native"] == priors[f"shard/{k}"]["native_uniformity"], f"shard {k}: native V"
    assert merged.manifest["reference"]["uniformity"] == by_shard[0]["uniformity"]


def test_a_shard_aligned_to_another_prior_is_realigned_by_held_out_choice(merged):
    collab, plan = merged.collab, merged.collab.plan
    shard = {s["shard"]: s for s in merged.manifest["shards"]}[2]
    _, reference_anchors = collab.projected(GOOD, np.asarray(plan.anchor_ids))
    fit = select_alignment(merged.noise.anchor_projected, reference_anchors)
    assert shard["realigned"], "shard 2 was its own reference: re-aligned at merge"
    assert shard["alignment"]["method"] == fit.method
    assert shard["alignment"]["cv_residual"] == pytest.approx(fit.cv_residual, rel=1e-6), "held-out residual"
    assert shard["realigned_residual"] == pytest.approx(fit.residual, rel=1e-6), "in-sample residual"
    # Noise cannot be predicted: the held-out residual says so, the in-sample one would not.
    assert fit.cv_residual > 0.9


def test_the_agreement_of_a_realigned_shard_reuses_its_map_to_the_same_figures(merged):
    """The merge hands the map it re-aligned shard 2 by to the anchor agreement instead of choosing
    it again: the recorded figures are those of choosing it afresh."""
    collab, plan = merged.collab, merged.collab.plan
    ids = np.asarray(plan.anchor_ids)
    fresh = anchor_agreement(ProjectedAnchors(ids, merged.noise.anchor_projected),
                             ProjectedAnchors(ids, collab.projected(GOOD, ids)[1]), shard=2)
    recorded = {a["shard"]: a for a in merged.manifest["quality"]["agreement"]}[2]
    assert recorded == json.loads(json.dumps(fresh.to_dict()))


def test_a_reference_its_participant_aligned_elsewhere_publishes_its_own_outputs(hub, digits_source,
                                                                                 new_collaboration):
    collab = new_collaboration(digits_source, "digits-late-best", shards=2, anchors=64, dim=8)
    first = collab.push(0, MID)
    collab.push(1, GOOD, reference=(0, MID, first))  # the better prior, aligned to the one there first
    result = merge(hub, collab.repo, images="reference", no_evaluate=True, progress=RecordingProgress())
    by_shard = {s.shard: s for s in result.manifest.shards}
    assert result.manifest.reference.shard == 1, "the reference"
    assert by_shard[1].realigned and by_shard[1].alignment is None, "the reference: its own outputs"
    assert by_shard[0].realigned and by_shard[0].alignment["method"], "shard 0: re-aligned to shard 1"
    stored = _targets(hub, collab.repo, result.tag)
    rows = collab.plan.shard_ids(1)
    assert np.array_equal(stored["targets"][rows], stored["raw"][rows]), "the reference's targets are its raw outputs"


def _targets(hub, repo: str, revision: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(hub.download(repo, TARGETS_PATH, revision))


def test_the_manifest_is_version_2_with_quality_and_sizes(merged):
    manifest = merged.manifest
    assert manifest["version"] == MANIFEST_VERSION == 2
    quality = manifest["quality"]
    assert quality["label_column"] == "label" and quality["rows"] == merged.collab.plan.num_rows
    assert set(quality["aligned"]["shards"]) == {"0", "1", "2"}
    assert quality["aligned"]["leave_one_shard_out"]["accuracy"] is not None
    assert [a["shard"] for a in quality["agreement"]] == [1, 2]
    train = manifest["splits"]["train"]
    assert train["num_bytes"] > 0 and train["file_bytes"] > 0


# The card --------------------------------------------------------------------------------------------


def test_the_card_claims_nothing_it_did_not_measure(merged):
    card = merged.card
    assert "faster and better" not in card and "better than with self-supervised" not in card
    assert "## Target quality" in card and "## Limitations" in card
    body = card.split("## Data")[0]
    assert "**Randomly initialised priors.**" in body, "random-init priors are not called out at the top"
    assert "0 (`good-net (random init, seed 0)`)" in body


def test_the_card_shows_the_measured_quality(merged):
    card, quality = merged.card, merged.manifest["quality"]
    aligned = quality["aligned"]
    row = (f"| aligned (`target`) | {aligned['overall']['probe']:.3f} | "
           f"{aligned['leave_one_shard_out']['accuracy']:.3f} | {aligned['overall']['knn']:.3f} |")
    assert row in card, "the aligned targets' figures"
    assert "raw, unaligned" in card
    assert f"on {quality['sampled']:,} of {quality['rows']:,} rows" in card


def test_the_priors_table_shows_held_out_next_to_in_sample_residuals(merged):
    shard = {s["shard"]: s for s in merged.manifest["shards"]}[2]
    assert "residual (in-sample) | residual (held-out)" in merged.card
    row = next(line for line in merged.card.splitlines() if line.startswith("| 2 | `noise-net"))
    assert f"| {shard['realigned_residual']:.4f} | {shard['alignment']['cv_residual']:.4f} | merge |" in row
    assert "| **yes** |" in row, "the noise flag"
    assert "**Noise-like prior**: the anchor outputs of shard 2" in merged.card


def test_the_card_cites_the_paper_and_states_limitations(merged):
    card = merged.card
    bibtex = re.search(r"```bibtex\n(.*?)```", card, re.S)
    assert bibtex, "no BibTeX block"
    assert "2505.14117" in bibtex.group(1) and "Collaborative Data Optimization" in bibtex.group(1)
    limitations = " ".join(card.split("## Limitations")[1].split("\n## ")[0].split())
    assert "96 anchors for 16-dimensional targets, 6.00 anchors per dimension" in limitations
    assert "random Gaussian matrix W" in limitations
    assert "**Random priors**" in limitations


def test_the_card_metadata_has_real_sizes(hub, merged):
    data = _card_yaml(merged.card)
    repo, tag = merged.collab.repo, merged.result.tag
    info = data["dataset_info"]
    files = [path for path in hub.list_files(repo, tag) if path.startswith("data/")]
    assert info["download_size"] == sum(hub.download(repo, path, tag).stat().st_size for path in files)
    assert info["dataset_size"] == sum(s["num_bytes"] for s in merged.manifest["splits"].values())
    assert {s["name"]: s["num_bytes"] for s in info["splits"]} == {
        name: s["num_bytes"] for name, s in merged.manifest["splits"].items()}
    assert data["size_categories"] == ["1K<n<10K"]


def test_no_evaluate_publishes_without_figures(hub, digits_source, new_collaboration):
    collab = new_collaboration(digits_source, "digits-unmeasured", shards=1, anchors=64, dim=8)
    collab.push(0, MID)
    result = merge(hub, collab.repo, images="reference", no_evaluate=True)
    assert result.manifest.quality is None
    card = hub.download(collab.repo, "README.md", result.tag).read_text()
    assert "Not measured (skipped at merge)" in card
    assert f"coopt-hub evaluate {collab.repo} --revision {result.tag}" in card


# Labels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prior", "label"), [
    ({"model": "ViT-S-32", "seed": 3}, "ViT-S-32 (random init, seed 3)"),
    ({"model": "ViT-B-32", "pretrained": "openai"}, "ViT-B-32/openai"),
    ({"model": "ViT-B-32", "checkpoint": "/w/b32.safetensors"}, "ViT-B-32 (b32.safetensors)"),
    ({"model": "hf-hub:timm/ViT-B-16-SigLIP"}, "hf-hub:timm/ViT-B-16-SigLIP"),
    ({"model": "timm:hf-hub:timm/vit_small_patch14_dinov2"}, "timm:hf-hub:timm/vit_small_patch14_dinov2"),
])
def test_prior_labels_say_random_init_only_for_random_weights(prior, label):
    assert prior_label(prior) == label


@pytest.mark.parametrize(("rows", "category"), [(999, "n<1K"), (1_000, "1K<n<10K"), (1_797, "1K<n<10K"),
                                                 (2_500_000, "1M<n<10M"), (10**13, "n>1T")])
def test_size_categories(rows, category):
    assert size_category(rows) == category
