"""`coopt-hub demo`: the main job, end to end, offline, on an embedded hub."""

from __future__ import annotations

from pathlib import Path

import click

from coopt_hub.cli.options import json_option

EXAMPLES = """
\b
Examples:
  coopt-hub demo                 # about 3-5 minutes on 2 CPU cores
  coopt-hub demo --keep          # then browse the hub with `hf` or load_dataset
  coopt-hub demo --fast --json   # the short CI run, machine-readable
"""


@click.command(epilog=EXAMPLES)
@click.option("--keep", is_flag=True, help="Leave the hub running afterwards and print how to reach it.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the hub's storage and caches here (default: a temp dir).")
@click.option("--fast", is_flag=True, help="A short run (1 training epoch): checks the pipeline, not the accuracy.")
@click.option("--student", default="resnet18", show_default=True, help="timm architecture trained on the result.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs per objective.")
@json_option
def demo(keep, root, fast, student, epochs, out):
    """Run a whole CoOpt collaboration on scikit-learn's digits, offline.

    Starts an embedded hub, publishes the digits, plans 3 shards, lets 3 participants with
    different open_clip priors (one under `accelerate launch`) label and push them, merges v1 with
    its dataset card, loads it back with `load_dataset`, and trains a new architecture on it with
    CoOpt targets, unaligned targets, BYOL and labels.
    """
    from coopt_hub.demo.demo import DemoConfig, explain, run_demo

    config = DemoConfig(root=root, keep=keep, fast=fast, student=student, epochs=epochs)
    report = run_demo(config, progress=out)
    where = (
        f"\nDataset: {report.repo}@{report.tag} on the embedded hub ({report.endpoint}"
        f"{', stopped' if not keep else ''}); card: README.md of that revision; "
        f"recipe: accelerate launch recipes/train_from_hub.py --dataset {report.repo} --revision {report.tag} "
        f"--arch {student} --objective coopt"
    )
    out.result(f"{explain(report)}{where}\nTotal: {report.seconds:.0f}s",
               **report.to_dict(), explanation=explain(report))
