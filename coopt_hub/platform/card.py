"""The dataset card of a merged version: YAML that `datasets` loads from, and a body for people.

Everything a participant wrote (prior names, fingerprints, fit methods) reaches the card through
core.shardfile.plain_text, so it reads as itself in markdown and HTML; a local checkpoint shows as
its file name and weight fingerprint (priors.spec.prior_label). The source is linked by repo id,
relative to the hub the card is read on.

The YAML declares the features (the fixed-length `target` included), one config whose data files
are the merged splits, so `load_dataset(repo, revision=tag)` needs no guessing, the size category
and the byte sizes of what was written. The body comes from the jinja template shipped in
dataset_cards/ and states only what was measured: the priors as ranked at merge, the alignment
residuals in-sample and held out, the target quality figures, and the limitations.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from coopt_hub import __version__
from coopt_hub.core.layout import ANCHORS_PATH, DATA_DIR
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import plain_text
from coopt_hub.platform.init import STABLE_ANCHORS_PER_DIM
from coopt_hub.priors.spec import PriorSpec, prior_label

if TYPE_CHECKING:
    from coopt_hub.core.manifest import Manifest, MergedShard

TEMPLATE = "coopt_dataset.md"
TAGS = ("coopt", "coopt-hub", "representation-learning", "knowledge-distillation")
# The Hub's size categories: the first whose bound exceeds the number of rows.
SIZE_CATEGORIES = (
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
    (10**11, "10B<n<100B"), (10**12, "100B<n<1T"),
)
CITATION = """@misc{shang2025coopt,
  title         = {Beyond Model-Centric: Collaborative Data Optimization for Reusing and Sharing},
  author        = {Shang and Sun and Liu and Lin},
  year          = {2025},
  eprint        = {2505.14117},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2505.14117}
}"""


def size_category(rows: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1T")


@dataclass(frozen=True)
class _SplitRow:
    name: str
    num_rows: int
    columns: tuple[str, ...]


def card_data(manifest: Manifest, features, source_card: dict[str, Any]):
    """The card's YAML: license from the source card, configs per split, features, split sizes in
    rows and bytes, and the size category of all rows."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    records = manifest.splits.values()
    data = DatasetCardData(
        license=source_card.get("license"),
        pretty_name=f"{manifest.source.repo} with CoOpt targets",
        task_categories=["image-feature-extraction"],
        size_categories=[size_category(sum(record.num_rows for record in records))],
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
        splits.add(SplitInfo(name=split, num_examples=record.num_rows, num_bytes=record.num_bytes or 0))
    info = DatasetInfo(features=features, splits=splits, dataset_size=_total(r.num_bytes for r in records),
                       download_size=_total(r.file_bytes for r in records))
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return data


def _total(sizes) -> int | None:
    """The sum of byte sizes, or None when a manifest from before they were recorded lacks one."""
    sizes = list(sizes)
    return None if any(size is None for size in sizes) else sum(sizes)


def render_card(manifest: Manifest, plan: Plan, features, source_card: dict[str, Any], repo: str) -> str:
    """README.md of a merged version, from the shipped template."""
    from huggingface_hub import DatasetCard

    template = resources.files("coopt_hub.dataset_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    reference = manifest.reference.shard
    shards = [_shard_row(shard, reference) for shard in manifest.shards]
    card = DatasetCard.from_template(
        card_data(manifest, features, source_card),
        template_str=template,
        pretty_name=f"{manifest.source.repo} with CoOpt targets",
        repo=repo,
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
        reference={**vars(manifest.reference),
                   "prior_name": prior_label(manifest.reference.prior, manifest.reference.fingerprint)},
        shards=shards,
        random_init=[row for row in shards if row["random_init"]],
        noise_like=[row["shard"] for row in shards if row["noise_like"]],
        realigned=[row["shard"] for row in shards if row["realigned"] and row["shard"] != reference],
        ranking=manifest.ranking,
        quality=_quality_view(manifest.quality),
        anchors=len(plan.anchor_ids),
        stable_anchors_per_dim=STABLE_ANCHORS_PER_DIM,
        projection=plan.projection_kind,
        temperature=plan.temperature,
        rows=manifest.splits[manifest.source.split].num_rows,
        plan_rows=plan.num_rows,
        num_shards=plan.num_shards,
        skipped={shard.shard: len(shard.skipped_ids) for shard in manifest.shards if shard.skipped_ids},
        partial=manifest.partial,
        missing=list(manifest.missing),
        plan_hash=manifest.plan_hash,
        verification=manifest.verification,
        citation=CITATION,
        tool_version=__version__,
    )
    return str(card)


def _figure(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.4f}"


def _shard_row(shard: MergedShard, reference: int) -> dict[str, Any]:
    """One row of the priors table: the prior, its V (native, common space), and the residuals of
    the map its published targets went through (in-sample and held out)."""
    alignment = shard.alignment or {}
    own_outputs = shard.shard == reference
    # Before schema version 2 a participant's map was a ridge of fixed strength and left no figures.
    method = alignment.get("method", "ridge (fixed strength)")
    in_sample = shard.realigned_residual if shard.realigned else shard.residual
    return {
        "shard": shard.shard,
        "branch": plain_text(shard.branch),
        "commit": plain_text(shard.commit),
        "fingerprint": plain_text(shard.fingerprint, limit=16),
        "prior_name": prior_label(shard.prior, shard.fingerprint),
        "random_init": PriorSpec.from_dict(shard.prior).random_init,
        "output_dim": shard.output_dim,
        "rows": shard.rows,
        "uniformity": _figure(shard.uniformity),
        "uniformity_native": _figure(shard.uniformity_native),
        "noise_like": shard.noise_like,
        "realigned": shard.realigned,
        "method": "none: the reference's own outputs" if own_outputs else plain_text(method),
        "residual": "-" if own_outputs else _figure(in_sample),
        "cv_residual": "-" if own_outputs else _figure(alignment.get("cv_residual")),
        "aligned_by": "-" if own_outputs else "merge" if shard.realigned else "participant",
    }


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _quality_view(quality: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's quality figures as the card's tables show them."""
    if quality is None:
        return None
    view = {**quality, "majority": _accuracy(quality["majority"]), "kinds": [], "shards": []}
    aligned, raw = quality["aligned"], quality["raw"]
    if aligned is not None:
        for name, scores in (("aligned (`target`)", aligned), ("raw, unaligned (`raw` of the targets file)", raw)):
            across = scores["leave_one_shard_out"]
            view["kinds"].append({"name": name, "probe": _accuracy(scores["overall"]["probe"]),
                                  "knn": _accuracy(scores["overall"]["knn"]),
                                  "loso": _accuracy(across["accuracy"] if across else None)})
        for shard, scores in aligned["shards"].items():
            held = [(kind["leave_one_shard_out"] or {}).get("groups", {}).get(shard) for kind in (aligned, raw)]
            view["shards"].append({"shard": shard, "rows": scores["rows"], "probe": _accuracy(scores["probe"]),
                                   "raw_probe": _accuracy(raw["shards"][shard]["probe"]),
                                   "knn": _accuracy(scores["knn"]), "raw_knn": _accuracy(raw["shards"][shard]["knn"]),
                                   "held": _accuracy(held[0]), "raw_held": _accuracy(held[1])})
    return view
