"""HTML pages: the templates, the links between pages, and the headers every page is served with.

The templates live here as strings rather than as files so that they ship wherever the package
does. Jinja escapes every value (autoescape), so text from users and participants can only ever
show as text; the one exception is a card, which arrives as HTML already cleaned by nh3
(coopt_hub.server.cards). No page carries a script, and the Content-Security-Policy forbids any:
the only style allowed is the stylesheet below, by its hash.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;background:#fff}
header.top{padding:.6em 1.5em;border-bottom:1px solid #d0d7de;background:#f6f8fa}
header.top a{color:inherit;font-weight:600;text-decoration:none}
main{max-width:1280px;margin:0 auto;padding:1em 1.5em 3em}
a{color:#0969da}
h1{font-size:1.5em;margin:.4em 0}
h2{font-size:1.2em;margin:1.4em 0 .5em}
nav.tabs a{margin-right:1.2em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.9em}
pre{background:#f6f8fa;padding:.8em;overflow:auto;white-space:pre-wrap;word-break:break-word}
.badge{display:inline-block;border:1px solid #d0d7de;border-radius:1em;padding:0 .6em;font-size:.8em;color:#57606a}
.muted{color:#57606a}
.columns{display:flex;gap:2em;flex-wrap:wrap}
.columns>div{flex:1 1 250px;min-width:0}
.columns>div:first-child{flex:3 1 500px}
.wide{overflow-x:auto}
td.text{max-width:16em;overflow-wrap:anywhere}
.card{border:1px solid #d0d7de;border-radius:6px;padding:0 1.2em;margin:1em 0;overflow:auto}
.status-merged{color:#1a7f37;font-weight:600}
.status-done{color:#0969da;font-weight:600}
.status-missing,.status-stale,.status-unreadable{color:#cf222e;font-weight:600}
""".strip()
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
# No script at all (none is needed); styles only from the stylesheet above; images from the hub
# itself (a card's pictures) but never a third party, which would learn who reads which repo.
_POLICY = (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src 'self' data:; base-uri 'none'; "
           "form-action 'none'")
CONTENT_SECURITY_POLICY = f"{_POLICY}; frame-ancestors 'none'"  # frame-ancestors works only as a header
HTML_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # private repo names stay out of other sites' logs
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Links:
    """The URLs of one repo's pages, under `base`: the server's own path prefix ("" at the root of
    its address), or a Hub's address for a page written to a file."""

    base: str
    web_path: str  # "datasets/org/name", or "org/name" for a model

    @property
    def home(self) -> str:
        return f"{self.base}/"

    @property
    def repo(self) -> str:
        return f"{self.base}/{quote(self.web_path)}"

    @property
    def coopt(self) -> str:
        return f"{self.repo}/coopt"

    def tree(self, revision: str, path: str = "") -> str:
        return f"{self.repo}/tree/{quote(revision, safe='')}" + (f"/{quote(path)}" if path else "")

    def blob(self, revision: str, path: str) -> str:
        return f"{self.repo}/blob/{quote(revision, safe='')}/{quote(path)}"

    def resolve(self, revision: str, path: str) -> str:
        return f"{self.repo}/resolve/{quote(revision, safe='')}/{quote(path)}"

    def commit(self, sha: str) -> str:
        return f"{self.repo}/commit/{quote(sha, safe='')}"

    def commits(self, revision: str) -> str:
        return f"{self.repo}/commits/{quote(revision, safe='')}"

    def discussion(self, num: int) -> str:
        return f"{self.repo}/discussions/{int(num)}"


