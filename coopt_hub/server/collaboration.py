"""A CoOpt collaboration's progress page, read from the JSON files its repo holds.

The documents: coopt/plan.json on main (the shards and their rows), shards/K/report.json on each
shard branch shard/K (who labeled the shard, with which prior, its V and the alignment's
residuals), and coopt/manifest.json at main and at every tag (what each merged version holds).
They come through a DocumentSource: the server's own storage, or the Hub client for
`coopt-hub status --html` on huggingface.co. The server shares no code with the client packages,
so the paths and fields are read here as the file formats define them.

Reports are written by participants: every field is checked for its type and a field of another
type shows as missing, never as an error; the templates escape every value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Protocol

from coopt_hub.server.pages import Links, render

PLAN_PATH = "coopt/plan.json"
MANIFEST_PATH = "coopt/manifest.json"
MAX_SHARDS = 10_000  # a plan claiming more is not one this page can show
_VERSION_TAG = re.compile(r"v(\d{1,9})")
_MAX_TEXT = 200

MISSING, NO_REPORT, STALE, DONE, MERGED = "missing", "unreadable or no report", "stale", "done", "merged"


def report_path(shard: int) -> str:
    return f"shards/{shard}/report.json"


def shard_branch(shard: int) -> str:
    return f"shard/{shard}"


class DocumentSource(Protocol):
    """Where a collaboration's documents come from."""

    def refs(self) -> tuple[dict[str, str], dict[str, str]]:
        """(branches, tags): name -> commit id."""

    def read_json(self, path: str, revision: str) -> object | None:
        """The parsed file at `revision`; None when absent; ValueError when it is not JSON."""


@dataclass(frozen=True)
class PlanSummary:
    source_repo: str
    source_revision: str
    split: str
    num_rows: int
    num_shards: int
    anchors: int
    dim: int | None
    plan_hash: str
    shard_rows: tuple[int | None, ...]  # rows each shard must label


@dataclass(frozen=True)
class ShardRow:
    shard: int
    branch: str
    commit: str | None
    status: str
    expected_rows: int | None
    participant: str | None = None
    prior: str | None = None
    rows: int | None = None
    uniformity: float | None = None  # V on the anchors, in the common space
    aligned_to: str | None = None  # "itself" (a reference) or "shard K"
    residual: float | None = None  # the alignment's, in-sample
    cv_residual: float | None = None  # the alignment's, held out
    merged_in: tuple[str, ...] = ()  # the versions holding this very commit of the shard


@dataclass(frozen=True)
class Version:
    tag: str
    commit: str
    shards: tuple[int, ...]
    reference: str | None
    rows: int | None
    missing: tuple[int, ...]
    verified: bool
    merged_commits: frozenset[tuple[int, str]]  # (shard, commit) of every shard it holds


@dataclass(frozen=True)
class Collaboration:
    repo: str
    plan: PlanSummary
    shards: tuple[ShardRow, ...]
    versions: tuple[Version, ...]  # newest first
    main_tag: str | None  # the version main holds

    @property
    def rows_done(self) -> int:
        return sum(row.rows or 0 for row in self.shards if row.status in (DONE, MERGED))

    @property
    def counts(self) -> list[tuple[str, int]]:
        states = (MERGED, DONE, STALE, NO_REPORT, MISSING)
        return [(state, n) for state in states if (n := sum(row.status == state for row in self.shards))]


def read_collaboration(repo: str, source: DocumentSource) -> Collaboration | None:
    """The collaboration in `repo`; None when main holds no plan. ValueError for a plan that does not read."""
    branches, tags = source.refs()
    main = branches.get("main")
    plan_document = source.read_json(PLAN_PATH, main) if main is not None else None
    if plan_document is None:
        return None
    plan = read_plan(plan_document)
    versions = _versions(source, tags)
    main_manifest = _read_or_none(source, MANIFEST_PATH, main)
    main_tag = _text(main_manifest.get("tag")) if isinstance(main_manifest, dict) else None
    on_main = next((v for v in versions if v.tag == main_tag), None)
    shards = tuple(_shard_row(source, plan, k, branches.get(shard_branch(k)), versions, on_main)
                   for k in range(plan.num_shards))
    return Collaboration(repo, plan, shards, versions, main_tag)


