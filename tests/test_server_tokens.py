"""Scoped tokens (issue 13): each role through the real huggingface_hub client, each refusal a 403
that says why, tags that cannot move, and a token file that a running server re-reads."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from coopt_hub.server import HubServer
from coopt_hub.server.tokens import TokenFileError, add_token, parse_tokens


@dataclass
class Hub:
    server: HubServer
    token_file: Path
    apis: dict[str, HfApi]  # by role name: read, contribute, contribute2, write, write-main, admin, bare

    def new_repo(self, private: bool = False) -> str:
        repo = f"org/r-{uuid.uuid4().hex[:10]}"
        self.apis["admin"].create_repo(repo, repo_type="dataset", private=private)
        self.apis["admin"].upload_file(path_or_fileobj=b"base", path_in_repo="base.txt", repo_id=repo,
                                       repo_type="dataset")
        return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    folder = tmp_path_factory.mktemp("tokens")
    token_file = folder / "tokens.txt"
    token_file.write_text("# the plain token of an old setup\nplain-token\n")
    minted = {
        "read": add_token(token_file, "read", ["org/*"]),
        "contribute": add_token(token_file, "contribute", ["org/*"], user="alice"),
        "contribute2": add_token(token_file, "contribute", ["org/*"], user="bob"),
        "write": add_token(token_file, "write", ["org/*"], user="ci"),
        "write-main": add_token(token_file, "write", ["org/*"], main=True, user="maintainer"),
        "admin": add_token(token_file, "admin", user="owner"),
    }
    with HubServer(folder / "root", token_file=token_file) as server:
        apis = {role: HfApi(endpoint=server.endpoint, token=new.token) for role, new in minted.items()}
        apis["bare"] = HfApi(endpoint=server.endpoint, token="plain-token")
        yield Hub(server, token_file, apis)


def _refused(call, status: int = 403) -> str:
    with pytest.raises(HfHubHTTPError) as info:
        call()
    assert info.value.response.status_code == status, str(info.value)
    return str(info.value)


def _pr(api: HfApi, repo: str, path: str = "shard.txt", content: bytes = b"shard") -> int:
    return api.create_commit(repo, repo_type="dataset", commit_message=f"add {path}", create_pr=True,
                             operations=[CommitOperationAdd(path, content)]).pr_num


def test_the_token_file_holds_hashes_and_whoami_tells_the_role(hub):
    text = hub.token_file.read_text()
    assert "plain-token" in text  # the old line stays as it was
    for api in hub.apis.values():
        if api.token != "plain-token":
            assert api.token not in text and api.token.startswith("hub_")
    me = hub.apis["contribute"].whoami()
    assert me["name"] == "alice"
    assert me["auth"]["accessToken"] == {"displayName": "coopt-hub", "role": "contribute", "repos": ["org/*"],
                                         "main": False}
    assert hub.apis["bare"].whoami()["auth"]["accessToken"]["role"] == "write"
    assert hub.server.env()["HF_TOKEN"] == "plain-token"  # the one token the file shows in clear


def test_read_sees_covered_private_repos_and_writes_nothing(hub):
    repo = hub.new_repo(private=True)
    reader = hub.apis["read"]
    assert reader.dataset_info(repo).private is True
    assert "read" in _refused(lambda: reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo,
                                                         repo_type="dataset"))
    _refused(lambda: _pr(reader, repo))
    _refused(lambda: reader.create_discussion(repo, title="hello", repo_type="dataset"))
    _refused(lambda: reader.create_repo("org/new-by-reader", repo_type="dataset"))
    elsewhere = f"other/r-{uuid.uuid4().hex[:10]}"
    hub.apis["admin"].create_repo(elsewhere, repo_type="dataset", private=True)
    with pytest.raises(RepositoryNotFoundError):  # outside its patterns, a private repo does not exist for it
        reader.dataset_info(elsewhere)
    assert elsewhere not in [d.id for d in reader.list_datasets(author="other")]
    assert elsewhere in [d.id for d in hub.apis["admin"].list_datasets(author="other")]


def test_contribute_opens_a_pull_request_pushes_to_it_and_comments(hub, tmp_path):
    repo = hub.new_repo()
    alice, bob = hub.apis["contribute"], hub.apis["contribute2"]
    main_before = alice.dataset_info(repo).sha
    num = _pr(alice, repo, "shards/0.bin", b"\x00" * 5000)  # an LFS file: the upload is allowed too
    alice.create_commit(repo, repo_type="dataset", commit_message="fix", revision=f"refs/pr/{num}",
                        operations=[CommitOperationAdd("shards/0.txt", b"report")])
    alice.comment_discussion(repo, num, "ready", repo_type="dataset")
    bob.comment_discussion(repo, num, "looks good", repo_type="dataset")
    assert bob.create_discussion(repo, title="a question", repo_type="dataset").num == num + 1
    # What clients call before pushing: answered through huggingface_hub's 403 fallback.
    assert alice.create_repo(repo, repo_type="dataset", exist_ok=True).repo_id == repo

    message = _refused(lambda: bob.create_commit(repo, repo_type="dataset", commit_message="hijack",
                                                 revision=f"refs/pr/{num}",
                                                 operations=[CommitOperationAdd("shards/0.txt", b"bob's")]))
    assert f"#{num}" in message and "opened by alice" in message
    details = alice.get_discussion_details(repo, num, repo_type="dataset")
    assert details.author == "alice" and [e.summary for e in details.events if e.type == "commit"] == [
        "add shards/0.bin", "fix"]
    assert alice.dataset_info(repo).sha == main_before
    path = hf_hub_download(repo, "shards/0.txt", repo_type="dataset", revision=f"refs/pr/{num}",
                           endpoint=hub.server.endpoint, token=alice.token, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"report"


@pytest.mark.parametrize("attempt, words", [
    (lambda api, repo: api.create_branch(repo, branch="shard/0", repo_type="dataset"), "create branches"),
    (lambda api, repo: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo,
                                       repo_type="dataset"), "push to branch 'main'"),
    (lambda api, repo: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo,
                                       repo_type="dataset", revision="shard/1"), "push to branch 'shard/1'"),
    (lambda api, repo: api.create_tag(repo, tag="v2", repo_type="dataset"), "create tags"),
    (lambda api, repo: api.delete_tag(repo, tag="v1", repo_type="dataset"), "published tags are immutable"),
    (lambda api, repo: api.delete_repo(repo, repo_type="dataset"), "delete repos"),
    (lambda api, repo: api.update_repo_settings(repo, private=True, repo_type="dataset"), "visibility"),
    (lambda api, repo: api.merge_pull_request(repo, 1, repo_type="dataset"), "merge pull requests"),
    (lambda api, repo: api.change_discussion_status(repo, 1, "closed", repo_type="dataset"), "close or reopen"),
    (lambda api, repo: api.create_repo("org/by-a-contributor", repo_type="dataset"), "create repos"),
])
def test_contribute_cannot_touch_branches_tags_or_repos(hub, attempt, words):
    repo = hub.new_repo()
    admin = hub.apis["admin"]
    admin.create_branch(repo, branch="shard/1", repo_type="dataset")
    admin.create_tag(repo, tag="v1", repo_type="dataset")
    _pr(hub.apis["contribute"], repo)
    before = admin.list_repo_refs(repo, repo_type="dataset", include_pull_requests=True)
    message = _refused(lambda: attempt(hub.apis["contribute"], repo))
    assert words in message and "contribute" in message
    assert admin.list_repo_refs(repo, repo_type="dataset", include_pull_requests=True) == before
    assert admin.dataset_info(repo).private is False
    assert admin.get_discussion_details(repo, 1, repo_type="dataset").status == "open"


def test_write_works_on_branches_and_tags_but_main_is_protected(hub):
    repo = hub.new_repo()
    writer = hub.apis["write"]
    writer.create_branch(repo, branch="shard/0", repo_type="dataset")
    writer.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id=repo, repo_type="dataset",
                       revision="shard/0")
    writer.create_tag(repo, tag="shard-0", revision="shard/0", repo_type="dataset")
    num = _pr(hub.apis["contribute"], repo)
    writer.create_commit(repo, repo_type="dataset", commit_message="a writer may push to any pull request",
                         revision=f"refs/pr/{num}", operations=[CommitOperationAdd("w.txt", b"w")])
    writer.comment_discussion(repo, num, "thanks", repo_type="dataset")

    main = writer.dataset_info(repo).sha
    assert "'main' of " + repo + " is protected" in _refused(
        lambda: writer.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo, repo_type="dataset"))
    assert "protected" in _refused(lambda: writer.merge_pull_request(repo, num, repo_type="dataset"))
    assert "immutable" in _refused(lambda: writer.delete_tag(repo, tag="shard-0", repo_type="dataset"))
    _refused(lambda: writer.delete_repo(repo, repo_type="dataset"))
    _refused(lambda: writer.update_repo_settings(repo, private=True, repo_type="dataset"))
    assert "covers org/*, not other/" in _refused(lambda: writer.create_repo("other/x", repo_type="dataset"))
    assert writer.dataset_info(repo).sha == main

    onto_branch = writer.create_commit(repo, repo_type="dataset", commit_message="into a branch", create_pr=True,
                                       revision="shard/0", operations=[CommitOperationAdd("b.txt", b"b")]).pr_num
    writer.merge_pull_request(repo, onto_branch, repo_type="dataset")
    assert "b.txt" in writer.list_repo_files(repo, repo_type="dataset", revision="shard/0")


def test_write_granted_main_and_the_bare_token_change_main(hub):
    repo = hub.new_repo()
    num = _pr(hub.apis["contribute"], repo)
    hub.apis["write-main"].merge_pull_request(repo, num, repo_type="dataset")
    hub.apis["write-main"].upload_file(path_or_fileobj=b"m", path_in_repo="m.txt", repo_id=repo, repo_type="dataset")
    bare = hub.apis["bare"]
    bare.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=repo, repo_type="dataset")
    assert {"shard.txt", "m.txt", "b.txt"} <= set(bare.list_repo_files(repo, repo_type="dataset"))
    elsewhere = f"anywhere/r-{uuid.uuid4().hex[:10]}"
    bare.create_repo(elsewhere, repo_type="dataset")  # a bare token covers every repo, as before roles
    bare.create_tag(elsewhere, tag="v1", repo_type="dataset")
    assert "immutable" in _refused(lambda: bare.delete_tag(elsewhere, tag="v1", repo_type="dataset"))
    _refused(lambda: bare.delete_repo(elsewhere, repo_type="dataset"))


def test_only_admin_moves_tags_deletes_repos_and_changes_visibility(hub):
    repo = hub.new_repo()
    admin = hub.apis["admin"]
    first = admin.dataset_info(repo).sha
    admin.create_tag(repo, tag="v1", repo_type="dataset")
    second = admin.upload_file(path_or_fileobj=b"2", path_in_repo="2.txt", repo_id=repo, repo_type="dataset").oid
    assert "409" in _refused(lambda: admin.create_tag(repo, tag="v1", repo_type="dataset"), 409)
    admin.delete_tag(repo, tag="v1", repo_type="dataset")
    admin.create_tag(repo, tag="v1", revision=second, repo_type="dataset")
    assert admin.dataset_info(repo, revision="v1").sha == second != first
    with pytest.raises(RevisionNotFoundError):
        admin.delete_tag(repo, tag="never-made", repo_type="dataset")
    admin.update_repo_settings(repo, private=True, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.server.endpoint, token=False).dataset_info(repo)
    admin.delete_repo(repo, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        admin.dataset_info(repo)


def test_rewriting_history_moving_repos_and_others_comments_need_their_roles(hub):
    repo = hub.new_repo()
    writer, alice, bob = hub.apis["write"], hub.apis["contribute"], hub.apis["contribute2"]
    assert "protected" in _refused(lambda: writer.super_squash_history(repo, repo_type="dataset"))
    writer.create_branch(repo, branch="scratch", repo_type="dataset")
    writer.super_squash_history(repo, branch="scratch", repo_type="dataset")
    assert "move repos" in _refused(lambda: writer.move_repo(repo, f"{repo}-2", repo_type="dataset"))

    num = _pr(alice, repo)
    alice.comment_discussion(repo, num, "mine", repo_type="dataset")
    [first, *_] = [e for e in alice.get_discussion_details(repo, num, repo_type="dataset").events
                   if e.type == "comment" and e.author == "alice"]
    assert "only its author" in _refused(lambda: bob.edit_discussion_comment(repo, num, first.id, "bob was here",
                                                                             repo_type="dataset"))
    assert alice.edit_discussion_comment(repo, num, first.id, "mine, edited", repo_type="dataset").edited
    hub.apis["write"].edit_discussion_comment(repo, num, first.id, "moderated", repo_type="dataset")


def test_a_branch_cannot_shadow_a_tag_nor_a_tag_a_branch(hub):
    repo = hub.new_repo()
    writer = hub.apis["write"]
    writer.create_tag(repo, tag="v1", repo_type="dataset")
    writer.create_branch(repo, branch="shard/2", repo_type="dataset")
    assert "tag 'v1'" in _refused(lambda: writer.create_branch(repo, branch="v1", repo_type="dataset"), 409)
    assert "branch 'shard/2'" in _refused(lambda: writer.create_tag(repo, tag="shard/2", repo_type="dataset"), 409)


def test_tokens_added_or_removed_apply_without_a_restart(hub, caplog):
    repo = hub.new_repo()
    new = add_token(hub.token_file, "contribute", [repo])
    assert new.user.startswith("token-") and new.token not in hub.token_file.read_text()
    late = HfApi(endpoint=hub.server.endpoint, token=new.token)
    assert late.whoami()["name"] == new.user
    assert _pr(late, repo) == 1
    assert "covers" in _refused(lambda: _pr(late, hub.new_repo()))  # only the repo it was made for

    hub.token_file.write_text(hub.token_file.read_text() + "broken-line nosuchrole\n")
    with caplog.at_level(logging.WARNING, logger="coopt_hub.server"):
        assert late.whoami()["name"] == new.user  # a broken file keeps the tokens read before
    assert "line" in caplog.text and "nosuchrole" in caplog.text and new.token not in caplog.text

    kept = [line for line in hub.token_file.read_text().splitlines()
            if new.line not in line and "nosuchrole" not in line]
    hub.token_file.write_text("\n".join(kept) + "\n")
    _refused(late.whoami, 401)
    assert "Invalid credentials" in _refused(lambda: _pr(late, repo), 401)
    assert hub.apis["admin"].whoami()["name"] == "owner"


def test_a_server_without_tokens_makes_one_admin_token_and_mints_more(tmp_path):
    with HubServer(tmp_path / "root") as server:
        owner = HfApi(endpoint=server.endpoint, token=server.token)
        assert owner.whoami()["auth"]["accessToken"]["role"] == "admin"
        owner.create_repo("org/x", repo_type="dataset")
        contributor = HfApi(endpoint=server.endpoint, token=server.new_token("contribute", ["org/x"]))
        assert _pr(contributor, "org/x") == 1
        _refused(lambda: contributor.create_branch("org/x", branch="b", repo_type="dataset"))
        with pytest.raises(TokenFileError, match="unknown role"):
            server.new_token("superuser")


@pytest.mark.parametrize("line, error", [
    ("t superuser", "unknown role 'superuser'"),
    ("t write org", "must look like namespace/name"),
    ("t admin main", "'main' is for the write role"),
    ("t read user=a user=b", "more than one user="),
    ("t contribute org/* user=<alice>", "Invalid user name"),
    ("sha256:abc read", "64 lowercase hex digits"),
])
def test_token_file_errors_name_the_line(line, error):
    with pytest.raises(TokenFileError, match=error) as info:
        parse_tokens(f"# header\n\nok-token\n{line}\n", "tokens.txt")
    assert "tokens.txt, line 4" in str(info.value)


def test_token_lines_default_to_a_user_of_their_own():
    plain, scoped, named = parse_tokens("plain\nsecret write org/* main\nother read user=carol\n")
    assert (plain.grant.user, plain.grant.role, plain.grant.repos, plain.grant.main) == ("coopt", "write", (), True)
    assert scoped.grant.user.startswith("token-") and scoped.grant.repos == ("org/*",) and scoped.grant.main
    assert (named.grant.user, named.grant.role, named.token) == ("carol", "read", "other")


def test_add_token_refuses_to_extend_a_broken_file(tmp_path):
    token_file = tmp_path / "tokens.txt"
    added = add_token(token_file, "write", ["org/*"], main=True)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert parse_tokens(token_file.read_text())[0].grant.main
    assert added.line in token_file.read_text()
    token_file.write_text(token_file.read_text() + "t nosuchrole\n")
    with pytest.raises(TokenFileError, match="line 3"):
        add_token(token_file, "read")
