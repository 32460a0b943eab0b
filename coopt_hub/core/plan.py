"""The plan: which rows each participant labels, the shared anchor rows, and the projection to the
common size (the random W, or each participant's own PCA basis).

Everything a participant derives from the plan must come out the same on every machine, so the
random choices are stored where they are small (the shard of each unit, the anchor ids) and are
otherwise derived from the seed through NumPy's PCG64 *bit* stream. NumPy keeps that raw stream
stable across versions; the distribution methods of `Generator` may change between releases
(NEP 19), and two participants disagreeing on a row permutation would label overlapping shards.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass

import numpy as np

from coopt_hub.core.layout import PLAN_PATH
from coopt_hub.errors import ConfigError, PlanError

SCHEMA_VERSION = 1
GRANULARITIES = ("row_group", "file", "row")
# How prior outputs reach the common size: the plan's random W, or a PCA basis each participant fits
# on its own shard's outputs (stored with its anchors), which keeps the reference prior's geometry.
PROJECTIONS = ("random", "pca")
DEFAULT_PROJECTION = "random"

# Independent random streams drawn from one seed, one per decision.
_UNIT_STREAM = 0
_ROW_STREAM = 1
_ANCHOR_STREAM = 2
_PROJECTION_STREAM = 3

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Unit:
    """One storage unit of the source split; its sample ids are start..start+num_rows-1."""

    file: str
    row_group: int | None  # None: the whole file
    start: int
    num_rows: int

    @property
    def stop(self) -> int:
        return self.start + self.num_rows


@dataclass(frozen=True)
class Plan:
    """The platform's split of one pinned source split into K shards plus the shared anchors S."""

    source_repo: str
    source_revision: str
    split: str
    image_column: str
    num_rows: int
    num_shards: int
    seed: int
    dim: int
    temperature: float
    granularity: str
    units: tuple[Unit, ...]
    unit_shards: tuple[int, ...]
    anchor_ids: tuple[int, ...]
    schema_version: int = 1
    # Stored as "projection", and only when it is not the default: the plans of earlier releases
    # (and so their hashes, which shard headers and manifests pin) stay byte for byte the same.
    # The attribute has another name because `projection(in_dim)` is the random W itself.
    projection_kind: str = DEFAULT_PROJECTION

    def __post_init__(self) -> None:
        # Plans also arrive as JSON from the Hub, so a plan checks itself, not only make_plan.
        _check_settings(self.num_shards, self.dim, self.temperature, self.seed)
        _check_projection(self.projection_kind)
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(
                f"Plan schema version {self.schema_version} is not supported "
                f"(this coopt-hub reads {SCHEMA_VERSION}).",
                hint="Upgrade coopt-hub to the version that wrote the plan.",
            )
        if not _COMMIT_SHA.fullmatch(self.source_revision):
            raise PlanError(
                f"The plan must pin the source to a 40-hex commit sha, got {self.source_revision!r}.",
                hint="Resolve the branch or tag to its commit first (HfApi().dataset_info(repo, revision=...).sha).",
            )
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"Unknown plan granularity {self.granularity!r}; expected one of {GRANULARITIES}.")
        _check_units(self.units, self.num_rows)
        if self.num_shards > self.num_rows:
            raise PlanError(
                f"Cannot split {self.num_rows} rows into {self.num_shards} shards.",
                hint=f"Use at most {self.num_rows} shards.",
            )
        if self.granularity == "row":
            if self.unit_shards:
                raise PlanError("A plan with granularity 'row' assigns rows, not units, but lists unit_shards.")
        else:
            self._check_unit_shards()
        self._check_anchor_ids()

    def _check_unit_shards(self) -> None:
        if len(self.unit_shards) != len(self.units):
            raise PlanError(f"The plan lists {len(self.units)} units but {len(self.unit_shards)} unit shards.")
        rows_per_shard = [0] * self.num_shards
        for unit, shard in zip(self.units, self.unit_shards):
            if not 0 <= shard < self.num_shards:
                raise PlanError(f"Unit {unit.file} (row group {unit.row_group}) is assigned to shard {shard}, "
                                f"outside 0..{self.num_shards - 1}.")
            rows_per_shard[shard] += unit.num_rows
        empty = [k for k, rows in enumerate(rows_per_shard) if rows == 0]
        if empty:
            raise PlanError(f"Shards {empty} of the plan hold no rows.")

    def _check_anchor_ids(self) -> None:
        ids = np.asarray(self.anchor_ids, dtype=np.int64)
        if ids.size == 0:
            raise PlanError("The plan has no anchor ids; alignment needs at least one shared row.")
        if ids[0] < 0 or ids[-1] >= self.num_rows or np.any(np.diff(ids) <= 0):
            raise PlanError(f"Anchor ids must be sorted, unique and within 0..{self.num_rows - 1}.")

    def _check_shard(self, k: int) -> None:
        if not 0 <= k < self.num_shards:
            raise PlanError(
                f"Shard {k} does not exist; this plan has shards 0..{self.num_shards - 1}.",
                hint="Pick a shard number below the plan's shard count (`coopt-hub status REPO` lists them).",
            )

    def shard_ids(self, k: int) -> np.ndarray:
        """Sample ids of shard k, int64 and sorted."""
        self._check_shard(k)
        if self.granularity == "row":
            order = _row_order(self.seed, self.num_rows)
            bounds = _even_bounds(self.num_rows, self.num_shards)
            return np.sort(order[bounds[k]:bounds[k + 1]])
        # Units are stored sorted by start, so concatenating their ranges keeps ids sorted.
        ranges = [np.arange(u.start, u.stop, dtype=np.int64)
                  for u, shard in zip(self.units, self.unit_shards) if shard == k]
        return np.concatenate(ranges)

    def shard_units(self, k: int) -> list[Unit]:
        """Units holding rows of shard k: with granularity 'row', every unit (keep shard_ids of it)."""
        self._check_shard(k)
        if self.granularity == "row":
            return list(self.units)
        return [u for u, shard in zip(self.units, self.unit_shards) if shard == k]

    def projection(self, in_dim: int) -> np.ndarray:
        """The fixed random map W from an in_dim prior output to the common dim, float32 [in_dim, dim].

        Entries are N(0, 1/dim), so squared norms are preserved in expectation. Every participant
        whose prior has the same output size gets the same W.
        """
        if in_dim < 1:
            raise ConfigError(f"A projection needs an input size of at least 1, got {in_dim}.")
        raw = np.random.PCG64(np.random.SeedSequence([self.seed, _PROJECTION_STREAM, in_dim]))
        gaussian = _box_muller(raw, in_dim * self.dim)
        return (gaussian / math.sqrt(self.dim)).astype(np.float32).reshape(in_dim, self.dim)

    @property
    def plan_hash(self) -> str:
        """sha256 of the canonical JSON, so reformatting plan.json does not change it."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        """The plan as plan.json holds it."""
        data = asdict(self)
        kind = data.pop("projection_kind")
        if kind != DEFAULT_PROJECTION:
            data["projection"] = kind
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            data["projection_kind"] = data.pop("projection", DEFAULT_PROJECTION)
            units = tuple(Unit(file=u["file"], row_group=u["row_group"], start=int(u["start"]),
                               num_rows=int(u["num_rows"])) for u in data.pop("units"))
            unit_shards = tuple(int(k) for k in data.pop("unit_shards"))
            anchor_ids = tuple(int(i) for i in data.pop("anchor_ids"))
            data["temperature"] = float(data["temperature"])
            return cls(units=units, unit_shards=unit_shards, anchor_ids=anchor_ids, **data)
        except (ValueError, KeyError, TypeError, AttributeError, PlanError) as err:
            # The plan's own checks (PlanError) mostly carry no hint: from a file, the fix is the same.
            raise PlanError(
                f"{PLAN_PATH} is not a valid plan: {err}",
                hint=getattr(err, "hint", None) or "Recreate the repo's plan with `coopt-hub init`, or check that "
                "the file was not edited by hand.",
            ) from err


def make_plan(*, source_repo: str, source_revision: str, split: str, image_column: str,
              units: list[Unit] | tuple[Unit, ...], num_shards: int, anchors: int | float,
              dim: int, seed: int, temperature: float, projection: str = DEFAULT_PROJECTION,
              excluded_anchors: Collection[int] = ()) -> Plan:
    """Assign storage units (or, when they are too few, rows) to shards and draw the anchor ids.

    Units go to shards at random but balanced by rows, so each participant downloads only its units.
    With fewer than two non-empty units per shard that balance is too coarse, and rows are assigned
    instead by a seeded permutation; every participant then reads all units and keeps its rows.
    Anchors are the first rows of a seeded permutation; ids in `excluded_anchors` (rows whose image
    does not decode) are passed over for the next ones, so the same exclusions give the same plan.
    """
    _check_settings(num_shards, dim, temperature, seed)
    _check_projection(projection)
    ordered = tuple(sorted(units, key=lambda u: u.start))
    num_rows = _check_units(ordered, None)
    if num_shards > num_rows:
        raise PlanError(f"Cannot split {num_rows} rows into {num_shards} shards.",
                        hint=f"Use at most {num_rows} shards.")
    non_empty = sum(1 for u in ordered if u.num_rows > 0)
    if non_empty < 2 * num_shards:
        granularity, unit_shards = "row", ()
    else:
        granularity = "row_group" if any(u.row_group is not None for u in ordered) else "file"
        unit_shards = _balance_units(ordered, num_shards, seed)
    count = anchor_count(anchors, num_rows)
    order = _random_order(seed, _ANCHOR_STREAM, num_rows)
    eligible = order[~np.isin(order, np.fromiter(excluded_anchors, dtype=np.int64))]
    if eligible.size < count:
        raise PlanError(f"Only {eligible.size} of {num_rows} rows can be anchors once the {num_rows - eligible.size} "
                        f"undecodable ones are left out; {count} are asked for.",
                        hint="Pass fewer --anchors, or fix the source's images.")
    anchor_ids = np.sort(eligible[:count])
    return Plan(source_repo=source_repo, source_revision=source_revision, split=split,
                image_column=image_column, num_rows=num_rows, num_shards=num_shards, seed=seed, dim=dim,
                temperature=float(temperature), granularity=granularity, units=ordered,
                unit_shards=unit_shards, anchor_ids=tuple(int(i) for i in anchor_ids), projection_kind=projection)


def anchor_count(anchors: int | float, num_rows: int) -> int:
    """The number of anchor rows: an int count, or a float fraction (< 1) of all rows, at least 1."""
    if isinstance(anchors, bool) or not isinstance(anchors, (int, float, np.integer, np.floating)):
        raise ConfigError(f"Anchors must be a row count or a fraction below 1, got {anchors!r}.")
    if isinstance(anchors, (float, np.floating)):
        if not 0 < anchors < 1:
            raise PlanError(
                f"An anchor fraction must lie strictly between 0 and 1, got {anchors}.",
                hint="Pass a fraction such as 0.01, or an integer count of anchor rows.",
            )
        return max(1, round(anchors * num_rows))
    if not 1 <= anchors <= num_rows:
        raise PlanError(f"Cannot draw {anchors} anchor rows from {num_rows} rows.",
                        hint=f"Use between 1 and {num_rows} anchors (or a fraction below 1).")
    return int(anchors)


def _check_settings(num_shards: int, dim: int, temperature: float, seed: int) -> None:
    if num_shards < 1:
        raise PlanError(f"A plan needs at least one shard, got {num_shards}.", hint="Pass --shards 1 or more.")
    if dim < 1:
        raise ConfigError(f"The target dimension must be at least 1, got {dim}.", hint="Pass --dim 1 or more.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"The uniformity temperature must be positive, got {temperature}.",
                          hint="The usual value is 2 (Wang & Isola 2020).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"The seed must be a non-negative integer, got {seed!r}.", hint="Pass --seed 0 or above.")


def _check_projection(projection: str) -> None:
    if projection not in PROJECTIONS:
        raise PlanError(f"Unknown projection {projection!r}.",
                        hint=f"Use one of {', '.join(PROJECTIONS)} (--projection).")


def _check_units(units: tuple[Unit, ...], num_rows: int | None) -> int:
    """Check that the units, sorted by start, tile 0..num_rows-1 exactly; return the row count."""
    if not units:
        raise PlanError("The source split has no storage units.",
                        hint="Check the split name and that the source repo holds parquet files for it.")
    expected_start = 0
    for unit in units:
        if unit.num_rows < 0:
            raise PlanError(f"Unit {unit.file} (row group {unit.row_group}) has a negative row count.")
        if unit.start != expected_start:
            problem = "overlaps the previous unit" if unit.start < expected_start else "leaves a gap before it"
            raise PlanError(
                f"Unit {unit.file} (row group {unit.row_group}) starts at id {unit.start} and {problem} "
                f"(expected {expected_start}).",
                hint="Units must be sorted by start and cover ids 0..num_rows-1 without gaps or overlaps.",
            )
        expected_start = unit.stop
    if expected_start == 0:
        raise PlanError("The source split has no rows.")
    if num_rows is not None and expected_start != num_rows:
        raise PlanError(f"The units hold {expected_start} rows but the plan says num_rows={num_rows}.")
    return expected_start


def _balance_units(units: tuple[Unit, ...], num_shards: int, seed: int) -> tuple[int, ...]:
    """Random but row-balanced: shuffle, then largest unit first onto the lightest shard.

    The shuffle decides among equal-sized units (the stable sort keeps its order), so which rows
    land together depends on the seed; ties between equally loaded shards go to the lowest index.
    """
    shuffled = _random_order(seed, _UNIT_STREAM, len(units))
    by_size = sorted(shuffled, key=lambda i: -units[i].num_rows)
    loads = [(0, k) for k in range(num_shards)]  # a heap of (rows so far, shard)
    shards = [0] * len(units)
    for i in by_size:
        rows, lightest = heapq.heappop(loads)
        shards[i] = lightest
        heapq.heappush(loads, (rows + units[i].num_rows, lightest))
    return tuple(shards)


def _random_order(seed: int, stream: int, n: int) -> np.ndarray:
    """A permutation of 0..n-1 from the seed's raw (version-stable) bit stream, int64."""
    keys = np.random.PCG64(np.random.SeedSequence([seed, stream])).random_raw(n)
    return np.argsort(keys, kind="stable").astype(np.int64)


def _row_order(seed: int, num_rows: int) -> np.ndarray:
    return _random_order(seed, _ROW_STREAM, num_rows)


def _even_bounds(n: int, parts: int) -> list[int]:
    """Boundaries that split n items into `parts` runs whose sizes differ by at most one."""
    return [k * n // parts for k in range(parts + 1)]


def _box_muller(bits: np.random.PCG64, n: int) -> np.ndarray:
    """n standard normal float64 values from a bit generator's raw stream."""
    pairs = (n + 1) // 2
    raw = bits.random_raw(2 * pairs)
    # 53-bit uniforms in the open interval (0, 1): the +0.5 keeps log() away from zero.
    uniform = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53
    radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
    angle = 2.0 * np.pi * uniform[pairs:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
