"""The web view: HTML pages of repos on the Hub's own paths, for people with a browser.

    /datasets/ORG/NAME                    the card, files on main, branches, tags, pull requests
    /datasets/ORG/NAME/tree/REV[/PATH]    a folder at a revision
    /datasets/ORG/NAME/blob/REV/PATH      a file at a revision (text shown, download link)
    /datasets/ORG/NAME/commit/SHA         a commit and the files it changed (the `commitUrl` of commits)
    /datasets/ORG/NAME/commits/REV        the history of a revision
    /datasets/ORG/NAME/discussions/N      a pull request or discussion (the `pullRequestUrl`)
    /datasets/ORG/NAME/coopt              a CoOpt collaboration's progress (coopt_hub.server.collaboration)

Models have the same pages without `datasets/`, spaces under `spaces/`; `/` lists the repos.
Every page reads through the API's access check, so a private repo is 404 unless the request
carries a token that covers it (a browser has none). Pages only read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from urllib.parse import unquote, urlsplit

from markupsafe import Markup

from coopt_hub.server import access
from coopt_hub.server.cards import card_html
from coopt_hub.server.collaboration import PLAN_PATH, collaboration_page, read_collaboration
from coopt_hub.server.errors import HubError, entry_not_found
from coopt_hub.server.http import MAX_JSON_BYTES, Request, Response, parse_json
from coopt_hub.server.names import DEFAULT_BRANCH, PLURALS, check_path
from coopt_hub.server.pages import HTML_HEADERS, Links, render
from coopt_hub.server.storage import LFS_THRESHOLD, Entry, GitRepo, HubStorage

_PREVIEW_BYTES = 1024 * 1024  # files up to this size are shown as text when they are UTF-8
_MAX_LISTED = 1000  # entries, changes or repos on one page
_LATEST_COMMITS = 10
_HISTORY_PAGE = 100

RepoKey = tuple[str, str, str]  # (type, namespace, name) as routed


@dataclass(frozen=True)
class RepoView:
    """What the header of a repo's pages shows."""

    type: str
    id: str
    name: str
    private: bool
    coopt: bool  # main holds a CoOpt plan: the collaboration page exists


def _html(body: str, status: int = 200) -> Response:
    return Response(status, body.encode(), dict(HTML_HEADERS))


def _page(handler: Callable[..., Response]) -> Callable[..., Response]:
    """Errors answered as an HTML page with their status to a browser (it asks for text/html); other
    callers, such as a client probing a URL, keep the API's JSON errors."""

    @functools.wraps(handler)
    def answer(self: WebView, request: Request, *args: object) -> Response:
        try:
            return handler(self, request, *args)
        except HubError as err:
            if "text/html" not in (request.headers.get("Accept") or ""):
                raise
            page = render("error.html", title=f"{err.status}", home=_links_base(request) + "/", status=err.status,
                          message=err.message)
            return _html(page, err.status)

    return answer


def _links_base(request: Request) -> str:
    """The path the server's address starts with (behind a proxy, its public URL's path), for links."""
    return urlsplit(request.endpoint).path.rstrip("/")


