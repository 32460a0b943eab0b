"""A README.md as a card: its YAML metadata block, which the Hub serves as `cardData`, and the rest
rendered from markdown to HTML for the web view.

YAML aliases let a few hundred bytes stand for gigabytes once expanded (or for a cycle, which no
JSON can hold), so the parsed metadata is copied into plain JSON values under a budget: too
large, too deep or cyclic metadata is refused, never expanded.
"""

from __future__ import annotations

import datetime
import re

import nh3
import yaml
from markdown_it import MarkdownIt
from markdown_it.token import Token

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
MAX_METADATA_BYTES = 256 * 1024
MAX_METADATA_NODES = 20_000  # values after alias expansion
MAX_METADATA_DEPTH = 32
# Past this, a card is shown as the start of its text: markdown-it needs about a second per megabyte.
MAX_RENDERED_CARD_BYTES = 512 * 1024

# Raw HTML is parsed by markdown-it and then stripped by nh3 (the maintained sanitiser), which keeps
# only these tags and attributes; heading ids stay so that links such as `#target-quality` land.
_CARD_TAGS = nh3.ALLOWED_TAGS - {"area", "map"}
_CARD_ATTRIBUTES = {**nh3.ALLOWED_ATTRIBUTES, **{f"h{level}": {"id"} for level in range(1, 7)}}
_CARD_URL_SCHEMES = {"http", "https", "mailto"}
_SLUG_DROPPED = re.compile(r"[^\w\- ]")


class CardMetadataError(ValueError):
    pass


def card_metadata(readme: str) -> dict | None:
    """The metadata as plain JSON values; None when the README has none; CardMetadataError when it is
    broken or beyond the bounds above."""
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return None
    text = match.group(1)
    if len(text.encode("utf-8", "replace")) > MAX_METADATA_BYTES:
        raise CardMetadataError(f"The README metadata is larger than {MAX_METADATA_BYTES} bytes.")
    if _bracket_depth(text) > MAX_METADATA_DEPTH:
        # PyYAML's scanner is quadratic in flow nesting: 5000 '[' cost seconds before failing.
        raise CardMetadataError("Invalid YAML in the README metadata: nested too deeply.")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an integer past 4300 digits
        raise CardMetadataError(f"Invalid YAML in the README metadata: {str(err)[:500]}") from None
    except RecursionError:
        raise CardMetadataError("Invalid YAML in the README metadata: nested too deeply.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CardMetadataError("The README metadata must be a YAML mapping (key: value lines).")
    return _Budget().copy(data, 0)


def _bracket_depth(text: str) -> int:
    """The deepest nesting of flow collections, counting brackets inside quotes too (an upper bound)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    return deepest


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0

    def copy(self, value: object, depth: int) -> object:
        """A JSON-safe copy; dates become ISO strings, other odd scalars (binary, sets) strings."""
        self.nodes += 1
        if self.nodes > MAX_METADATA_NODES:
            raise CardMetadataError(
                f"The README metadata expands to more than {MAX_METADATA_NODES} values (YAML aliases?).")
        if depth > MAX_METADATA_DEPTH:
            raise CardMetadataError("Invalid YAML in the README metadata: nested too deeply (or a cyclic alias).")
        if isinstance(value, dict):
            return {str(key): self.copy(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list):
            return [self.copy(item, depth + 1) for item in value]
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if value == value and abs(value) != float("inf") else str(value)
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()
        return str(value)


def card_body(readme: str) -> str:
    """The README without its metadata block: what a card page shows."""
    match = _FRONT_MATTER.match(readme)
    return readme[match.end():] if match else readme


def card_html(readme: str) -> str:
    """The card's markdown as sanitised HTML: tables, links and images, headings with ids; no raw
    HTML survives but what nh3 allows (no script, style, event handler or javascript: URL)."""
    text = card_body(readme)
    if len(text.encode("utf-8", "replace")) > MAX_RENDERED_CARD_BYTES:
        text = text.encode("utf-8", "replace")[:MAX_RENDERED_CARD_BYTES].decode("utf-8", "ignore")
    markdown = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")
    tokens = markdown.parse(text)
    _add_heading_ids(tokens)
    rendered = markdown.renderer.render(tokens, markdown.options, {})
    return nh3.clean(rendered, tags=_CARD_TAGS, attributes=_CARD_ATTRIBUTES, url_schemes=_CARD_URL_SCHEMES,
                     link_rel="noopener noreferrer nofollow")


def _add_heading_ids(tokens: list[Token]) -> None:
    """GitHub's and the Hub's anchors: the heading's text in lower case, punctuation dropped, spaces as
    '-', and `-1`, `-2`... on repeats."""
    seen: dict[str, int] = {}
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children or () if child.type in ("text", "code_inline"))
        slug = _SLUG_DROPPED.sub("", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        opening.attrSet("id", f"{slug}-{count}" if count else slug)
