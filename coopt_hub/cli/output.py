"""One output sink: human text on stderr, or a single JSON document on stdout with --json."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


class Output:
    def __init__(self, as_json: bool = False):
        self.as_json = as_json
        if as_json:
            self.disable_progress_bars()

    @staticmethod
    def disable_progress_bars() -> None:
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["COOPT_HUB_NO_PROGRESS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "datasets" in sys.modules:
            from datasets.utils.logging import disable_progress_bar

            disable_progress_bar()

    @property
    def progress(self) -> bool:
        return not self.as_json

    def info(self, message: str) -> None:
        """Human progress text; silent in --json mode so stdout stays one JSON document."""
        if not self.as_json:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        click.secho(f"Warning: {message}", fg="yellow", err=True)

    def result(self, data: dict[str, Any], text: str | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif text is not None:
            click.echo(text)
