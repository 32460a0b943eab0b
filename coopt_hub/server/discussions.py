"""Discussions and pull requests of one repo, kept as one JSON file beside its git data.

A pull request is a discussion with a ref `refs/pr/N` (its commits) and a base branch; the
answers follow what huggingface_hub's get_repo_discussions / get_discussion_details and
deserialize_event read. Callers hold the repo's write lock around load and save.
"""

from __future__ import annotations

import html
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from coopt_hub.server.errors import HubError

STATUSES = ("open", "closed", "merged", "draft")
PAGE_SIZE = 50


class DiscussionStore:
    def __init__(self, path: Path, now: Callable[[float], str]):
        self.path = path
        self._now = now

    def load(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return []

    def save(self, records: list[dict]) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(records, handle)
        os.replace(tmp, self.path)

    def get(self, records: list[dict], num: int) -> dict:
        for record in records:
            if record["num"] == num:
                return record
        raise HubError(404, f"Discussion #{num} not found.", "DiscussionNotFound")

    def new(self, records: list[dict], title: str, description: str, author: str, pull_request: bool,
            base: str | None = None, base_commit: str | None = None, status: str = "open") -> dict:
        record = {
            "num": max((r["num"] for r in records), default=0) + 1, "title": title, "status": status,
            "isPullRequest": pull_request, "createdAt": self._now(time.time()), "author": author,
            "events": [], "base": base, "baseCommit": base_commit, "mergeCommitId": None,
        }
        if description:
            self.event(record, "comment", author, _comment_data(description, author, self._now(time.time())))
        records.append(record)
        return record

    def event(self, record: dict, kind: str, author: str, data: dict) -> dict:
        event = {"id": secrets.token_hex(12), "type": kind, "createdAt": self._now(time.time()),
                 "author": {"name": author}, "data": data}
        record["events"].append(event)
        return event

    def comment(self, record: dict, text: str, author: str) -> dict:
        return self.event(record, "comment", author, _comment_data(text, author, self._now(time.time())))

    def comment_event(self, record: dict, comment_id: str) -> dict:
        for event in record["events"]:
            if event["type"] == "comment" and event["id"] == comment_id:
                return event
        raise HubError(404, f"Comment {comment_id[:40]!r} not found in #{record['num']}.", "NotFound")

    def edit(self, event: dict, text: str, editor: str) -> dict:
        """A comment's new text; the earlier versions stay in its history, newest first."""
        data = event["data"]
        data["latest"] = _version(text, editor, self._now(time.time()))
        data["history"].insert(0, data["latest"])
        data["numEdits"] += 1
        data["edited"] = True
        data["editors"] = list(dict.fromkeys([*data["editors"], editor]))
        return event

    def hide(self, event: dict) -> dict:
        """Hide a comment for good, as the Hub does: its text, and every earlier version, are gone."""
        data = event["data"]
        data["latest"] = {**data["latest"], "raw": "", "html": ""}
        data["history"] = [data["latest"]]
        data["hidden"] = True
        return event


def _version(text: str, author: str, date: str) -> dict:
    # Participants write these: the html a page would show is their text escaped, never their markup.
    return {"raw": text, "html": html.escape(text), "updatedAt": date, "author": {"name": author}}


def _comment_data(text: str, author: str, date: str) -> dict:
    latest = _version(text, author, date)
    return {"edited": False, "hidden": False, "latest": latest, "numEdits": 0, "editors": [author],
            "history": [latest]}


def summary(record: dict, repo_id: str, repo_type: str) -> dict:
    return {"num": record["num"], "title": record["title"], "status": record["status"],
            "isPullRequest": record["isPullRequest"], "createdAt": record["createdAt"],
            "author": {"name": record["author"]}, "repo": {"name": repo_id, "type": repo_type},
            "pinned": False, "numComments": sum(e["type"] == "comment" for e in record["events"])}


def details(record: dict, repo_id: str, repo_type: str, conflicts: list[str]) -> dict:
    data = {**summary(record, repo_id, repo_type), "events": record["events"], "diff": ""}
    if record["isPullRequest"]:
        changes = {"base": f"refs/heads/{record['base']}"}
        if record["mergeCommitId"]:
            changes["mergeCommitId"] = record["mergeCommitId"]
        data.update({"changes": changes, "filesWithConflicts": conflicts})
    return data


def matches(record: dict, kind: str | None, status: str | None, author: str | None) -> bool:
    if kind == "pull_request" and not record["isPullRequest"] or kind == "discussion" and record["isPullRequest"]:
        return False
    # As on the Hub, "open" includes drafts: a pull request made by create_pull_request starts as one.
    wanted = {"open": ("open", "draft")}.get(status, (status,))
    if status not in (None, "all") and record["status"] not in wanted:
        return False
    return author is None or record["author"] == author