class WebView:
    def __init__(self, storage: HubStorage, open_repo: Callable[[Request, RepoKey], GitRepo]):
        """`open_repo(request, repo)`: the API's access-checked open, so that pages see what the API shows."""
        self.storage = storage
        self._open = open_repo
        self._pages: dict[tuple[str, int], Callable[..., Response]] = {
            ("", 0): self.repo_page,
            ("commit", 1): self.commit_page,
            ("commits", 1): self.commits_page,
            ("discussions", 1): self.discussion_page,
            ("coopt", 0): self.coopt_page,
        }

    def route(self, method: str, repo_type: str, s: list[str]) -> tuple[Callable[..., Response], list] | None:
        """The page for raw path segments `s` (the type prefix removed), or None."""
        if method not in ("GET", "HEAD"):
            return None
        if s and s[-1] == "":  # a trailing slash
            s = s[:-1]
        if not s:
            return self.home, []
        if len(s) < 2:
            return None
        repo = (repo_type, unquote(s[0]), unquote(s[1]))
        page, rest = (s[2], s[3:]) if len(s) > 2 else ("", [])
        if page == "tree" and rest:
            return self.tree_page, [repo, unquote(rest[0]), unquote("/".join(rest[1:]))]
        if page == "blob" and len(rest) >= 2:
            return self.blob_page, [repo, unquote(rest[0]), unquote("/".join(rest[1:]))]
        handler = self._pages.get((page, len(rest)))
        return (handler, [repo, *map(unquote, rest)]) if handler is not None else None

    # ---- pages -----------------------------------------------------------------------------

    @_page
    def home(self, request: Request) -> Response:
        base = _links_base(request)
        listed = []
        for repo_type in PLURALS:
            ids = []
            for repo_id in self.storage.list_repos(repo_type):
                try:
                    private = self.storage.is_private(repo_id)
                except (OSError, ValueError):
                    continue  # deleted meanwhile
                if access.may_see(request.grant, repo_id.id, private):
                    ids.append((repo_id.id, Links(base, repo_id.web_path).repo))
                if len(ids) >= _MAX_LISTED:
                    break
            listed.append((PLURALS[repo_type].capitalize(), ids))
        return _html(render("home.html", title="coopt-hub", home=f"{base}/", repos=listed))

    @_page
    def repo_page(self, request: Request, repo: RepoKey) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(DEFAULT_BRANCH)
        readme = git_repo.read_file(sha, "README.md", LFS_THRESHOLD)
        card = Markup(card_html(readme.decode("utf-8", "replace"))) if readme is not None else None
        records = git_repo.discussions.load()
        pull_requests = sorted((r for r in records if r["isPullRequest"]), key=lambda r: r["num"], reverse=True)
        return self._render(request, git_repo, "repo.html", git_repo.repo_id.id, revision=DEFAULT_BRANCH, sha=sha,
                            card=card, refs=git_repo.refs(), pull_requests=pull_requests[:_MAX_LISTED],
                            commits=list(islice(git_repo.history(sha), _LATEST_COMMITS)),
                            **_listing(git_repo.list_dir(sha, "", recursive=False), None))

    @_page
    def tree_page(self, request: Request, repo: RepoKey, revision: str, path: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        path = path.strip("/")
        if path:
            check_path(path)
        entries = git_repo.list_dir(sha, path, recursive=False)
        parent = path.rpartition("/")[0] if path else None
        return self._render(request, git_repo, "tree.html", f"{git_repo.repo_id.id} at {revision}", revision=revision,
                            sha=sha, path=path, crumbs=_crumbs(path), refs=git_repo.refs(), **_listing(entries, parent))

    @_page
    def blob_page(self, request: Request, repo: RepoKey, revision: str, path: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        entry = git_repo.entry(sha, check_path(path))
        if entry is None or entry.type != "file":
            raise entry_not_found(path, revision)
        text = _text_preview(git_repo.read_file(sha, path, _PREVIEW_BYTES))
        return self._render(request, git_repo, "blob.html", f"{path} · {git_repo.repo_id.id}", revision=revision,
                            sha=sha, entry=entry, crumbs=_crumbs(path), text=text)

    @_page
    def commit_page(self, request: Request, repo: RepoKey, commit_id: str) -> Response:
        git_repo = self._open(request, repo)
        commit = git_repo.commit_info(git_repo.resolve(commit_id))
        return self._render(request, git_repo, "commit.html", f"{commit.title} · {git_repo.repo_id.id}",
                            revision=None, commit=commit, changes=git_repo.changes(commit.id)[:_MAX_LISTED])

    @_page
    def commits_page(self, request: Request, repo: RepoKey, revision: str) -> Response:
        git_repo = self._open(request, repo)
        commits = list(islice(git_repo.history(git_repo.resolve(revision)), _HISTORY_PAGE + 1))
        return self._render(request, git_repo, "commits.html", f"Commits · {git_repo.repo_id.id}", revision=revision,
                            commits=commits[:_HISTORY_PAGE], more=len(commits) > _HISTORY_PAGE)

    @_page
    def discussion_page(self, request: Request, repo: RepoKey, num: str) -> Response:
        git_repo = self._open(request, repo)
        if not (num.isascii() and num.isdigit() and len(num) < 10):
            raise HubError(404, f"Discussion {num[:20]!r} not found.", "DiscussionNotFound")
        record = git_repo.discussions.get(git_repo.discussions.load(), int(num))
        events = [_event_view(event) for event in record["events"]]
        return self._render(request, git_repo, "discussion.html", f"#{record['num']} · {git_repo.repo_id.id}",
                            revision=None, record=record, events=events)

    @_page
    def coopt_page(self, request: Request, repo: RepoKey) -> Response:
        git_repo = self._open(request, repo)
        repo_id = git_repo.repo_id
        try:
            collab = read_collaboration(repo_id.id, StoredDocuments(git_repo))
        except ValueError as err:
            raise HubError(422, f"{repo_id.id}'s plan does not read: {err}.", "UnprocessableEntity") from None
        if collab is None:
            raise HubError(404, f"{repo_id.id} is not a CoOpt collaboration: main holds no {PLAN_PATH}.",
                           "EntryNotFound")
        return _html(collaboration_page(collab, _links_base(request), repo_id.web_path))

    def _render(self, request: Request, git_repo: GitRepo, template: str, title: str, **context: object) -> Response:
        repo_id = git_repo.repo_id
        links = Links(_links_base(request), repo_id.web_path)
        plan = git_repo.entry(git_repo.resolve(DEFAULT_BRANCH), PLAN_PATH)
        coopt = plan is not None and plan.type == "file"
        view = RepoView(repo_id.type, repo_id.id, repo_id.name, git_repo.private, coopt)
        return _html(render(template, title=title, home=links.home, repo=view, links=links, **context))


class StoredDocuments:
    """A collaboration's documents read from the server's own storage."""

    def __init__(self, git_repo: GitRepo):
        self.git_repo = git_repo

    def refs(self) -> tuple[dict[str, str], dict[str, str]]:
        groups = self.git_repo.refs()
        return {r.name: r.target for r in groups["branches"]}, {r.name: r.target for r in groups["tags"]}

    def read_json(self, path: str, revision: str) -> object | None:
        data = self.git_repo.read_file(self.git_repo.resolve(revision), path, MAX_JSON_BYTES)
        if data is None:
            return None
        try:
            return parse_json(data, path)
        except HubError as err:
            raise ValueError(err.message) from None


def _listing(entries: list[Entry], parent: str | None) -> dict[str, object]:
    """A folder's entries for the files table, folders first; `parent`: the folder above (None at the top)."""
    ordered = sorted(entries, key=lambda entry: (entry.type != "directory", entry.path.lower()))
    return {"entries": ordered[:_MAX_LISTED], "parent": parent}


def _crumbs(path: str) -> list[tuple[str, str]]:
    """(name, path) of each folder down to `path`, for the breadcrumb links."""
    parts = path.split("/") if path else []
    return [(name, "/".join(parts[: index + 1])) for index, name in enumerate(parts)]


def _text_preview(data: bytes | None) -> str | None:
    """The file as text when it is small UTF-8 without NUL bytes; None otherwise (binary or large)."""
    if data is None or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _event_view(event: dict) -> dict[str, object]:
    """A discussion event as the page shows it: who, when, what, and its text or commit."""
    data = event.get("data") or {}
    view = {"author": event["author"]["name"], "date": event["createdAt"], "text": None, "commit": None}
    kind = event["type"]
    if kind == "comment":
        if data.get("hidden"):
            return {**view, "what": "commented (hidden)"}
        return {**view, "what": "commented", "text": data["latest"]["raw"]}
    if kind == "commit":
        return {**view, "what": f"pushed: {data.get('subject', '')}", "commit": data.get("oid")}
    if kind == "status-change":
        return {**view, "what": f"changed the status to {data.get('status')}"}
    if kind == "title-change":
        return {**view, "what": f"renamed it from {data.get('from')!r} to {data.get('to')!r}"}
    return {**view, "what": kind}
