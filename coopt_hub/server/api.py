"""The Hub HTTP API: routes on raw path segments, and one method per endpoint.

Endpoints and their exact answers follow what huggingface_hub and datasets send and read
(see docs in shared/HUB_API.md). Nothing here ever advertises Xet: no xetHash in entries, no Xet
headers, so clients stay on plain downloads and the git-LFS basic transfer.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urlencode

from dulwich.errors import NotGitRepository
from dulwich.ignore import IgnoreFilter

from coopt_hub.server import access, discussions
from coopt_hub.server.auth import Auth
from coopt_hub.server.cards import CardMetadataError, card_metadata
from coopt_hub.server.errors import HubError, bad_request, entry_not_found, repo_not_found
from coopt_hub.server.http import Request, Response, json_response, parse_json, ranged
from coopt_hub.server.names import (
    DEFAULT_BRANCH,
    TYPES_BY_PLURAL,
    RepoId,
    check_path,
    check_ref_name,
    check_repo_type,
    make_repo_id,
)
from coopt_hub.server.storage import (
    AddFile,
    AddLfsFile,
    DeleteFile,
    DeleteFolder,
    Entry,
    GitRepo,
    HubStorage,
    Operation,
    is_sha256,
    iso_date,
    wants_lfs,
)
from coopt_hub.server.web import WebView

_LFS_JSON = "application/vnd.git-lfs+json"
_COMMIT_ID = re.compile(r"^[0-9a-f]{7,40}$")
# A caller without a valid token can only read, and reads send small bodies (paths-info, validate-yaml).
UNAUTHENTICATED_BODY_BYTES = 1024 * 1024
# One NDJSON line holds one regular file (at most LFS_THRESHOLD, base64) or one operation.
_MAX_COMMIT_LINE = 16 * 1024 * 1024
_MAX_COMMIT_LINES = 100_000
_TREE_PAGE = 1000
_EXPANDED_PAGE = 50  # expanded entries cost a history walk: the Hub pages them by 50 too
_MAX_PATHS_INFO = 1000
_DISCUSSION_CHANGES = {"merge": "merge pull requests", "title": "rename discussions",
                       "status": "close or reopen discussions"}


@dataclass(frozen=True)
class Route:
    """A routed request: what reads its body may read (bytes), and the call that answers it."""

    call: Callable[[], Response]
    body_limit: int


class HubApi:
    def __init__(self, storage: HubStorage, auth: Auth, max_body_bytes: int):
        self.storage = storage
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.web = WebView(storage, self._open)
        self._fixed_routes = {
            ("GET", "whoami-v2"): self.whoami,
            ("POST", "validate-yaml"): self.validate_yaml,
            ("POST", "repos/create"): self.create_repo,
            ("POST", "repos/delete"): self.delete_repo,
            ("DELETE", "repos/delete"): self.delete_repo,
            ("POST", "repos/move"): self.move_repo,
        }
        # (method, action after /api/{t}/{ns}/{name}/, number of segments after the action)
        self._repo_routes: dict[tuple[str, str, int], Callable[..., Response]] = {
            ("GET", "", 0): self.repo_info,
            ("GET", "revision", 1): self.repo_info,
            ("GET", "refs", 0): self.list_refs,
            ("GET", "commits", 0): self.list_commits,
            ("GET", "commits", 1): self.list_commits,
            ("POST", "paths-info", 1): self.paths_info,
            ("POST", "preupload", 1): self.preupload,
            ("POST", "commit", 1): self.commit,
            ("POST", "branch", 1): self.create_branch,
            ("DELETE", "branch", 1): self.delete_branch,
            ("POST", "tag", 1): self.create_tag,
            ("DELETE", "tag", 1): self.delete_tag,
            ("PUT", "settings", 0): self.update_settings,
            ("GET", "discussions", 0): self.list_discussions,
            ("POST", "discussions", 0): self.create_discussion,
            ("GET", "discussions", 1): self.discussion_details,
            ("POST", "discussions", 2): self.change_discussion,
            ("POST", "discussions", 4): self.change_comment,
            ("GET", "auth-check", 0): self.auth_check,
            ("GET", "auth-check", 1): self.auth_check,
            ("POST", "super-squash", 1): self.super_squash,
        }

    # ---- routing ---------------------------------------------------------------------------

    def route(self, request: Request) -> Route:
        """Who is calling and which endpoint answers; runs before the body is read, to size its limit."""
        request.grant = self.auth.grant_for(request.headers.get("Authorization"))
        request.user = request.grant.user if request.grant is not None else None
        s = request.segments
        route = self._route_api(request.method, s[1:]) if s[:1] == ["api"] else self._route_web(request.method, s)
        if route is None:
            raise HubError(404, f"No endpoint for {request.method} /{'/'.join(s)[:200]}.", "NotFound")
        handler, args = route
        may_upload = request.grant is not None and request.grant.allows("contribute")
        limit = self.max_body_bytes if may_upload else UNAUTHENTICATED_BODY_BYTES
        if handler == self.lfs_upload:
            limit = self._check_upload_url(request, *args)
        return Route(lambda: self._call(handler, request, args), limit)

    def _call(self, handler: Callable[..., Response], request: Request, args: list) -> Response:
        try:
            return handler(request, *args)
        except (OSError, KeyError, NotGitRepository):
            # A repo deleted while this request was reading it: its files vanished under us.
            if args and isinstance(args[0], tuple) and not self.storage.exists(args[0]):
                raise repo_not_found() from None
            raise

    def _route_api(self, method: str, s: list[str]) -> tuple[Callable[..., Response], list] | None:
        fixed = self._fixed_routes.get((method, "/".join(s)))
        if fixed is not None:
            return fixed, []
        if s[:1] and s[0] in TYPES_BY_PLURAL and len(s) == 1 and method == "GET":
            return self.list_repos, [TYPES_BY_PLURAL[s[0]]]
        if len(s) < 2 or s[0] not in TYPES_BY_PLURAL:
            return None
        if len(s) == 2:  # a repo id without a namespace (`gpt2`): the Hub's legacy ids, none here
            return self.no_endpoint, [(TYPES_BY_PLURAL[s[0]], "", unquote(s[1]))]
        repo = (TYPES_BY_PLURAL[s[0]], unquote(s[1]), unquote(s[2]))
        action, rest = (s[3], s[4:]) if len(s) > 3 else ("", [])
        if action == "tree" and rest and method == "GET":
            # The sub-path arrives as one encoded segment (`data%2Fsub`), or as several.
            return self.list_tree, [repo, unquote(rest[0]), unquote("/".join(rest[1:]))]
        handler = self._repo_routes.get((method, action, len(rest)))
        return (handler, [repo, *map(unquote, rest)]) if handler is not None else (self.no_endpoint, [repo])

    def _route_web(self, method: str, s: list[str]) -> tuple[Callable[..., Response], list] | None:
        repo_type = "model"
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = TYPES_BY_PLURAL[s[0]], s[1:]
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            repo = (repo_type, unquote(s[0]), unquote(s[1]))
            return self.resolve, [repo, unquote(s[3]), unquote("/".join(s[4:]))]
        if len(s) >= 3 and s[1] == "resolve" and method in ("GET", "HEAD"):  # a legacy id without namespace
            return self.no_endpoint, [(repo_type, "", unquote(s[0]))]
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            repo = (repo_type, unquote(s[0]), unquote(s[1][: -len(".git")]))
            lfs = s[5:]
            if method == "POST" and lfs == ["batch"]:
                return self.lfs_batch, [repo]
            if method == "PUT" and len(lfs) == 1:
                return self.lfs_upload, [repo, lfs[0]]
            if method == "POST" and len(lfs) == 2 and lfs[1] == "verify":
                return self.lfs_verify, [repo, lfs[0]]
        return self.web.route(method, repo_type, s)

    def no_endpoint(self, request: Request, repo: tuple[str, str, str]) -> Response:
        """A path under a repo that no endpoint answers: RepoNotFound for a repo the caller cannot
        see (what huggingface_hub's existence checks expect), else a plain 404."""
        self._open(request, repo)
        raise HubError(404, f"No endpoint for {request.method} {request.path[:200]}.", "NotFound")

    # ---- access ----------------------------------------------------------------------------

    def _open(self, request: Request, repo: tuple[str, str, str], role: str | None = None, action: str = "") -> GitRepo:
        """Open a repo the caller may see (a private repo is indistinguishable from a missing one),
        once the caller's token allows `action`, which needs `role` (None: a read)."""
        try:
            repo_id = make_repo_id(*repo)
        except HubError:
            raise repo_not_found() from None
        if role is not None:
            access.require(request.grant, role, repo_id.id, action)
        git_repo = self.storage.open(repo_id)
        if not access.may_see(request.grant, git_repo.repo_id.id, git_repo.private):
            raise repo_not_found()
        return git_repo

    # ---- account and repos -----------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        grant = access.authenticated(request.grant)
        user = grant.user
        return json_response({
            "type": "user", "id": user, "name": user, "fullname": user, "email": None,
            "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "coopt-hub", **grant.describe()}},
        })

    def validate_yaml(self, request: Request) -> Response:
        # The client reads this body as JSON before it looks at the status, so errors stay JSON too.
        content = request.json().get("content")
        if not isinstance(content, str):
            raise bad_request("validate-yaml expects {'content': <README text>, 'repoType': ...}.")
        try:
            metadata = card_metadata(content)
        except CardMetadataError as err:
            return json_response({"errors": [{"message": str(err)}]}, 400)
        if metadata is None:  # accepted, with the Hub's warning (the client shows it)
            return json_response({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        return json_response({})

    def create_repo(self, request: Request) -> Response:
        user = access.authenticated(request.grant).user
        body = request.json()
        repo_id = make_repo_id(check_repo_type(body.get("type")), body.get("organization") or user, body.get("name"))
        access.require(request.grant, "write", repo_id.id, "create repos")
        visibility = body.get("visibility")
        if visibility not in (None, "public", "private", "protected"):
            raise bad_request(f"Unknown visibility {visibility!r}.")
        private = visibility in ("private", "protected") or body.get("private") is True
        url = f"{request.endpoint}/{repo_id.web_path}"
        files = {"README.md": _space_readme(repo_id.name, body.get("sdk"))} if repo_id.type == "space" else {}
        try:
            self.storage.create(repo_id, private=private, author=user, files=files)
        except HubError as err:
            err.extra["url"] = url  # create_repo(exist_ok=True) reads it from the 409
            raise
        return json_response({"url": url, "name": repo_id.id, "id": repo_id.id})

    def delete_repo(self, request: Request) -> Response:
        user = access.authenticated(request.grant).user
        body = request.json()
        repo_id = make_repo_id(check_repo_type(body.get("type")), body.get("organization") or user, body.get("name"))
        access.require(request.grant, "admin", repo_id.id, "delete repos")
        self.storage.delete(repo_id)
        return json_response({})

    def move_repo(self, request: Request) -> Response:
        """Rename a repo: the old name stops existing, so moving takes an admin token for it."""
        body = request.json()
        repo_type = check_repo_type(body.get("type"))
        source, target = (_split_repo_id(repo_type, body.get(key), key) for key in ("fromRepo", "toRepo"))
        access.require(request.grant, "admin", source.id, "move repos")
        access.require(request.grant, "write", target.id, "create repos")
        self.storage.move(source, target)
        return json_response({})

    def auth_check(self, request: Request, repo: tuple[str, str, str], write: str = "") -> Response:
        """200 when the caller may read the repo (with /write: push to its branches), as the Hub answers."""
        git_repo = self._open(request, repo)
        if write:
            if write != "write":
                raise HubError(404, f"No endpoint for {request.method} {request.path[:200]}.", "NotFound")
            access.require(request.grant, "write", git_repo.repo_id.id, "push to branches")
        return json_response({})

    def list_repos(self, request: Request, repo_type: str) -> Response:
        """`/api/datasets?author=&search=&limit=`: public repos, and private ones for a token holder."""
        author, search = request.param("author"), (request.param("search") or "").lower()
        limit_text = request.param("limit") or ""
        limit = int(limit_text) if limit_text.isascii() and limit_text.isdigit() and len(limit_text) < 9 else None
        found = []
        for repo_id in self.storage.list_repos(repo_type):
            if author is not None and repo_id.namespace.lower() != author.lower() or search not in repo_id.id.lower():
                continue
            try:
                settings = self.storage.open(repo_id).settings
            except (HubError, OSError):
                continue  # deleted meanwhile
            if not access.may_see(request.grant, repo_id.id, bool(settings.get("private"))):
                continue
            found.append({"_id": f"{repo_id.type}:{repo_id.id}", "id": repo_id.id, "author": repo_id.namespace,
                          "private": bool(settings.get("private")), "gated": False, "disabled": False,
                          "downloads": 0, "likes": 0, "tags": [], "createdAt": settings.get("createdAt")})
            if limit is not None and len(found) >= limit:
                break
        page, headers = _page(request, found, _TREE_PAGE)
        return json_response(page, headers=headers)

    def update_settings(self, request: Request, repo: tuple[str, str, str]) -> Response:
        body = request.json()
        changes_visibility = body.get("visibility") is not None or body.get("private") is not None
        git_repo = (self._open(request, repo, "admin", "change the visibility of repos") if changes_visibility
                    else self._open(request, repo, "write", "change repo settings"))
        if body.get("gated") not in (None, False):
            raise bad_request("Gated repos are not supported by this server.")
        visibility = body.get("visibility", "private" if body.get("private") is True else None)
        if body.get("private") is False:
            visibility = "public"
        if visibility not in (None, "public", "private", "protected"):
            raise bad_request(f"Unknown visibility {visibility!r}.")
        if visibility is not None:
            git_repo.update_settings(private=visibility != "public")
        return json_response({})

    def repo_info(self, request: Request, repo: tuple[str, str, str], revision: str = DEFAULT_BRANCH) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        commit = git_repo.commit_info(sha)
        settings = git_repo.settings
        with_blobs = request.flag("blobs")
        siblings = []
        for entry in git_repo.files(sha):
            sibling: dict = {"rfilename": entry.path}
            if with_blobs:
                sibling.update({"size": entry.size, "blobId": entry.oid})
                if entry.lfs_oid:
                    sibling["lfs"] = {"sha256": entry.lfs_oid, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        repo_id = git_repo.repo_id
        card = _card_data(git_repo, sha)
        return json_response({
            "_id": f"{repo_id.type}:{repo_id.id}", "id": repo_id.id, "author": repo_id.namespace, "sha": sha,
            "lastModified": iso_date(commit.timestamp), "createdAt": settings.get("createdAt"),
            "private": bool(settings.get("private")), "gated": False, "disabled": False, "tags": [],
            "downloads": 0, "likes": 0, "siblings": siblings, **({"cardData": card} if card is not None else {}),
        })

    # ---- refs and history ------------------------------------------------------------------

    def list_refs(self, request: Request, repo: tuple[str, str, str]) -> Response:
        groups = self._open(request, repo).refs()
        data = {
            key: [{"name": r.name, "ref": r.ref, "targetCommit": r.target} for r in groups[key]]
            for key in ("branches", "tags", "converts")
        }
        if request.flag("include_prs"):
            data["pullRequests"] = [{"name": r.name, "ref": r.ref, "targetCommit": r.target}
                                    for r in groups["pullRequests"]]
        return json_response(data)

    def list_commits(self, request: Request, repo: tuple[str, str, str], revision: str = DEFAULT_BRANCH) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        formatted = "formatted" in request.query.get("expand[]", [])
        commits = []
        for c in git_repo.history(sha):
            commit = {"id": c.id, "title": c.title, "message": c.message, "date": iso_date(c.timestamp),
                      "authors": [{"user": c.author}]}
            if formatted:  # the Hub renders markdown; escaped text is the safe subset of that
                commit["formatted"] = {"title": html.escape(c.title), "message": html.escape(c.message)}
            commits.append(commit)
        return json_response(commits)

    def create_branch(self, request: Request, repo: tuple[str, str, str], branch: str) -> Response:
        git_repo = self._open(request, repo, "write", "create branches")
        check_ref_name(branch)
        body = request.json()
        start = body.get("startingPoint") or DEFAULT_BRANCH
        if not isinstance(start, str):
            raise bad_request("startingPoint must be a revision string.")
        if body.get("emptyBranch"):
            raise bad_request("Empty branches are not supported; pass a startingPoint.")
        git_repo.create_branch(branch, git_repo.resolve(start))
        return json_response({})

    def delete_branch(self, request: Request, repo: tuple[str, str, str], branch: str) -> Response:
        self._open(request, repo, "write", "delete branches").delete_branch(check_ref_name(branch))
        return json_response({})

    def create_tag(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo, "write", "create tags")
        target = git_repo.resolve(revision)  # a missing revision first, as the Hub answers
        body = request.json()
        tag = check_ref_name(body.get("tag"), "tag")
        message = body.get("message")
        if message is not None and not isinstance(message, str):
            raise bad_request("The tag message must be a string.")
        git_repo.create_tag(tag, target, message, request.user)
        return json_response({})

    def delete_tag(self, request: Request, repo: tuple[str, str, str], tag: str) -> Response:
        git_repo = self._open(request, repo)
        access.require_tag_change(request.grant, git_repo.repo_id.id, tag)
        git_repo.delete_tag(check_ref_name(tag, "tag"))
        return json_response({})

    # ---- trees and files -------------------------------------------------------------------

    def list_tree(self, request: Request, repo: tuple[str, str, str], revision: str, path: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        path = path.strip("/")
        if path:
            check_path(path)
        entries = git_repo.list_dir(sha, path, recursive=request.flag("recursive"))
        expand = request.flag("expand")
        # Pages as the Hub cuts them, linked GitHub-style; the cursor is an offset into the listing.
        page, headers = _page(request, entries, _EXPANDED_PAGE if expand else _TREE_PAGE)
        return json_response(self._entries_json(git_repo, sha, page, expand), headers=headers)

    def paths_info(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        form = request.form_or_json()
        expand = str((form.get("expand") or ["false"])[-1]).lower() in {"1", "true"}
        paths = list(dict.fromkeys(str(path).strip("/") for path in form.get("paths", [])))
        if len(paths) > _MAX_PATHS_INFO:
            raise bad_request(f"paths-info takes at most {_MAX_PATHS_INFO} distinct paths per request.")
        entries = [git_repo.entry(sha, path) if path and _is_valid_path(path) else None for path in paths]
        return json_response(self._entries_json(git_repo, sha, [e for e in entries if e is not None], expand))

    def _entries_json(self, git_repo: GitRepo, sha: str, entries: list[Entry], expand: bool) -> list[dict]:
        last = git_repo.last_commits(sha, [entry.path for entry in entries]) if expand else {}
        answers = []
        for entry in entries:
            data = entry.to_json()
            if expand:
                commit = last[entry.path]
                data["lastCommit"] = {"id": commit.id, "title": commit.title, "date": iso_date(commit.timestamp)}
            answers.append(data)
        return answers

    def resolve(self, request: Request, repo: tuple[str, str, str], revision: str, path: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        entry = git_repo.entry(sha, path) if _is_valid_path(path) else None
        if entry is None or entry.type != "file":
            err = entry_not_found(path, revision)
            err.headers["X-Repo-Commit"] = sha  # lets the client cache the absence at this commit
            raise err
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        part = ranged(entry.size, request.headers.get("Range"))
        status, offset, length = part if part else (200, 0, entry.size)
        if part:
            headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{entry.size}"
        if entry.lfs_oid and not git_repo.has_lfs(entry.lfs_oid, entry.size):
            raise HubError(500, f"The LFS object of {path!r} is missing from the server's storage.",
                           "LfsObjectMissing")
        if request.method == "HEAD":
            return Response(status, headers=headers, length=length)
        if entry.lfs_oid:
            return Response(status, headers=headers, file=git_repo.lfs_path(entry.lfs_oid), offset=offset,
                            length=length)
        return Response(status, headers=headers, stream=git_repo.iter_blob(entry.oid, offset, length), length=length)

    # ---- commits ---------------------------------------------------------------------------

    def preupload(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo, "contribute", "upload files")
        head = git_repo.branch_head(revision)
        body = request.json()
        files = body.get("files")
        if not isinstance(files, list):
            raise bad_request("Preupload expects {'files': [{'path', 'size', 'sample'}, ...]}.")
        ignored = _ignore_filter(git_repo, head, body.get("gitIgnore"))
        answers = []
        for item in files:
            if not isinstance(item, dict):
                raise bad_request("Each preupload file must be an object.")
            path = check_path(item.get("path"))
            size = item.get("size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"Invalid size for {path!r}.")
            sample = _b64decode(item.get("sample", ""), f"sample of {path!r}")
            mode = "lfs" if wants_lfs(path, size, sample) else "regular"
            current = git_repo.entry(head, path)
            oid = None
            if current is not None and current.type == "file":
                oid = current.lfs_oid if mode == "lfs" else (current.oid if current.lfs_oid is None else None)
            should_ignore = bool(ignored.is_ignored(path)) if ignored is not None else False
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": should_ignore, "oid": oid})
        return json_response({"files": answers})

    def commit(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo)
        self._check_commit(request, git_repo, revision)
        with request.body.open() as body:
            header, operations = _parse_commit(body, git_repo)
        commit_args = (operations, header["summary"], header["description"], header["parentCommit"], request.user)
        answer: dict = {}
        if request.flag("create_pr"):
            num, oid = git_repo.commit_pull_request(revision, *commit_args)
            answer["pullRequestUrl"] = f"{request.endpoint}/{git_repo.repo_id.web_path}/discussions/{num}"
        else:
            oid = git_repo.commit(revision, *commit_args)
        return json_response({
            "commitOid": oid,
            "commitUrl": f"{request.endpoint}/{git_repo.repo_id.web_path}/commit/{oid}",
            "commitMessage": header["summary"],
            "success": True,
            **answer,
        })

    def _check_commit(self, request: Request, git_repo: GitRepo, revision: str) -> None:
        """Before anything is stored: a new pull request needs contribute; a push to a pull request,
        write or being its author; a push to a branch, write (and the `main` grant for main)."""
        repo_id = git_repo.repo_id.id
        if request.flag("create_pr"):
            access.require(request.grant, "contribute", repo_id, "open pull requests")
        elif revision.startswith("refs/pr/"):
            grant = access.require(request.grant, "contribute", repo_id, "push to pull requests")
            if not grant.allows("write"):
                number = _discussion_number(revision[len("refs/pr/"):])
                author = git_repo.discussions.get(git_repo.discussions.load(), number)["author"]
                if author != grant.user:
                    raise access.forbidden(f"Pull request #{number} of {repo_id} was opened by {author}: a "
                                           "contribute token may push only to the pull requests it opened")
        else:
            access.require_branch(request.grant, repo_id, revision, "push to")

    def super_squash(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo)
        if revision.startswith("refs/pr/"):
            access.require(request.grant, "write", git_repo.repo_id.id, "squash pull requests")
        else:
            access.require_branch(request.grant, git_repo.repo_id.id, revision, "squash")
        message = _optional_text(request.json().get("message")) or f"Super-squash branch '{revision}'"
        return json_response({"commitId": git_repo.squash(revision, message, request.user)})

    # ---- discussions and pull requests ------------------------------------------------------

    def list_discussions(self, request: Request, repo: tuple[str, str, str]) -> Response:
        git_repo = self._open(request, repo)
        repo_id = git_repo.repo_id
        kind, status, author = request.param("type"), request.param("status"), request.param("author")
        records = [r for r in git_repo.discussions.load() if discussions.matches(r, kind, status, author)]
        records.sort(key=lambda r: r["num"], reverse=True)
        page = request.param("p") or "0"
        start = int(page) * discussions.PAGE_SIZE if page.isascii() and page.isdigit() and len(page) < 7 else 0
        return json_response({"count": len(records), "start": start, "discussions": [
            discussions.summary(r, repo_id.id, repo_id.type) for r in records[start: start + discussions.PAGE_SIZE]
        ]})

    def create_discussion(self, request: Request, repo: tuple[str, str, str]) -> Response:
        git_repo = self._open(request, repo, "contribute", "open discussions and pull requests")
        body = request.json()
        title, description = body.get("title"), body.get("description") or ""
        if not isinstance(title, str) or not title.strip() or not isinstance(description, str):
            raise HubError(422, "A discussion needs a non-empty 'title' string.", "UnprocessableEntity")
        num = git_repo.open_discussion(title.strip(), description, request.user, body.get("pullRequest") is True)
        return json_response({"num": num, "url": f"{request.endpoint}/{git_repo.repo_id.web_path}/discussions/{num}"})

    def discussion_details(self, request: Request, repo: tuple[str, str, str], num: str) -> Response:
        git_repo = self._open(request, repo)
        records = git_repo.discussions.load()
        record = git_repo.discussions.get(records, _discussion_number(num))
        repo_id = git_repo.repo_id
        conflicts = git_repo.pull_request_conflicts(record)
        return json_response(discussions.details(record, repo_id.id, repo_id.type, conflicts))

    def change_discussion(self, request: Request, repo: tuple[str, str, str], num: str, resource: str) -> Response:
        git_repo = self._open(request, repo)
        repo_id = git_repo.repo_id.id
        if resource == "comment":
            access.require(request.grant, "contribute", repo_id, "comment")
        else:  # renaming, closing and merging are the repo's writers' calls, not a contributor's
            access.require(request.grant, "write", repo_id, _DISCUSSION_CHANGES.get(resource, "change discussions"),
                           instead="")
        number, user, body = _discussion_number(num), request.user, request.json()
        if resource == "merge":
            base = git_repo.discussions.get(git_repo.discussions.load(), number)["base"]
            if base is not None:  # a plain discussion: merging it is refused below
                access.require_branch(request.grant, repo_id, base, "merge pull requests into")
            comment = body.get("comment")
            return json_response({"newStatus": git_repo.merge_pull_request(number, user, _optional_text(comment))})
        if resource == "comment":
            text = _required_text(body.get("comment"), "comment")
            return json_response({"newMessage": git_repo.change_discussion(
                number, lambda store, record: store.comment(record, text, user))})
        if resource == "title":
            title = _required_text(body.get("title"), "title")

            def rename(store: discussions.DiscussionStore, record: dict) -> dict:
                event = store.event(record, "title-change", user, {"from": record["title"], "to": title})
                record["title"] = title
                return event

            return json_response({"newTitle": git_repo.change_discussion(number, rename)})
        if resource == "status":
            return json_response({"newStatus": git_repo.change_discussion(number, _status_change(body, user))})
        raise HubError(404, f"No discussion action {resource[:50]!r}.", "NotFound")

    def change_comment(self, request: Request, repo: tuple[str, str, str], num: str, kind: str, comment_id: str,
                       action: str) -> Response:
        """Edit or hide a comment: its author's right, and its repo's writers'."""
        if kind != "comment" or action not in ("edit", "hide"):
            raise HubError(404, f"No discussion action {action[:50]!r}.", "NotFound")
        git_repo = self._open(request, repo)
        repo_id = git_repo.repo_id.id
        grant = access.require(request.grant, "contribute", repo_id, f"{action} comments")
        text = _required_text(request.json().get("content"), "content") if action == "edit" else ""

        def change(store: discussions.DiscussionStore, record: dict) -> dict:
            event = store.comment_event(record, comment_id.lower())
            author = event["author"]["name"]
            if author != grant.user and not grant.allows("write"):
                raise access.forbidden(f"This comment is {author}'s: only its author or a writer of {repo_id} can "
                                       f"{action} it")
            return store.edit(event, text, grant.user) if action == "edit" else store.hide(event)

        return json_response({"updatedComment": git_repo.change_discussion(_discussion_number(num), change)})

    # ---- git-LFS basic transfer ------------------------------------------------------------

    def lfs_batch(self, request: Request, repo: tuple[str, str, str]) -> Response:
        git_repo = self._open(request, repo, "contribute", "upload files")
        body = request.json()
        if body.get("operation") != "upload":
            raise bad_request("Only the LFS 'upload' operation is supported; download files through /resolve/.")
        if body.get("hash_algo", "sha256") != "sha256":
            raise bad_request("Only sha256 LFS objects are supported.")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise bad_request("The LFS batch needs an 'objects' list.")
        base = f"{request.endpoint}/{git_repo.repo_id.web_path}.git/info/lfs/objects"
        answers = []
        for item in objects:
            oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
            if not is_sha256(oid) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
                answers.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "oid must be 64 hex digits and size an integer"}})
                continue
            if git_repo.has_lfs(oid, size):
                answers.append({"oid": oid, "size": size})  # already here: no actions, nothing to send
                continue
            expires, signature = self.auth.sign(git_repo.repo_id.web_path, oid, str(size))
            answers.append({
                "oid": oid, "size": size, "authenticated": True,
                "actions": {
                    "upload": {"href": f"{base}/{oid}?size={size}&expires={expires}&sig={signature}"},
                    "verify": {"href": f"{base}/{oid}/verify"},
                },
            })
        return json_response({"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
                             headers={"Content-Type": _LFS_JSON})

    def _check_upload_url(self, request: Request, repo: tuple[str, str, str], oid: str) -> int:
        """An LFS PUT carries no token: its signed URL is the credential, and it fixes the body size."""
        try:
            repo_id = make_repo_id(*repo)
        except HubError:
            raise repo_not_found() from None
        size_text = request.param("size") or ""
        if not is_sha256(oid) or not (size_text.isascii() and size_text.isdigit() and len(size_text) < 19):
            raise bad_request("An LFS upload URL names a sha256 oid and a size; ask the batch endpoint for one.")
        self.auth.check_signature(request.param("expires") or "", request.param("sig") or "",
                                  repo_id.web_path, oid, size_text)
        declared = request.headers.get("Content-Length")
        if declared is not None and declared != size_text:
            raise bad_request(f"The upload of {oid} must be exactly {size_text} bytes.")
        return int(size_text)

    def lfs_upload(self, request: Request, repo: tuple[str, str, str], oid: str) -> Response:
        git_repo = self.storage.open(make_repo_id(*repo))
        body = request.body
        git_repo.receive_lfs(oid, int(request.param("size")), body.on_disk(), sha256=body.sha256())
        return Response(200)

    def lfs_verify(self, request: Request, repo: tuple[str, str, str], oid: str) -> Response:
        git_repo = self._open(request, repo, "contribute", "upload files")
        size = request.json().get("size")
        if not is_sha256(oid) or not git_repo.has_lfs(oid, size if isinstance(size, int) else None):
            raise HubError(404, f"LFS object {oid} was not uploaded (or has another size).", "EntryNotFound")
        return json_response({}, headers={"Content-Type": _LFS_JSON})


def _check_card(readme: bytes) -> None:
    """The Hub refuses a README whose metadata it cannot read; so do we, rather than serve it broken."""
    try:
        card_metadata(readme.decode("utf-8", "replace"))
    except CardMetadataError as err:
        raise bad_request(f"Invalid metadata in README.md: {err}") from None


_CARDS: OrderedDict[str, dict | None] = OrderedDict()  # README blob id -> its metadata, newest last
_CARDS_LOCK = threading.Lock()
_MAX_CACHED_CARDS = 256


def _card_data(git_repo: GitRepo, sha: str) -> dict | None:
    """The README's metadata, parsed once per README version; a README the Hub would have refused
    (committed before the check at commit time existed) just has none."""
    readme = git_repo.entry(sha, "README.md")
    if readme is None or readme.type != "file" or readme.lfs_oid is not None:
        return None
    with _CARDS_LOCK:
        if readme.oid in _CARDS:
            return _CARDS[readme.oid]
    try:
        card = card_metadata(git_repo.read_blob(readme.oid).decode("utf-8", "replace"))
    except CardMetadataError:
        card = None
    with _CARDS_LOCK:
        _CARDS[readme.oid] = card
        if len(_CARDS) > _MAX_CACHED_CARDS:
            _CARDS.popitem(last=False)
    return card


def _space_readme(name: str, sdk: object) -> bytes:
    """The README the Hub gives a new Space: its metadata names the SDK, which Space tools read there."""
    if sdk is not None and not (isinstance(sdk, str) and re.fullmatch(r"[a-z0-9-]{1,32}", sdk)):
        raise bad_request("A Space's sdk must be a name such as 'gradio', 'docker' or 'static'.")
    return f"---\ntitle: {name}\nsdk: {sdk or 'static'}\n---\n".encode()


def _split_repo_id(repo_type: str, repo_id: object, what: str) -> RepoId:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise bad_request(f"{what} must be a repo id: namespace/name.")
    return make_repo_id(repo_type, *repo_id.split("/"))


def _is_valid_path(path: str) -> bool:
    try:
        check_path(path)
    except HubError:
        return False
    return True


def _page(request: Request, items: list, page_size: int) -> tuple[list, dict[str, str]]:
    """One page of a listing, and the GitHub-style Link to the next (the cursor is an offset)."""
    cursor = request.param("cursor") or "0"
    start = int(cursor) if cursor.isascii() and cursor.isdigit() and len(cursor) < 10 else 0
    headers = {}
    if start + page_size < len(items):
        query = {key: values[-1] for key, values in request.query.items()}
        query["cursor"] = str(start + page_size)
        headers["Link"] = f'<{request.endpoint}{request.path}?{urlencode(query)}>; rel="next"'
    return items[start: start + page_size], headers


def _ignore_filter(git_repo: GitRepo, head: str, git_ignore: object) -> IgnoreFilter | None:
    """The .gitignore a preupload is checked against: the one being uploaded, else the branch's."""
    if git_ignore is None:
        entry = git_repo.entry(head, ".gitignore")
        if entry is None or entry.type != "file" or entry.lfs_oid is not None:
            return None
        git_ignore = git_repo.read_blob(entry.oid).decode("utf-8", "replace")
    if not isinstance(git_ignore, str):
        raise bad_request("gitIgnore must be the text of a .gitignore file.")
    return IgnoreFilter([line.encode() for line in git_ignore.splitlines()[:10_000] if line.strip()])


def _discussion_number(num: str) -> int:
    if not (num.isascii() and num.isdigit() and len(num) < 10) or int(num) == 0:
        raise HubError(404, f"Discussion {num[:20]!r} not found.", "DiscussionNotFound")
    return int(num)


def _required_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise HubError(422, f"The {what} must be a non-empty string.", "UnprocessableEntity")
    return value.strip()


def _optional_text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _status_change(body: dict, user: str) -> Callable:
    status = body.get("status")
    if status not in ("open", "closed"):
        raise HubError(422, "The status must be 'open' or 'closed'.", "UnprocessableEntity")
    comment = _optional_text(body.get("comment"))

    def change(store: discussions.DiscussionStore, record: dict) -> dict:
        if record["status"] == "merged":
            raise HubError(409, f"#{record['num']} is merged; its status cannot change.", "Conflict")
        if comment:
            store.comment(record, comment, user)
        record["status"] = status
        return store.event(record, "status-change", user, {"status": status})

    return change


def _b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"The {what} must be a base64 string.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"The {what} is not valid base64.") from None


def _parse_commit(body: BinaryIO, git_repo: GitRepo) -> tuple[dict, list[Operation]]:
    """Validate the whole NDJSON payload before any ref moves; file contents go to the object store
    as they are read (unreferenced until the commit lands), so memory holds one line at a time."""
    lines = _commit_lines(body)
    key, value = next(lines, (None, None))
    if key is None:
        raise bad_request("Empty commit payload: expected NDJSON lines, the first being the header.")
    if key != "header":
        raise bad_request("The first line of the commit payload must be the header.")
    header = _commit_header(value)
    operations = [_operation(key, value, git_repo) for key, value in lines]
    return header, operations


def _commit_lines(body: BinaryIO):
    for number in range(1, _MAX_COMMIT_LINES + 1):
        line = body.readline(_MAX_COMMIT_LINE + 1)
        if not line:
            return
        if len(line) > _MAX_COMMIT_LINE:
            raise bad_request(f"Line {number} of the commit payload is longer than {_MAX_COMMIT_LINE} bytes; "
                              "send large files through LFS.")
        if not line.strip():
            continue
        try:
            item = parse_json(line, f"line {number} of the commit payload")
        except HubError as err:
            raise bad_request(f"Line {number} of the commit payload is not valid JSON ({err.message})") from None
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise bad_request(f"Line {number} of the commit payload must be {{'key': ..., 'value': {{...}}}}.")
        yield item.get("key"), item["value"]
    if body.readline(1):
        raise bad_request(f"A commit payload holds at most {_MAX_COMMIT_LINES} lines.")


def _commit_header(value: dict) -> dict:
    summary = value.get("summary")
    description = value.get("description") or ""
    parent = value.get("parentCommit")
    if not isinstance(summary, str) or not summary.strip() or not isinstance(description, str):
        raise bad_request("The commit header needs a non-empty 'summary' string.")
    if parent is not None and (not isinstance(parent, str) or not _COMMIT_ID.match(parent)):
        raise bad_request("parentCommit must be a commit id (7 to 40 hex digits).")
    return {"summary": summary.strip(), "description": description, "parentCommit": parent}


def _operation(key: object, value: dict, git_repo: GitRepo) -> Operation:
    path = value.get("path")
    if key == "deletedFolder" and isinstance(path, str):
        path = path.rstrip("/")  # the client sends folders as `dir/`
    path = check_path(path)
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise bad_request(f"Unsupported encoding for {path!r}; send base64.")
        content = _b64decode(value.get("content"), f"content of {path!r}")
        if path == "README.md":
            _check_card(content)
        return AddFile(path, git_repo.add_blob(path, content))
    if key == "lfsFile":
        oid, size = value.get("oid"), value.get("size")
        if value.get("algo", "sha256") != "sha256" or not is_sha256(oid):
            raise bad_request(f"LFS file {path!r} needs a sha256 oid.")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise bad_request(f"Invalid size for LFS file {path!r}.")
        return AddLfsFile(path, oid, size)
    if key == "deletedFile":
        return DeleteFile(path)
    if key == "deletedFolder":
        return DeleteFolder(path)
    raise bad_request(f"Unknown commit operation {str(key)[:50]!r}.")
