"""Training's two writes to the Hub, each one commit: a comparison's "Benchmarks" section (table and
plot) into the card of the dataset it evaluated, and a trained student into a model repo."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.errors import ConfigError, ConflictError
from coopt_hub.hub.client import Hub
from coopt_hub.training.compare import Comparison
from coopt_hub.training.results import ComparisonFiles, markdown

CARD_PATH = "README.md"
BENCHMARKS_HEADING = "## Benchmarks"
PLOT_PATH = "benchmarks/comparison.png"
RESULTS_PATH = "benchmarks/comparison.json"
_HEADING = re.compile(r"^(#{1,6})\s")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _section_bounds(lines: list[str]) -> tuple[int, int] | None:
    """[start, end) of the "## Benchmarks" section: from its heading to the next heading of level
    1 or 2 outside code fences (or the end)."""
    start, fenced = None, False
    for index, line in enumerate(lines):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else _HEADING.match(line)
        if start is None and heading and line.rstrip() == BENCHMARKS_HEADING:
            start = index
        elif start is not None and heading and len(heading.group(1)) <= 2:
            return start, index
    return None if start is None else (start, len(lines))


def with_benchmarks(card: str, body: str) -> str:
    """`card` with its "## Benchmarks" section replaced by `body` (or the section appended); every
    other line stays as it was."""
    section = f"{BENCHMARKS_HEADING}\n\n{body.strip()}\n"
    lines = card.splitlines(keepends=True)
    bounds = _section_bounds(lines)
    if bounds is None:
        separator = "" if not card or card.endswith("\n\n") else ("\n" if card.endswith("\n") else "\n\n")
        return card + separator + section
    start, end = bounds
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def push_results(hub: Hub, comparison: Comparison, files: ComparisonFiles) -> str:
    """Add the comparison as the "Benchmarks" section of the card of the revision it evaluated, with
    its plot and JSON, in one commit on main; returns the commit.

    Only while main still is that revision: on a main that moved on (a newer merge), the section
    would describe a dataset the card no longer is.
    """
    origin = comparison.origin
    if origin is None:
        raise ConfigError("this comparison ran on in-memory data: there is no dataset card to add it to",
                            hint="Run the comparison on a merged dataset on the Hub (--dataset, --revision).")
    body = markdown(comparison, image=PLOT_PATH)

    def build(head: str | None) -> list[CommitOperationAdd]:
        if head != origin.commit:
            raise ConflictError(
                f"{origin.repo}'s main is at {str(head)[:12]}, not at the evaluated {origin.revision} "
                f"({origin.commit[:12]}); its card describes another version",
                hint="Compare on the revision main points to (--revision main), then --push-results.",
            )
        try:
            card = hub.download(origin.repo, CARD_PATH, head).read_text()
        except RemoteEntryNotFoundError:
            card = ""
        return [
            CommitOperationAdd(CARD_PATH, with_benchmarks(card, body).encode()),
            CommitOperationAdd(PLOT_PATH, files.plot.read_bytes()),
            CommitOperationAdd(RESULTS_PATH, files.json.read_bytes()),
        ]

    return hub.commit(origin.repo, "main", build, f"Benchmarks: {origin.revision} compared by objective")


def push_student(hub: Hub, repo_id: str, directory: Path, message: str) -> str:
    """Create the model repo if needed and commit the student's files in one commit; returns the commit."""
    api = hub.api
    hub.with_retries(f"create {repo_id}", lambda: api.create_repo(repo_id, repo_type="model", exist_ok=True))
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())

    def commit() -> str:
        operations = [CommitOperationAdd(p.name, str(p)) for p in files]
        return api.create_commit(repo_id, operations, commit_message=message, repo_type="model").oid

    return hub.with_retries(f"commit to {repo_id}", commit)
