"""The embedded hub's web view: repo pages on the Hub's paths and a collaboration's page, read in a real
browser (headless Chromium) and over plain HTTP, and their renderers on crafted input.

The collaboration is real: a plan over the small digits source, shard 0 pushed and merged alone (v1),
then shard 1 pushed by a prior whose name carries a script and merged with it (v2).
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import dump_dom, find_chromium
from click.testing import CliRunner
from helpers_hub import Collaboration, FakePrior, start_collaboration

from coopt_hub.cli import cli
from coopt_hub.core.progress import Silent
from coopt_hub.errors import PlanError
from coopt_hub.platform.merge.commit import MergeResult
from coopt_hub.platform.merge.run import merge
from coopt_hub.server.cards import card_html
from coopt_hub.server.collaboration import MERGED, MISSING, NO_REPORT, STALE, read_collaboration, v_chart
from coopt_hub.server.collaboration import collaboration_page as render_collaboration

GOOD = FakePrior("good-net", output_dim=24, rank=18)
INJECTED_NAME = "<script>document.title='pwned'</script>evil-net"
INJECTED = FakePrior(INJECTED_NAME, output_dim=16, rank=10)


@dataclass
class Merged:
    collab: Collaboration
    commits: dict[int, str]  # shard -> its pushed commit
    versions: tuple[MergeResult, MergeResult]  # v1 (shard 0 alone), v2 (both)


@pytest.fixture(scope="module")
def merged(hub, new_collaboration, small_source) -> Merged:
    collab = new_collaboration(small_source, "web-view", shards=2, anchors=48, dim=8)
    first = collab.push(0, GOOD)
    v1 = merge(hub, collab.repo, allow_partial=True, no_evaluate=True, progress=Silent())
    second = collab.push(1, INJECTED, reference=(0, GOOD, first))
    v2 = merge(hub, collab.repo, no_evaluate=True, progress=Silent())
    return Merged(collab, {0: first, 1: second}, (v1, v2))


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip("headless Chromium is not installed here (apt-get install chromium); .ci/run installs it")
    return found


def get(url: str, token: str | None = None, accept: str = "text/html") -> tuple[int, dict[str, str], str]:
    """As a browser asks (for HTML), with a token when given."""
    headers = {"Accept": accept, **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


class _Text(HTMLParser):
    """The text a page shows (what a person reads), cell by cell; and the elements it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: set[str] = set()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.tags.add(tag)
        self.ids.update([attributes["id"]] if "id" in attributes else [])
        self.links.extend([attributes["href"]] if tag == "a" and "href" in attributes else [])
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Text:
    parser = _Text()
    parser.feed(page)
    return parser


def words(page: str) -> str:
    """The page's text, with every run of white space one space."""
    return " ".join(" ".join(parse(page).text).split())


