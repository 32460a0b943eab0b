"""What a token may do: a role, the repos it covers, and whether it may change main.

Roles, each allowing what the one before it does:

    read        see the private repos it covers (public repos need no token at all)
    contribute  open pull requests and discussions, push to the pull requests it opened, comment
    write       create repos, branches and tags; push to branches and to any pull request; merge
                pull requests; change discussions. Main (the default branch) only when granted `main`.
    admin       also delete repos, change their visibility, and delete tags

Published tags are immutable for every role but admin: a tag that was cited must keep naming the
same commit, so deleting one (the only way to move or re-create it) is an admin's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from coopt_hub.server.errors import HubError
from coopt_hub.server.names import DEFAULT_BRANCH

ROLES = ("read", "contribute", "write", "admin")

# The next step to suggest when a token's role falls short, by the role it would need.
_INSTEAD = {
    "write": "; open a pull request instead (create_commit with create_pr=True)",
    "admin": "; ask the hub's owner, who holds an admin token",
}


@dataclass(frozen=True)
class Grant:
    """What one token allows. `repos` are `namespace/name` patterns (`*`, `?`), case-insensitive;
    none means every repo. `main`: a write token may also push to and merge into main."""

    user: str
    role: str
    repos: tuple[str, ...] = ()
    main: bool = False

    def covers(self, repo_id: str) -> bool:
        return not self.repos or any(fnmatchcase(repo_id.lower(), pattern.lower()) for pattern in self.repos)

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def may_change_main(self) -> bool:
        return self.role == "admin" or self.role == "write" and self.main

    def describe(self) -> dict:
        return {"role": self.role, "repos": list(self.repos), "main": self.may_change_main}


def bare_grant(user: str) -> Grant:
    """What a plain token (a token-file line without a role, or `--token`) has always allowed:
    writing everywhere, main included; deleting repos and tags is now an admin's."""
    return Grant(user, "write", (), main=True)


def may_see(grant: Grant | None, repo_id: str, private: bool) -> bool:
    """Public repos are everyone's to read; a private one only for tokens that cover it (any role)."""
    return not private or grant is not None and grant.covers(repo_id)


def require(grant: Grant | None, role: str, repo_id: str, action: str, instead: str | None = None) -> Grant:
    """The caller's grant when it allows `action` on `repo_id` (which needs `role`): 401 without a
    token, 403 naming what is missing with one. `action` completes "cannot ...": "push to branch 'x'";
    `instead` (default: one per role) is the next step the message suggests."""
    grant = authenticated(grant)
    if not grant.covers(repo_id):
        raise forbidden(f"Your token covers {', '.join(grant.repos)}, not {repo_id}: it cannot {action} there")
    if not grant.allows(role):
        raise forbidden(f"Your token's role is '{grant.role}', so it cannot {action} in {repo_id} "
                        f"(that needs '{role}'){_INSTEAD.get(role, '') if instead is None else instead}")
    return grant


def authenticated(grant: Grant | None) -> Grant:
    if grant is None:
        raise HubError(
            401,
            "Authentication required: this request writes, so send a token the server knows "
            "(set HF_TOKEN to one of the tokens `coopt-hub hub serve` prints).",
            "Unauthorized",
        )
    return grant


def require_branch(grant: Grant | None, repo_id: str, branch: str, action: str) -> Grant:
    """Writing to `branch`: write access, and for main also the `main` grant (or admin)."""
    grant = require(grant, "write", repo_id, f"{action} branch {branch!r}")
    if branch == DEFAULT_BRANCH and not grant.may_change_main:
        raise forbidden(f"Branch {DEFAULT_BRANCH!r} of {repo_id} is protected: your token cannot {action} it; "
                        "open a pull request instead (create_commit with create_pr=True), or ask the hub's owner "
                        "for a token granted `main`")
    return grant


def require_tag_change(grant: Grant | None, repo_id: str, tag: str) -> Grant:
    if grant is not None and grant.covers(repo_id) and not grant.allows("admin"):
        raise forbidden(f"Tag {tag!r} of {repo_id} is published, and published tags are immutable: your token's "
                        f"role is '{grant.role}', and only an admin token can delete or move a tag, so that "
                        "everything citing it keeps meaning the same commit")
    return require(grant, "admin", repo_id, f"delete tag {tag!r}")


def forbidden(message: str) -> HubError:
    # huggingface_hub shows "403 Forbidden: <message>." and then a hint about token permissions.
    return HubError(403, message, "Forbidden")
