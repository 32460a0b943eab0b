"""Table columns that `status` and `verify` share: both tabulate shards by commit and declared prior."""

from __future__ import annotations

from typing import Any

from coopt_hub.cli.output import Column


def _prior(row: dict[str, Any]) -> str | None:
    from coopt_hub.platform.card import prior_label

    return prior_label(row["prior"]) if row["prior"] else None


SHARD = Column("shard")
COMMIT = Column("commit", lambda row: row["commit"] and row["commit"][:8])
PRIOR = Column("prior", _prior, elide="end")


def number(header: str, key: str, spec: str) -> Column:
    """The row's number under `key`, formatted by `spec` (a format spec such as ".4f")."""
    return Column(header, lambda row: None if row[key] is None else format(row[key], spec))