def read_plan(document: object) -> PlanSummary:
    if not isinstance(document, dict):
        raise ValueError(f"{PLAN_PATH} does not hold a JSON object")
    num_rows, num_shards = _integer(document.get("num_rows")), _integer(document.get("num_shards"))
    if num_rows is None or num_shards is None or not 1 <= num_shards <= min(num_rows, MAX_SHARDS):
        raise ValueError(f"{PLAN_PATH} does not give a number of rows and of shards (at most {MAX_SHARDS})")
    anchors = document.get("anchor_ids")
    return PlanSummary(
        source_repo=_text(document.get("source_repo")) or "?",
        source_revision=_text(document.get("source_revision")) or "?",
        split=_text(document.get("split")) or "?",
        num_rows=num_rows,
        num_shards=num_shards,
        anchors=len(anchors) if isinstance(anchors, list) else 0,
        dim=_integer(document.get("dim")),
        # The plan's hash, as coopt-hub defines it: sha256 of its canonical JSON (sorted keys, no spaces).
        plan_hash=hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest(),
        shard_rows=_shard_rows(document, num_rows, num_shards),
    )


def _shard_rows(document: dict, num_rows: int, num_shards: int) -> tuple[int | None, ...]:
    """Rows per shard: an even split of the rows (granularity "row"), else the rows of each shard's units."""
    if document.get("granularity") == "row":
        return tuple((k + 1) * num_rows // num_shards - k * num_rows // num_shards for k in range(num_shards))
    units, unit_shards = document.get("units"), document.get("unit_shards")
    counts = [0] * num_shards
    if not isinstance(units, list) or not isinstance(unit_shards, list) or len(units) != len(unit_shards):
        return (None,) * num_shards
    for unit, shard in zip(units, unit_shards):
        rows = _integer(unit.get("num_rows")) if isinstance(unit, dict) else None
        shard = _integer(shard)
        if rows is None or shard is None or not 0 <= shard < num_shards:
            return (None,) * num_shards
        counts[shard] += rows
    return tuple(counts)


def _versions(source: DocumentSource, tags: dict[str, str]) -> tuple[Version, ...]:
    """Every tag whose commit holds a manifest, newest version first."""
    versions = []
    for tag, commit in tags.items():
        manifest = _read_or_none(source, MANIFEST_PATH, commit)
        if isinstance(manifest, dict):
            versions.append(_version(_text(tag) or "?", commit, manifest))
    return tuple(sorted(versions, key=_version_order, reverse=True))


def _version_order(version: Version) -> tuple[int, str]:
    match = _VERSION_TAG.fullmatch(version.tag)
    return (int(match.group(1)) if match else -1, version.tag)


def _version(tag: str, commit: str, manifest: dict) -> Version:
    shards = [s for s in _list(manifest.get("shards")) if isinstance(s, dict) and _integer(s.get("shard")) is not None]
    reference = manifest.get("reference")
    reference_text = None
    if isinstance(reference, dict) and _integer(reference.get("shard")) is not None:
        prior = _prior_name(reference.get("prior"))
        reference_text = f"shard {_integer(reference['shard'])}" + (f" ({prior})" if prior else "")
    return Version(
        tag=tag,
        commit=commit,
        shards=tuple(_integer(s["shard"]) for s in shards),
        reference=reference_text,
        rows=_merged_rows(shards),
        missing=tuple(k for k in map(_integer, _list(manifest.get("missing"))) if k is not None),
        verified=bool(manifest.get("verification")),
        merged_commits=frozenset((_integer(s["shard"]), s.get("commit")) for s in shards
                                 if isinstance(s.get("commit"), str)),
    )


def _merged_rows(shards: list[dict]) -> int | None:
    rows = [_integer(s.get("rows")) for s in shards]
    return None if any(r is None for r in rows) else sum(rows)


def _shard_row(source: DocumentSource, plan: PlanSummary, k: int, commit: str | None,
               versions: tuple[Version, ...], on_main: Version | None) -> ShardRow:
    branch, expected = shard_branch(k), plan.shard_rows[k]
    if commit is None:
        return ShardRow(k, branch, None, MISSING, expected)
    report = _read_or_none(source, report_path(k), commit)
    if not isinstance(report, dict):
        return ShardRow(k, branch, commit, NO_REPORT, expected)
    merged_in = tuple(v.tag for v in versions if (k, commit) in v.merged_commits)
    stale = report.get("plan_hash", plan.plan_hash) != plan.plan_hash or report.get("shard", k) != k
    status = STALE if stale else MERGED if on_main is not None and (k, commit) in on_main.merged_commits else DONE
    counts = report.get("counts")
    alignment = report.get("alignment")
    return ShardRow(
        k, branch, commit, status, expected,
        participant=_text(report.get("participant")),
        prior=_prior_name(report.get("prior")),
        rows=_integer(counts.get("rows")) if isinstance(counts, dict) else None,
        uniformity=_number(report.get("uniformity")),
        aligned_to=_aligned_to(report["reference"]) if "reference" in report else None,
        residual=_number(report.get("residual")),
        cv_residual=_number(alignment.get("cv_residual")) if isinstance(alignment, dict) else None,
        merged_in=merged_in,
    )


def _aligned_to(reference: object) -> str | None:
    """A report's reference: null for a shard aligned to itself (it is the reference), else the shard it names."""
    if reference is None:
        return "itself"
    shard = _integer(reference.get("shard")) if isinstance(reference, dict) else None
    return None if shard is None else f"shard {shard}"


def _read_or_none(source: DocumentSource, path: str, revision: str) -> object | None:
    """A document, or None when it is absent or is not JSON (a participant's file may be anything)."""
    try:
        return source.read_json(path, revision)
    except ValueError:
        return None


def _prior_name(prior: object) -> str | None:
    """`model (pretrained tag)` of a prior spec."""
    if not isinstance(prior, dict) or _text(prior.get("model")) is None:
        return None
    pretrained = _text(prior.get("pretrained"))
    return _text(prior["model"]) + (f" ({pretrained})" if pretrained else "")


def _text(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= _MAX_TEXT else value[: _MAX_TEXT - 1] + "…"


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 53 else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value) if abs(value) < 1e300 else math.inf
    return value if math.isfinite(value) else None


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


# The chart ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    value: str
    y: int
    x: float
    width: float
    best: bool


@dataclass(frozen=True)
class Chart:
    """A horizontal bar per shard with a V, drawn from zero: V is at most 0, so bars grow leftwards
    and the longest is the most uniform prior."""

    width: int
    height: int
    plot_height: int
    label_right: int
    zero_x: float
    value_x: int
    bars: tuple[Bar, ...]


_ROW_HEIGHT, _LABEL_WIDTH, _PLOT_WIDTH, _GAP = 22, 230, 320, 10
_MAX_LABEL = 34


def v_chart(rows: tuple[ShardRow, ...]) -> Chart | None:
    """The chart of V per prior, or None when no shard reports a V."""
    measured = [row for row in rows if row.uniformity is not None]
    if not measured:
        return None
    low = min(0.0, *(row.uniformity for row in measured))
    high = max(0.0, *(row.uniformity for row in measured))
    span = (high - low) or 1.0
    left = _LABEL_WIDTH + _GAP

    def x(value: float) -> float:
        return round(left + (value - low) / span * _PLOT_WIDTH, 1)

    best = min(row.uniformity for row in measured)
    bars = []
    for index, row in enumerate(measured):
        label = f"shard {row.shard} · {row.prior or 'unknown prior'}"
        label = label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"
        start, end = sorted((x(0.0), x(row.uniformity)))
        bars.append(Bar(label, f"{row.uniformity:.4f}", index * _ROW_HEIGHT, start, round(end - start, 1),
                        row.uniformity == best))
    plot_height = len(measured) * _ROW_HEIGHT
    return Chart(width=left + _PLOT_WIDTH + 80, height=plot_height + 4, plot_height=plot_height,
                 label_right=_LABEL_WIDTH, zero_x=x(0.0), value_x=left + _PLOT_WIDTH + 8, bars=tuple(bars))


def collaboration_page(collab: Collaboration, base: str, repo_web_path: str) -> str:
    """The page of `collab`; links go under `base` ("" on the hub itself, else a Hub's address)."""
    links = Links(base, repo_web_path)
    return render("collaboration.html", title=f"{collab.repo} · collaboration", home=links.home, collab=collab,
                  plan=collab.plan, links=links, source_links=Links(base, f"datasets/{collab.plan.source_repo}"),
                  chart=v_chart(collab.shards))