def _size(value: int | None) -> str:
    if value is None:
        return "—"
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _figure(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _date(timestamp: int | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{{ policy }}">
<title>{{ title }}</title>
<style>{{ css }}</style>
</head>
<body>
<header class="top"><a href="{{ home }}">coopt-hub</a></header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

_REPO_HEADER = """
<h1>{{ repo.type }} <a href="{{ links.repo }}">{{ repo.id }}</a>
{% if repo.private %}<span class="badge">private</span>{% endif %}</h1>
<nav class="tabs"><a href="{{ links.repo }}">Card</a><a href="{{ links.tree(revision or 'main') }}">Files</a>
<a href="{{ links.commits(revision or 'main') }}">Commits</a>
{% if repo.coopt %}<a href="{{ links.coopt }}">Collaboration</a>{% endif %}</nav>
"""

_FILES = """
<table>
<tr><th>name</th><th>size</th><th></th></tr>
{% if parent is not none %}
<tr><td><a href="{{ links.tree(revision, parent) }}">..</a></td><td></td><td></td></tr>
{% endif %}
{% for entry in entries %}
{% set name = entry.path.rsplit("/", 1)[-1] %}
<tr><td>{% if entry.type == "directory" %}<a href="{{ links.tree(revision, entry.path) }}">{{ name }}/</a>
{% else %}<a href="{{ links.blob(revision, entry.path) }}">{{ name }}</a>{% endif %}</td>
<td class="num">{{ "" if entry.type == "directory" else entry.size | size }}</td>
<td>{% if entry.lfs_oid %}<span class="badge">LFS</span>{% endif %}</td></tr>
{% endfor %}
</table>
"""

_COMMIT_LIST = """
<table>
<tr><th>commit</th><th>title</th><th>author</th><th>date</th></tr>
{% for commit in commits %}
<tr><td class="mono"><a href="{{ links.commit(commit.id) }}">{{ commit.id[:8] }}</a></td><td>{{ commit.title }}</td>
<td>{{ commit.author }}</td><td>{{ commit.timestamp | date }}</td></tr>
{% endfor %}
</table>
"""

_REFS = """
<h2>Branches</h2>
<ul>{% for ref in refs.branches %}<li><a href="{{ links.tree(ref.name) }}">{{ ref.name }}</a>
<span class="mono muted">{{ ref.target[:8] }}</span></li>{% endfor %}</ul>
<h2>Tags</h2>
{% if refs.tags %}<ul>{% for ref in refs.tags %}<li><a href="{{ links.tree(ref.name) }}">{{ ref.name }}</a>
<span class="mono muted">{{ ref.target[:8] }}</span></li>{% endfor %}</ul>
{% else %}<p class="muted">No tags.</p>{% endif %}
<h2>Pull requests</h2>
{% if pull_requests %}<ul>{% for pr in pull_requests %}<li><a href="{{ links.discussion(pr.num) }}">#{{ pr.num }}
{{ pr.title }}</a> <span class="badge">{{ pr.status }}</span> <span class="muted">by {{ pr.author }}</span></li>
{% endfor %}</ul>{% else %}<p class="muted">No pull requests.</p>{% endif %}
"""

_V_CHART = """
<svg xmlns="http://www.w3.org/2000/svg" width="{{ chart.width }}" height="{{ chart.height }}"
 viewBox="0 0 {{ chart.width }} {{ chart.height }}" role="img" aria-label="V per prior"
 font-family="system-ui,sans-serif" font-size="12">
<line x1="{{ chart.zero_x }}" y1="0" x2="{{ chart.zero_x }}" y2="{{ chart.plot_height }}" stroke="#8c959f"/>
{% for bar in chart.bars %}
<text x="{{ chart.label_right }}" y="{{ bar.y + 14 }}" text-anchor="end" fill="#1f2328">{{ bar.label }}</text>
<rect x="{{ bar.x }}" y="{{ bar.y + 4 }}" width="{{ bar.width }}" height="13"
 fill="{{ '#1a7f37' if bar.best else '#0969da' }}"/>
<text x="{{ chart.value_x }}" y="{{ bar.y + 14 }}" fill="#57606a">{{ bar.value }}</text>
{% endfor %}
</svg>
<p class="muted">V on the anchors in the common space, as each shard reported it: lower is more uniform (the lowest in
green).</p>
"""

_COLLABORATION = """{% extends "base.html" %}{% block main %}
<h1>Collaboration <a href="{{ links.repo }}">{{ collab.repo }}</a></h1>
<nav class="tabs"><a href="{{ links.repo }}">Card</a><a href="{{ links.tree('main') }}">Files</a>
<a href="{{ links.commits('main') }}">Commits</a></nav>
<p>Plan <span class="mono">{{ plan.plan_hash[:12] }}</span> over
<a href="{{ source_links.repo }}">{{ plan.source_repo }}</a> at <span class="mono">{{ plan.source_revision[:8] }}</span>
(split {{ plan.split }}): {{ plan.num_rows | count }} rows in
{{ plan.num_shards }} shards, {{ plan.anchors | count }} anchors, {{ plan.dim }} dimensions.</p>
<p><strong>{{ collab.rows_done | count }}</strong> of {{ plan.num_rows | count }} rows labeled;
{% for state, number in collab.counts %}{{ number }} {{ state }}{{ ", " if not loop.last else ". " }}{% endfor %}
{% if collab.main_tag %}Main holds <a href="{{ links.tree(collab.main_tag) }}">{{ collab.main_tag }}</a>.
{% else %}Not merged yet.{% endif %}</p>
<h2>V per prior</h2>
{% if chart is not none %}{% include "v_chart.svg" %}
{% else %}<p class="muted">No shard has reported V yet.</p>{% endif %}
<h2>Shards</h2>
<div class="wide"><table>
<tr><th>shard</th><th>commit</th><th>participant</th><th>prior</th><th>rows</th><th>V</th><th>aligned to</th>
<th>residual (in-sample)</th><th>residual (held-out)</th><th>status</th><th>merged in</th></tr>
{% for row in collab.shards %}
<tr><td><a href="{{ links.tree(row.branch) }}">{{ row.shard }}</a></td>
<td class="mono">
{% if row.commit %}<a href="{{ links.commit(row.commit) }}">{{ row.commit[:8] }}</a>{% else %}—{% endif %}</td>
<td class="text">{{ row.participant or "—" }}</td>
<td class="text">{{ row.prior or "—" }}</td>
<td class="num">{{ row.rows | count }} / {{ row.expected_rows | count }}</td>
<td class="num">{{ row.uniformity | figure }}</td><td>{{ row.aligned_to or "—" }}</td>
<td class="num">{{ row.residual | figure }}</td><td class="num">{{ row.cv_residual | figure }}</td>
<td class="status-{{ row.status.split()[0] }}">{{ row.status }}</td>
<td>{% for tag in row.merged_in %}<a href="{{ links.tree(tag) }}">{{ tag }}</a> {% else %}—{% endfor %}</td></tr>
{% endfor %}
</table></div>
<h2>Versions merged</h2>
{% if collab.versions %}
<table>
<tr><th>version</th><th>commit</th><th>shards</th><th>reference</th><th>rows</th><th>missing shards</th>
<th>verified</th></tr>
{% for version in collab.versions %}
<tr><td><a href="{{ links.tree(version.tag) }}">{{ version.tag }}</a>
{% if version.tag == collab.main_tag %} <span class="badge">on main</span>{% endif %}</td>
<td class="mono"><a href="{{ links.commit(version.commit) }}">{{ version.commit[:8] }}</a></td>
<td>{{ version.shards | join(", ") }}</td><td>{{ version.reference or "—" }}</td>
<td class="num">{{ version.rows | count }}</td>
<td>{{ version.missing | join(", ") or "none" }}</td><td>{{ "yes" if version.verified else "no" }}</td></tr>
{% endfor %}
</table>
{% else %}<p class="muted">No version merged yet (`coopt-hub merge` publishes one as a vN tag).</p>{% endif %}
{% endblock %}"""

_TEMPLATES = {
    "v_chart.svg": _V_CHART,
    "base.html": _BASE,
    "repo_header.html": _REPO_HEADER,
    "files.html": _FILES,
    "commit_list.html": _COMMIT_LIST,
    "refs.html": _REFS,
    "home.html": """{% extends "base.html" %}{% block main %}
<h1>Repositories</h1>
{% for kind, ids in repos %}<h2>{{ kind }}</h2>
{% if ids %}<ul>{% for id, url in ids %}<li><a href="{{ url }}">{{ id }}</a></li>{% endfor %}</ul>
{% else %}<p class="muted">None.</p>{% endif %}{% endfor %}
{% endblock %}""",
    "repo.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<div class="columns"><div>
{% if card is not none %}<div class="card">{{ card }}</div>
{% else %}<p class="muted">No README.md on main.</p>{% endif %}
<h2>Files on <a href="{{ links.tree(revision) }}">{{ revision }}</a></h2>{% include "files.html" %}
<h2>Latest commits</h2>{% include "commit_list.html" %}
</div><div>
{% if repo.coopt %}
<p><a href="{{ links.coopt }}">The collaboration's progress</a>: shards, priors, versions.</p>
{% endif %}
{% include "refs.html" %}
</div></div>
{% endblock %}""",
    "tree.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<p>At <strong>{{ revision }}</strong> <span class="mono muted">{{ sha[:8] }}</span>:
<a href="{{ links.tree(revision) }}">{{ repo.name }}</a>{% for name, path in crumbs %} /
<a href="{{ links.tree(revision, path) }}">{{ name }}</a>{% endfor %}</p>
{% include "files.html" %}
<p class="muted">Other revisions:
{% for ref in refs.branches + refs.tags %}<a href="{{ links.tree(ref.name) }}">{{ ref.name }}</a> {% endfor %}</p>
{% endblock %}""",
    "blob.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<p>At <strong>{{ revision }}</strong> <span class="mono muted">{{ sha[:8] }}</span>:
<a href="{{ links.tree(revision) }}">{{ repo.name }}</a>{% for name, crumb in crumbs %} /
{% if loop.last %}<strong>{{ name }}</strong>
{% else %}<a href="{{ links.tree(revision, crumb) }}">{{ name }}</a>{% endif %}
{% endfor %}</p>
<p>{{ entry.size | size }}
{% if entry.lfs_oid %} · <span class="badge">LFS</span> sha256 <span class="mono">{{ entry.lfs_oid }}</span>{% endif %}
· <a href="{{ links.resolve(revision, entry.path) }}">download</a></p>
{% if text is not none %}<pre>{{ text }}</pre>
{% else %}<p class="muted">A binary or large file: no preview.</p>{% endif %}
{% endblock %}""",
    "commit.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<h2>{{ commit.title }}</h2>
{% if commit.message %}<pre>{{ commit.message }}</pre>{% endif %}
<p><span class="mono">{{ commit.id }}</span> by <strong>{{ commit.author }}</strong>, {{ commit.timestamp | date }}.
{% if commit.parents %}Parent{{ "s" if commit.parents | length > 1 else "" }}:
{% for parent in commit.parents %}<a class="mono" href="{{ links.commit(parent) }}">{{ parent[:8] }}</a> {% endfor %}
{% endif %}<a href="{{ links.tree(commit.id) }}">Browse the files at this commit</a>.</p>
<h2>Files changed</h2>
<table><tr><th>change</th><th>file</th></tr>
{% for change in changes %}<tr><td>{{ change.kind }}</td><td>{% if change.kind == "delete" %}{{ change.path }}
{% else %}<a href="{{ links.blob(commit.id, change.path) }}">{{ change.path }}</a>{% endif %}</td></tr>{% endfor %}
</table>
{% endblock %}""",
    "commits.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<h2>Commits on {{ revision }}</h2>{% include "commit_list.html" %}
{% if more %}<p class="muted">Only the latest {{ commits | length }} commits are shown.</p>{% endif %}
{% endblock %}""",
    "discussion.html": """{% extends "base.html" %}{% block main %}{% include "repo_header.html" %}
<h2>#{{ record.num }} {{ record.title }} <span class="badge">{{ record.status }}</span></h2>
<p class="muted">{{ "Pull request" if record.isPullRequest else "Discussion" }} opened by {{ record.author }},
{{ record.createdAt }}
{% if record.base %}, onto <a href="{{ links.tree(record.base) }}">{{ record.base }}</a>{% endif %}.
{% if record.isPullRequest %}<a href="{{ links.tree('refs/pr/' ~ record.num) }}">Its files</a>.{% endif %}</p>
{% for event in events %}
<p><strong>{{ event.author }}</strong> <span class="muted">{{ event.date }}</span>: {{ event.what }}
{% if event.commit %}<a class="mono" href="{{ links.commit(event.commit) }}">{{ event.commit[:8] }}</a>{% endif %}</p>
{% if event.text %}<pre>{{ event.text }}</pre>{% endif %}
{% endfor %}
{% endblock %}""",
    "collaboration.html": _COLLABORATION,
    "error.html": """{% extends "base.html" %}{% block main %}
<h1>{{ status }}</h1><p>{{ message }}</p>
{% endblock %}""",
}

_ENVIRONMENT = Environment(loader=DictLoader(_TEMPLATES), autoescape=True, undefined=StrictUndefined,
                           trim_blocks=True, lstrip_blocks=True)
_ENVIRONMENT.filters.update(size=_size, figure=_figure, date=_date, count=_count)


def render(template: str, *, title: str, home: str, **context: object) -> str:
    """A whole page; `home` is the link of the header's home link."""
    return _ENVIRONMENT.get_template(template).render(
        title=title, home=home, css=Markup(_CSS), policy=_POLICY, **context)
