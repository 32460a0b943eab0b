"""The YAML metadata block at the top of a README.md, which the Hub serves as `cardData`."""

from __future__ import annotations

import re

import yaml

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


class CardMetadataError(ValueError):
    pass


def card_metadata(readme: str) -> dict | None:
    """The parsed metadata block; None when the README has none; CardMetadataError when it is broken."""
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise CardMetadataError(f"Invalid YAML in the README metadata: {err}") from None
    except RecursionError:  # a committed README like this would otherwise fail every repo info request
        raise CardMetadataError("Invalid YAML in the README metadata: nested too deeply.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CardMetadataError("The README metadata must be a YAML mapping (key: value lines).")
    return data
