"""`coopt-hub status`: every shard of the plan at a glance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from coopt_hub.cli.columns import COMMIT, PRIOR, SHARD, number
from coopt_hub.cli.options import json_option, repo_argument, token_option
from coopt_hub.cli.output import Column

EXAMPLES = """
\b
Examples:
  coopt-hub status org/digits-coopt
  coopt-hub status                     # the repo of `coopt-hub join` in this directory
  coopt-hub status org/digits-coopt --json | jq '.shards[] | select(.state != "done") | .shard'
  coopt-hub status org/digits-coopt --html status.html   # the web page, for a repo on huggingface.co
"""


def _reference(row: dict[str, Any]) -> str | None:
    if row["prior"] is None:  # nothing readable was pushed
        return None
    return "itself" if row["reference"] is None else f"shard {row['reference']['shard']}"


# The rows are the shards of `CollaborationStatus.to_dict()`: the table and --json show the same data.
# Every branch is shard/{k}, so the table leaves that column to --json.
COLUMNS = (
    SHARD,
    Column("state"),
    COMMIT,
    PRIOR,
    number("V", "uniformity", ".4f"),
    Column("reference", _reference),
    number("residual", "residual", ".4f"),
    number("held-out", "cv_residual", ".3f"),
    Column("rows", lambda row: f"{row['rows'] or 0}/{row['expected_rows']}"),
    Column("skipped"),
    Column("merged", lambda row: "yes" if row["merged"] else "no"),
)


@click.command(epilog=EXAMPLES)
@repo_argument()
@token_option
@click.option("--html", "html_file", default=None, metavar="FILE", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of the table, write the collaboration's web page to FILE (what the embedded hub "
              "serves at /datasets/REPO/coopt): shards, V per prior, merged versions. Open it in a browser.")
@json_option
def status(repo, token, html_file, out):
    """Show each shard of REPO: state, commit, prior, V, reference, residual, rows, skipped and merged.

    A shard is done (its branch shard/K holds files made for this plan and source commit), missing
    (nothing pushed) or stale (made for another plan or source commit, or its files do not read).
    """
    from coopt_hub.hub.client import Hub
    from coopt_hub.platform.status import collaboration_status

    if html_file is not None:
        _write_page(Hub(token=token), repo, html_file, out)
        return
    result = collaboration_status(Hub(token=token), repo)
    document = result.to_dict()
    notes = [f"shard {shard.shard}: {problem}" for shard in result.shards for problem in shard.problems]
    notes += [f"shard {shard.shard}: {concern}" for shard in result.shards for concern in shard.concerns]
    out.table(document.pop("shards"), COLUMNS, message=_summary(result), notes=notes, key="shards", **document)


def _summary(result) -> str:
    """Two lines above the table: the plan, then where the collaboration stands."""
    from coopt_hub.platform.status import DONE, MISSING, STALE

    plan, best = result.plan, result.best
    return (
        f"{result.repo}: plan {plan.plan_hash[:12]} over {plan.source_repo}@{plan.source_revision[:8]} "
        f"(split {plan.split}, {plan.num_rows} rows, {plan.num_shards} shards, dim {plan.dim})\n"
        f"{len(result.in_state(DONE))} done, {len(result.in_state(MISSING))} missing, "
        f"{len(result.in_state(STALE))} stale; {result.rows_done}/{plan.num_rows} rows labeled"
        + (f"; best prior: shard {best.shard} (V {(best.score.common_uniformity if best.score else best.header.uniformity):.4f} in the common space)" if best else "")
        + (f"; main holds {result.merged_tag}" if result.merged_tag else "; not merged yet")
    )


class _HubDocuments:
    """The collaboration's JSON documents through the Hub client, for the server's page renderer."""

    def __init__(self, hub, repo: str):
        self.hub = hub
        self.repo = repo

    def refs(self) -> tuple[dict[str, str], dict[str, str]]:
        return self.hub.refs(self.repo)

    def read_json(self, path: str, revision: str) -> object | None:
        try:
            return self.hub.read_json(self.repo, path, revision)
        except RecursionError as err:  # nested too deeply: as unreadable as any other broken JSON
            raise ValueError(f"{path} is nested too deeply") from err


def _write_page(hub, repo: str, path: Path, out) -> None:
    """The page the embedded hub serves for the collaboration, made from the same JSON documents."""
    from coopt_hub.core.files import write_text_atomically
    from coopt_hub.core.layout import PLAN_PATH
    from coopt_hub.errors import PlanError
    from coopt_hub.server.collaboration import collaboration_page, read_collaboration

    try:
        collab = read_collaboration(repo, _HubDocuments(hub, repo))
    except ValueError as err:
        raise PlanError(f"{PLAN_PATH} in {repo} does not read: {err}.",
                        hint="Check that the file was not edited by hand; `coopt-hub init` writes it.") from err
    if collab is None:
        raise PlanError(f"No CoOpt plan in {repo} (no {PLAN_PATH} on main).",
                        hint=f"Create it with `coopt-hub init {repo} --source ORG/DATASET --shards K --anchors A`.")
    write_text_atomically(path, collaboration_page(collab, hub.endpoint.rstrip("/"), f"datasets/{repo}"))
    out.result(f"Wrote the page of {repo} to {path} ({len(collab.shards)} shards, {len(collab.versions)} versions).",
               repo=repo, html=str(path), shards=len(collab.shards), versions=len(collab.versions))