def table_after(page: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table after the heading `heading`, as column -> text."""
    section = page.split(f"<h2>{heading}</h2>", 1)[1]
    rows = parse(section.split("</table>", 1)[0]).rows
    return [dict(zip(rows[0], row)) for row in rows[1:]]


# In a real browser ----------------------------------------------------------------------------------


def test_the_browser_shows_a_merged_collaboration_with_the_injected_prior_name_as_text(
        hub_server, merged, chromium):
    dom = dump_dom(chromium, f"{hub_server.endpoint}/datasets/{merged.collab.repo}/coopt")
    shards = {row["shard"]: row for row in table_after(dom, "Shards")}
    assert set(shards) == {"0", "1"}, shards
    plan = merged.collab.plan
    assert f"Plan {plan.plan_hash[:12]} over" in words(dom), "the plan's hash, as coopt-hub computes it"
    assert shards["0"]["prior"] == "good-net" and shards["1"]["prior"] == INJECTED_NAME, "the prior names, as text"
    for k in (0, 1):
        assert shards[str(k)]["status"] == MERGED, f"shard {k}'s status"
        assert shards[str(k)]["rows"] == f"{len(plan.shard_ids(k))} / {len(plan.shard_ids(k))}", f"shard {k}'s rows"
        assert shards[str(k)]["commit"] == merged.commits[k][:8], f"shard {k}'s commit"
    assert shards["0"]["merged in"] == "v2 v1" and shards["1"]["merged in"] == "v2", "the versions holding each"
    assert shards["0"]["aligned to"] == "itself" and shards["1"]["aligned to"] == "shard 0"
    versions = {row["version"]: row for row in table_after(dom, "Versions merged")}
    assert list(versions) == ["v2 on main", "v1"], versions
    assert (versions["v1"]["shards"], versions["v1"]["missing shards"]) == ("0", "1"), "v1 is shard 0 alone"
    assert (versions["v2 on main"]["shards"], versions["v2 on main"]["missing shards"]) == ("0, 1", "none")
    assert versions["v2 on main"]["commit"] == merged.versions[1].commit[:8]
    # Had the name's script run, the title would say so; as text it is escaped in the DOM, never an element.
    assert "<script" not in dom.lower() and "pwned" not in re.search(r"<title>(.*?)</title>", dom, re.S)[1]
    assert html.escape(INJECTED_NAME, quote=False) in dom
    assert "<svg" in dom and "shard 1 · &lt;script&gt;" in dom, "the chart of V per prior, its labels escaped"


def test_the_browser_shows_the_repo_page_with_its_card_files_and_refs(hub_server, merged, chromium):
    repo = merged.collab.repo
    dom = dump_dom(chromium, f"{hub_server.endpoint}/datasets/{repo}")
    page = parse(dom)
    text = words(dom)
    assert 'load_dataset("' + repo + '", revision="v2")' in text, "the card of v2, rendered"
    assert {"README.md", "data/", "coopt/", "targets/"} <= set(page.text), "the files on main"
    assert {"shard/0", "shard/1", "v1", "v2"} <= {t.strip() for t in page.text}, "branches and tags"
    assert {"data", "priors", "target-quality"} <= page.ids, "the card's headings carry the ids its links point to"
    assert "script" not in page.tags and "pwned" not in re.search(r"<title>(.*?)</title>", dom, re.S)[1]


# Over HTTP ------------------------------------------------------------------------------------------


def test_pages_are_served_with_safe_headers(hub_server, merged):
    for path in ("", "/coopt", "/tree/main", "/blob/main/coopt/plan.json", f"/commit/{merged.commits[0]}"):
        status, headers, _ = get(f"{hub_server.endpoint}/datasets/{merged.collab.repo}{path}")
        assert status == 200, path
        assert headers["Content-Type"] == "text/html; charset=utf-8", path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script" not in policy and "unsafe" not in policy, policy
    status, headers, page = get(f"{hub_server.endpoint}/datasets/{merged.collab.repo}/blob/main/no%3Cb%3Ehere")
    assert (status, headers["Content-Type"]) == (404, "text/html; charset=utf-8"), "a browser's 404 is a page"
    assert "no<b>here" in words(page) and "<b>" not in page and "Content-Security-Policy" in headers
    status, headers, body = get(f"{hub_server.endpoint}/datasets/{merged.collab.repo}/blob/main/nothing", accept="*/*")
    assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound") and json.loads(body)["error"], "a client's"


def test_every_link_of_the_card_and_of_the_pages_resolves(hub_server, merged):
    """The card's links (the source, the anchors), the file, tree, commit and version links: none is 404."""
    endpoint = hub_server.endpoint
    repo_url = f"{endpoint}/datasets/{merged.collab.repo}"
    seen = {}
    for page_url in (repo_url, f"{repo_url}/coopt", f"{repo_url}/tree/shard%2F1/shards/1"):
        _, _, page = get(page_url)
        parsed = parse(page)
        for link in parsed.links:
            if link.startswith("#"):
                assert link[1:] in parsed.ids, f"{page_url}: anchor {link}"
            elif link.startswith(("/", endpoint)) and link not in seen:
                seen[link] = get(link if link.startswith("http") else endpoint + link)[0]
    assert f"/datasets/{merged.collab.source}" in {link.replace(endpoint, "") for link in seen}, "the source link"
    assert {link: status for link, status in seen.items() if status != 200} == {}


def test_the_urls_hf_prints_lead_to_pages(hub_server, new_repo_id, tmp_path):
    hf = Path(sys.executable).parent / "hf"
    env = {**os.environ, **hub_server.env()}
    notes = tmp_path / "notes.txt"
    notes.write_text("about <b>this</b> repo\n")
    repo = new_repo_id("uploaded")

    def printed_url(*args: str) -> str:
        done = subprocess.run([str(hf), *args], env=env, capture_output=True, text=True, timeout=120, check=True)
        return re.search(r"url: (\S+)", done.stdout)[1]

    created = printed_url("repos", "create", repo, "--repo-type", "dataset")
    commit = printed_url("upload", repo, str(notes), "docs/notes.txt", "--repo-type", "dataset")
    assert created == f"{hub_server.endpoint}/datasets/{repo}" and "/commit/" in commit
    status, _, page = get(commit)
    assert status == 200 and "docs/notes.txt" in parse(page).text, "the commit page lists the uploaded file"
    status, _, page = get(f"{hub_server.endpoint}/datasets/{repo}/blob/main/docs/notes.txt")
    assert status == 200 and "about <b>this</b> repo\n" in parse(page).text, "the file, shown as text"
    assert get(created)[0] == 200


def test_a_pull_request_url_leads_to_its_page(hub_server, hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    info = hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id, repo_type="dataset",
                              create_pr=True, commit_message="<i>proposal</i>")
    status, _, page = get(info.pr_url)
    assert status == 200 and "#1 <i>proposal</i>" in words(page)
    status, _, page = get(f"{hub_server.endpoint}/datasets/{repo_id}")
    assert "<i>proposal</i>" in words(page) and "<i>" not in page, "listed, escaped"


def test_a_model_repo_has_its_pages_without_a_prefix(hub_server, hf_api, repo_id):
    hf_api.create_repo(repo_id)
    info = hf_api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    assert info.commit_url.startswith(f"{hub_server.endpoint}/{repo_id}/commit/")
    base = f"{hub_server.endpoint}/{repo_id}"
    for url in (base, info.commit_url, f"{base}/blob/main/config.json", f"{base}/tree/main"):
        status, _, page = get(url)
        assert status == 200 and "config.json" in parse(page).text, url


def test_private_repos_stay_invisible_without_a_token(hub_server, hub, new_repo_id, small_source):
    repo = new_repo_id("private-web")
    hub.ensure_repo(repo, private=True)
    collab = start_collaboration(hub, repo, small_source, shards=2, anchors=48, dim=8)
    base = f"{hub_server.endpoint}/datasets/{collab.repo}"
    for path in ("", "/coopt", "/tree/main", "/blob/main/coopt/plan.json", "/commits/main"):
        status, _, page = get(base + path)
        assert status == 404 and collab.repo not in page, path
        assert get(base + path, token=hub_server.token)[0] == 200, path
    assert collab.repo not in get(f"{hub_server.endpoint}/")[2], "the home page does not list it"
    assert collab.repo in get(f"{hub_server.endpoint}/", token=hub_server.token)[2]


def test_status_html_writes_the_page_the_hub_serves(hub_server, merged, tmp_path):
    written = tmp_path / "status.html"
    result = CliRunner().invoke(cli, ["status", merged.collab.repo, "--html", str(written)])
    assert result.exit_code == 0, result.output
    _, _, served = get(f"{hub_server.endpoint}/datasets/{merged.collab.repo}/coopt")
    # Links in the file are absolute (it is opened from disk); the hub's own pages link by path.
    assert written.read_text().replace(hub_server.endpoint, "") == served
    refused = CliRunner().invoke(cli, ["status", merged.collab.source, "--html", str(tmp_path / "none.html")])
    assert isinstance(refused.exception, PlanError) and "No CoOpt plan" in str(refused.exception)
    assert not (tmp_path / "none.html").exists()


# The renderers on crafted input ---------------------------------------------------------------------


def test_a_card_keeps_its_markdown_and_loses_its_raw_html():
    rendered = card_html(
        "---\nlicense: mit\n---\n# Title\n\n| a | b |\n|---|---|\n| `<b>` | [x](#usage) |\n\n## Usage\n\n"
        "<script>alert(1)</script><img src=x onerror=alert(2)><iframe src=//evil></iframe>"
        "[js](javascript:alert(3)) <a href='javascript:alert(4)'>a</a> <style>body{}</style>\n")
    page = parse(rendered)
    assert {"h1", "h2", "table", "code", "img", "a"} <= page.tags and page.ids == {"title", "usage"}
    assert not {"script", "iframe", "style"} & page.tags
    assert "onerror" not in rendered and "javascript:" not in rendered.replace("[js](javascript:alert(3))", "")
    assert "alert(1)" not in rendered and "license" not in rendered, "script bodies and the metadata are gone"
    assert "&lt;b&gt;" in rendered, "code shows markup as text"


class Documents:
    """A DocumentSource over dicts: (path, revision) -> document; a ValueError document is unreadable JSON."""

    def __init__(self, branches: dict[str, str], tags: dict[str, str], files: dict[tuple[str, str], object]):
        self.branches, self.tags, self.files = branches, tags, files

    def refs(self):
        return self.branches, self.tags

    def read_json(self, path, revision):
        document = self.files.get((path, revision))
        if isinstance(document, ValueError):
            raise document
        return document


PLAN = {"source_repo": "org/<src>", "source_revision": "a" * 40, "split": "train", "num_rows": 10, "num_shards": 4,
        "granularity": "row", "units": [], "unit_shards": [], "anchor_ids": [1, 2], "dim": 8}


def crafted(reports: dict[int, object], manifests: dict[str, dict] | None = None) -> Documents:
    branches = {"main": "m" * 40, **{f"shard/{k}": f"{k}" * 40 for k in reports}}
    files = {("coopt/plan.json", "m" * 40): PLAN}
    files.update({(f"shards/{k}/report.json", f"{k}" * 40): report for k, report in reports.items()})
    tags = {}
    for tag, manifest in (manifests or {}).items():
        tags[tag] = f"t{tag}".ljust(40, "0")
        files[("coopt/manifest.json", tags[tag])] = manifest
    return Documents(branches, tags, files)


def test_the_collaboration_page_escapes_and_survives_whatever_participants_write():
    hostile = {"participant": "<img src=x onerror=alert(1)>", "prior": {"model": "<script>alert(2)</script>"},
               "uniformity": -1.5, "residual": "0.1", "counts": {"rows": [3]}, "reference": {"shard": "<b>"},
               "alignment": {"cv_residual": float("nan")}, "plan_hash": None}
    manifests = {"<v9>": {"tag": "<v9>", "shards": [{"shard": 0, "commit": "0" * 40, "prior": "x"}], "missing": "all"}}
    collab = read_collaboration("org/<repo>", crafted({0: hostile, 1: ValueError("not JSON"), 2: [1, 2]}, manifests))
    rows = {row.shard: row for row in collab.shards}
    assert [rows[k].status for k in range(4)] == [STALE, NO_REPORT, NO_REPORT, MISSING]
    assert (rows[0].residual, rows[0].rows, rows[0].cv_residual, rows[0].aligned_to) == (None, None, None, None)
    assert [row.expected_rows for row in collab.shards] == [2, 3, 2, 3], "an even split of 10 rows"
    page = render_collaboration(collab, "", "datasets/org/x")
    parsed = parse(page)
    assert parsed.tags <= {"html", "head", "meta", "title", "style", "body", "header", "main", "a", "h1", "h2", "nav",
                           "p", "span", "strong", "div", "table", "tr", "th", "td", "svg", "line", "text", "rect"}
    for text in ("<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "<v9>", "org/<src>"):
        assert any(text in piece for piece in parsed.text), text


def test_a_shard_is_merged_only_in_the_version_main_holds_and_stale_for_another_plan():
    report = {"prior": {"model": "m", "pretrained": "laion2b"}, "uniformity": -2.0, "residual": 0.0,
              "reference": None, "counts": {"rows": 2}}
    manifest = {"tag": "v1", "shards": [{"shard": 0, "commit": "0" * 40, "rows": 2}], "missing": [1, 2, 3]}
    documents = crafted({0: report, 1: {**report, "plan_hash": "f" * 64}, 2: {**report, "uniformity": -3.0}},
                        {"v1": manifest})
    documents.files[("coopt/manifest.json", "m" * 40)] = manifest
    collab = read_collaboration("org/x", documents)
    rows = {row.shard: row for row in collab.shards}
    assert (rows[0].status, rows[0].merged_in, rows[0].prior) == (MERGED, ("v1",), "m (laion2b)")
    assert rows[1].status == STALE and rows[2].status == "done" and collab.rows_done == 4
    chart = v_chart(collab.shards)
    bars = {bar.label: bar for bar in chart.bars}
    assert [bar.best for bar in chart.bars] == [False, False, True], "the lowest V is the best"
    assert bars["shard 2 · m (laion2b)"].width > bars["shard 0 · m (laion2b)"].width > 0


def test_a_plan_that_does_not_read_is_a_value_error():
    documents = crafted({})
    documents.files[("coopt/plan.json", "m" * 40)] = {**PLAN, "num_shards": 10**9}
    with pytest.raises(ValueError, match="number of rows and of shards"):
        read_collaboration("org/x", documents)
    assert read_collaboration("org/x", Documents({"main": "m" * 40}, {}, {})) is None, "no plan: no collaboration"
