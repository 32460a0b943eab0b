"""The Hub HTTP API: routes on raw path segments, and one method per endpoint.

Endpoints and their exact answers follow what huggingface_hub and datasets send and read
(see docs in shared/HUB_API.md). Nothing here ever advertises Xet: no xetHash in entries, no Xet
headers, so clients stay on plain downloads and the git-LFS basic transfer.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from urllib.parse import unquote

from dulwich.errors import NotGitRepository

from coopt_hub.server.auth import Auth, require_user
from coopt_hub.server.cards import CardMetadataError, card_metadata
from coopt_hub.server.errors import HubError, bad_request, entry_not_found, repo_not_found
from coopt_hub.server.http import Request, Response, json_response, ranged
from coopt_hub.server.names import (
    TYPES_BY_PLURAL,
    check_path,
    check_ref_name,
    check_repo_type,
    make_repo_id,
)
from coopt_hub.server.storage import (
    DEFAULT_BRANCH,
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

_LFS_JSON = "application/vnd.git-lfs+json"
_HEX40_LEN = 40


class HubApi:
    def __init__(self, storage: HubStorage, auth: Auth):
        self.storage = storage
        self.auth = auth
        self._fixed_routes = {
            ("GET", "whoami-v2"): self.whoami,
            ("POST", "validate-yaml"): self.validate_yaml,
            ("POST", "repos/create"): self.create_repo,
            ("POST", "repos/delete"): self.delete_repo,
            ("DELETE", "repos/delete"): self.delete_repo,
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
        }

    # ---- routing ---------------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        request.user = self.auth.user_for(request.headers.get("Authorization"))
        s = request.segments
        route = self._route_api(request.method, s[1:]) if s[:1] == ["api"] else self._route_web(request.method, s)
        if route is None:
            raise HubError(404, f"No endpoint for {request.method} /{'/'.join(s)}.", "NotFound")
        handler, args = route
        try:
            return handler(request, *args)
        except (OSError, KeyError, NotGitRepository):
            # A repo deleted while this request was reading it: its files vanished under us.
            if args and isinstance(args[0], tuple) and not self.storage.exists(args[0]):
                raise repo_not_found(f"{args[0][1]}/{args[0][2]}") from None
            raise

    def _route_api(self, method: str, s: list[str]) -> tuple[Callable[..., Response], list] | None:
        fixed = self._fixed_routes.get((method, "/".join(s)))
        if fixed is not None:
            return fixed, []
        if len(s) < 3 or s[0] not in TYPES_BY_PLURAL:
            return None
        repo = (TYPES_BY_PLURAL[s[0]], unquote(s[1]), unquote(s[2]))
        action, rest = (s[3], s[4:]) if len(s) > 3 else ("", [])
        if action == "tree" and rest and method == "GET":
            # The sub-path arrives as one encoded segment (`data%2Fsub`), or as several.
            return self.list_tree, [repo, unquote(rest[0]), unquote("/".join(rest[1:]))]
        handler = self._repo_routes.get((method, action, len(rest)))
        return (handler, [repo, *map(unquote, rest)]) if handler is not None else None

    def _route_web(self, method: str, s: list[str]) -> tuple[Callable[..., Response], list] | None:
        repo_type = "model"
        if s and s[0] in ("datasets", "spaces"):
            repo_type, s = TYPES_BY_PLURAL[s[0]], s[1:]
        if len(s) >= 4 and s[2] == "resolve" and method in ("GET", "HEAD"):
            repo = (repo_type, unquote(s[0]), unquote(s[1]))
            return self.resolve, [repo, unquote(s[3]), unquote("/".join(s[4:]))]
        if len(s) >= 5 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            repo = (repo_type, unquote(s[0]), unquote(s[1][: -len(".git")]))
            lfs = s[5:]
            if method == "POST" and lfs == ["batch"]:
                return self.lfs_batch, [repo]
            if method == "PUT" and len(lfs) == 1:
                return self.lfs_upload, [repo, lfs[0]]
            if method == "POST" and len(lfs) == 2 and lfs[1] == "verify":
                return self.lfs_verify, [repo, lfs[0]]
        return None

    # ---- access ----------------------------------------------------------------------------

    def _open(self, request: Request, repo: tuple[str, str, str], write: bool = False) -> GitRepo:
        """Open a repo the caller may see; a private repo is indistinguishable from a missing one."""
        if write:
            require_user(request.user)
        try:
            repo_id = make_repo_id(*repo)
        except HubError:
            raise repo_not_found(f"{repo[1]}/{repo[2]}") from None
        git_repo = self.storage.open(repo_id)
        if git_repo.private and request.user is None:
            raise repo_not_found(repo_id.id)
        return git_repo

    # ---- account and repos -----------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        user = require_user(request.user)
        return json_response({
            "type": "user", "id": user, "name": user, "fullname": user, "email": None,
            "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "coopt-hub", "role": "write"}},
        })

    def validate_yaml(self, request: Request) -> Response:
        # The client reads this body as JSON before it looks at the status, so errors stay JSON too.
        content = request.json().get("content")
        if not isinstance(content, str):
            raise bad_request("validate-yaml expects {'content': <README text>, 'repoType': ...}.")
        try:
            card_metadata(content)
        except CardMetadataError as err:
            return json_response({"errors": [{"message": str(err)}]}, 400)
        return json_response({})

    def create_repo(self, request: Request) -> Response:
        user = require_user(request.user)
        body = request.json()
        repo_id = make_repo_id(check_repo_type(body.get("type")), body.get("organization") or user, body.get("name"))
        visibility = body.get("visibility")
        if visibility not in (None, "public", "private", "protected"):
            raise bad_request(f"Unknown visibility {visibility!r}.")
        private = visibility in ("private", "protected") or body.get("private") is True
        url = f"{request.endpoint}/{repo_id.web_path}"
        try:
            self.storage.create(repo_id, private=private, author=user)
        except HubError as err:
            err.extra["url"] = url  # create_repo(exist_ok=True) reads it from the 409
            raise
        return json_response({"url": url, "name": repo_id.id, "id": repo_id.id})

    def delete_repo(self, request: Request) -> Response:
        require_user(request.user)
        body = request.json()
        repo_id = make_repo_id(check_repo_type(body.get("type")), body.get("organization") or request.user,
                               body.get("name"))
        self.storage.delete(repo_id)
        return json_response({})

    def update_settings(self, request: Request, repo: tuple[str, str, str]) -> Response:
        git_repo = self._open(request, repo, write=True)
        body = request.json()
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
        return json_response([
            {"id": c.id, "title": c.title, "message": c.message, "date": iso_date(c.timestamp),
             "authors": [{"user": c.author}]}
            for c in git_repo.history(sha)
        ])

    def create_branch(self, request: Request, repo: tuple[str, str, str], branch: str) -> Response:
        git_repo = self._open(request, repo, write=True)
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
        self._open(request, repo, write=True).delete_branch(check_ref_name(branch))
        return json_response({})

    def create_tag(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo, write=True)
        body = request.json()
        tag = check_ref_name(body.get("tag"), "tag")
        message = body.get("message")
        if message is not None and not isinstance(message, str):
            raise bad_request("The tag message must be a string.")
        git_repo.create_tag(tag, git_repo.resolve(revision), message, request.user)
        return json_response({})

    def delete_tag(self, request: Request, repo: tuple[str, str, str], tag: str) -> Response:
        self._open(request, repo, write=True).delete_tag(check_ref_name(tag, "tag"))
        return json_response({})

    # ---- trees and files -------------------------------------------------------------------

    def list_tree(self, request: Request, repo: tuple[str, str, str], revision: str, path: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        path = path.strip("/")
        if path:
            check_path(path)
        entries = git_repo.list_dir(sha, path, recursive=request.flag("recursive"))
        return json_response([self._entry_json(git_repo, sha, e, request.flag("expand")) for e in entries])

    def paths_info(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo)
        sha = git_repo.resolve(revision)
        form = request.form_or_json()
        expand = str((form.get("expand") or ["false"])[-1]).lower() in {"1", "true"}
        found = []
        for path in form.get("paths", []):
            path = str(path).strip("/")
            entry = git_repo.entry(sha, path) if path and _is_valid_path(path) else None
            if entry is not None:
                found.append(self._entry_json(git_repo, sha, entry, expand))
        return json_response(found)

    def _entry_json(self, git_repo: GitRepo, sha: str, entry: Entry, expand: bool) -> dict:
        data = entry.to_json()
        if expand:
            last = git_repo.last_commit_touching(sha, entry.path)
            data["lastCommit"] = {"id": last.id, "title": last.title, "date": iso_date(last.timestamp)}
        return data

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
        if entry.lfs_oid:
            lfs_file = git_repo.lfs_path(entry.lfs_oid)
            if not git_repo.has_lfs(entry.lfs_oid, entry.size):
                raise HubError(500, f"The LFS object of {path!r} is missing from the server's storage.",
                               "LfsObjectMissing")
            return Response(status, headers=headers, file=lfs_file, offset=offset, length=length)
        if request.method == "HEAD":
            return Response(status, headers=headers, length=length)
        return Response(status, git_repo.read_blob(entry.oid)[offset: offset + length], headers)

    # ---- commits ---------------------------------------------------------------------------

    def preupload(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo, write=True)
        _reject_pull_requests(request)
        head = git_repo.branch_head(revision)
        files = request.json().get("files")
        if not isinstance(files, list):
            raise bad_request("Preupload expects {'files': [{'path', 'size', 'sample'}, ...]}.")
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
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return json_response({"files": answers})

    def commit(self, request: Request, repo: tuple[str, str, str], revision: str) -> Response:
        git_repo = self._open(request, repo, write=True)
        _reject_pull_requests(request)
        header, operations = _parse_commit(request.body())
        oid = git_repo.commit(
            revision, operations, header["summary"], header["description"], header["parentCommit"], request.user
        )
        return json_response({
            "commitOid": oid,
            "commitUrl": f"{request.endpoint}/{git_repo.repo_id.web_path}/commit/{oid}",
            "commitMessage": header["summary"],
            "success": True,
        })

    # ---- git-LFS basic transfer ------------------------------------------------------------

    def lfs_batch(self, request: Request, repo: tuple[str, str, str]) -> Response:
        git_repo = self._open(request, repo, write=True)
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

    def lfs_upload(self, request: Request, repo: tuple[str, str, str], oid: str) -> Response:
        try:
            repo_id = make_repo_id(*repo)
        except HubError:
            raise repo_not_found(f"{repo[1]}/{repo[2]}") from None
        size_text = request.param("size") or ""
        if not is_sha256(oid) or not size_text.isdigit():
            raise bad_request("An LFS upload URL names a sha256 oid and a size; ask the batch endpoint for one.")
        self.auth.check_signature(request.param("expires") or "", request.param("sig") or "",
                                  repo_id.web_path, oid, size_text)
        git_repo = self.storage.open(repo_id)
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.strip() != size_text:
            raise bad_request(f"The upload of {oid} must be exactly {size_text} bytes.")
        git_repo.receive_lfs(oid, int(size_text), request.stream())
        return Response(200)

    def lfs_verify(self, request: Request, repo: tuple[str, str, str], oid: str) -> Response:
        git_repo = self._open(request, repo, write=True)
        size = request.json().get("size")
        if not is_sha256(oid) or not git_repo.has_lfs(oid, size if isinstance(size, int) else None):
            raise HubError(404, f"LFS object {oid} was not uploaded (or has another size).", "EntryNotFound")
        return json_response({}, headers={"Content-Type": _LFS_JSON})


def _card_data(git_repo: GitRepo, sha: str) -> dict | None:
    """The README's metadata; a README the Hub would have refused (bad YAML) just has none."""
    readme = git_repo.entry(sha, "README.md")
    if readme is None or readme.type != "file" or readme.lfs_oid is not None:
        return None
    try:
        return card_metadata(git_repo.read_blob(readme.oid).decode("utf-8", "replace"))
    except CardMetadataError:
        return None


