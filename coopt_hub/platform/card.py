"""The dataset card of a merged version: YAML that `datasets` loads from, and a body for people.

The YAML declares the features (the fixed-length `target` included) and one config whose data
files are the merged splits, so `load_dataset(repo, revision=tag)` needs no guessing. The body comes
from the jinja template shipped in dataset_cards/.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from coopt_hub import __version__
from coopt_hub.core.layout import ANCHORS_PATH, DATA_DIR
from coopt_hub.core.plan import Plan

if TYPE_CHECKING:
    from coopt_hub.core.manifest import Manifest

TEMPLATE = "coopt_dataset.md"
TAGS = ("coopt", "coopt-hub", "representation-learning", "knowledge-distillation")


def prior_label(prior: dict[str, Any]) -> str:
    """`model/pretrained` for a released checkpoint; randomly initialised priors say so with their seed."""
    name = prior.get("model", "?")
    if prior.get("pretrained"):
        return f"{name}/{prior['pretrained']}"
    if prior.get("checkpoint"):
        return f"{name} ({prior['checkpoint']})"
    return f"{name} (random init, seed {prior.get('seed', 0)})"


@dataclass(frozen=True)
class _SplitRow:
    name: str
    num_rows: int
    columns: tuple[str, ...]


def card_data(manifest: Manifest, features, source_card: dict[str, Any]):
    """The card's YAML: license from the source card, configs per split, features and split sizes."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        license=source_card.get("license"),
        pretty_name=f"{manifest.source.repo} with CoOpt targets",
        task_categories=["image-feature-extraction"],
        source_datasets=[manifest.source.repo],
        tags=list(TAGS),
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"{DATA_DIR}/{split}-*"} for split in manifest.splits],
            },
            # Kept from the card `init` wrote, so the shared anchor rows stay browsable.
            {"config_name": "anchors", "data_files": [{"split": "anchors", "path": ANCHORS_PATH}]},
        ],
    )
    splits = SplitDict()
    for split, record in manifest.splits.items():
        splits.add(SplitInfo(name=split, num_examples=record.num_rows))
    DatasetInfosDict({"default": DatasetInfo(features=features, splits=splits)}).to_dataset_card_data(data)
    return data


def render_card(manifest: Manifest, plan: Plan, features, source_card: dict[str, Any], repo: str, endpoint: str) -> str:
    """README.md of a merged version, from the shipped template."""
    from huggingface_hub import DatasetCard

    template = resources.files("coopt_hub.dataset_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    shards = [{**vars(shard), "prior_name": prior_label(shard.prior)} for shard in manifest.shards]
    reference = {**vars(manifest.reference), "prior_name": prior_label(manifest.reference.prior)}
    train = manifest.splits[manifest.source.split]
    card = DatasetCard.from_template(
        card_data(manifest, features, source_card),
        template_str=template,
        pretty_name=f"{manifest.source.repo} with CoOpt targets",
        repo=repo,
        endpoint=endpoint.rstrip("/"),
        tag=manifest.tag,
        source_repo=manifest.source.repo,
        source_revision=manifest.source.revision,
        split=manifest.source.split,
        image_column=manifest.source.image_column,
        images=manifest.images,
        dim=manifest.dim,
        label_column=manifest.label_column,
        splits=[_SplitRow(name, record.num_rows, tuple(features)) for name, record in manifest.splits.items()],
        other_splits=[name for name in manifest.splits if name != manifest.source.split],
        reference=reference,
        shards=shards,
        realigned=[shard.shard for shard in manifest.shards if shard.realigned],
        anchors=len(plan.anchor_ids),
        temperature=plan.temperature,
        rows=train.num_rows,
        plan_rows=plan.num_rows,
        num_shards=plan.num_shards,
        skipped={shard.shard: len(shard.skipped_ids) for shard in manifest.shards if shard.skipped_ids},
        partial=manifest.partial,
        missing=list(manifest.missing),
        plan_hash=manifest.plan_hash,
        verification=manifest.verification,
        tool_version=__version__,
    )
    return str(card)