def _is_valid_path(path: str) -> bool:
    try:
        check_path(path)
    except HubError:
        return False
    return True


def _reject_pull_requests(request: Request) -> None:
    if request.flag("create_pr"):
        raise bad_request("Pull requests are not supported by this server; commit to a branch instead.")


def _b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise bad_request(f"The {what} must be a base64 string.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"The {what} is not valid base64.") from None


def _parse_commit(body: bytes) -> tuple[dict, list[Operation]]:
    """Validate the whole NDJSON payload before anything is written."""
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines:
        raise bad_request("Empty commit payload: expected NDJSON lines, the first being the header.")
    items = []
    for number, line in enumerate(lines, start=1):
        try:
            item = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
            raise bad_request(f"Line {number} of the commit payload is not valid JSON.") from None
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise bad_request(f"Line {number} of the commit payload must be {{'key': ..., 'value': {{...}}}}.")
        items.append((item.get("key"), item["value"]))
    key, value = items[0]
    if key != "header":
        raise bad_request("The first line of the commit payload must be the header.")
    summary = value.get("summary")
    description = value.get("description") or ""
    parent = value.get("parentCommit")
    if not isinstance(summary, str) or not summary.strip() or not isinstance(description, str):
        raise bad_request("The commit header needs a non-empty 'summary' string.")
    if parent is not None and (not isinstance(parent, str) or len(parent) != _HEX40_LEN):
        raise bad_request("parentCommit must be a 40-character commit id.")
    header = {"summary": summary.strip(), "description": description, "parentCommit": parent}
    operations: list[Operation] = []
    for key, value in items[1:]:
        path = value.get("path")
        if key == "deletedFolder" and isinstance(path, str):
            path = path.rstrip("/")  # the client sends folders as `dir/`
        path = check_path(path)
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise bad_request(f"Unsupported encoding for {path!r}; send base64.")
            operations.append(AddFile(path, _b64decode(value.get("content"), f"content of {path!r}")))
        elif key == "lfsFile":
            oid, size = value.get("oid"), value.get("size")
            if value.get("algo", "sha256") != "sha256" or not is_sha256(oid):
                raise bad_request(f"LFS file {path!r} needs a sha256 oid.")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise bad_request(f"Invalid size for LFS file {path!r}.")
            operations.append(AddLfsFile(path, oid, size))
        elif key == "deletedFile":
            operations.append(DeleteFile(path))
        elif key == "deletedFolder":
            operations.append(DeleteFolder(path))
        else:
            raise bad_request(f"Unknown commit operation {key!r}.")
    return header, operations

