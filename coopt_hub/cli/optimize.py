"""`coopt-hub optimize`: label a shard with a prior, align it, optionally push it.

This module is the launcher side: the only place that reads accelerate's state. The library gets
the rank, the world size and a few collective operations through a `Collective`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from coopt_hub.cli.options import (
    batch_size_option,
    compile_option,
    device_option,
    json_option,
    precision_option,
    prior_options,
    repo_argument,
    shard_option,
    token_option,
    workdir_option,
)
from coopt_hub.cli.push import create_pr_option

T = TypeVar("T")

EXAMPLES = """
\b
Examples:
  coopt-hub optimize --shard 3 --push                      # repo and prior from `coopt-hub join`
  coopt-hub optimize org/digits-coopt --shard 0 --model ViT-B-32 --pretrained openai
  accelerate launch --multi_gpu --num_processes 8 -m coopt_hub optimize --shard 3 --push --precision bf16
  # N processes on a machine without GPUs (--cpu would start one):
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
      -m coopt_hub optimize --shard 3 --push
  coopt-hub push --shard 3                                 # send a result made without --push
"""

# A rank that finished its chunks waits for the slowest one (e.g. one resuming a larger remainder);
# the usual 30-minute collective timeout would kill a healthy job.
COLLECTIVE_TIMEOUT = timedelta(days=7)


class AccelerateCollective:
    """Collective operations over the process group `accelerate launch` set up (NCCL or gloo)."""

    def __init__(self, state: Any):
        self.state = state
        self.rank = state.process_index
        self.world_size = state.num_processes

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def all_gather(self, value: T) -> list[T]:
        from accelerate.utils import gather_object

        return gather_object([value])

    def broadcast(self, value: T | None, src: int) -> T:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=src)[0]


def _launch_state(device: str | None) -> tuple[Any, str]:
    """(collective, device) of this process, from accelerate's launcher environment if any."""
    import torch
    from accelerate import PartialState

    from coopt_hub.participant.collective import SingleProcess

    use_cpu = (
        (device or "").startswith("cpu")
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in {"1", "true", "yes"}
        or not torch.cuda.is_available()
    )
    # Without cpu=True, accelerate ignores a multi-process CPU launch and runs each process alone.
    state = PartialState(cpu=use_cpu, timeout=COLLECTIVE_TIMEOUT)
    collective = AccelerateCollective(state) if state.num_processes > 1 else SingleProcess()
    if device in (None, "cuda") and state.device.type == "cuda":
        # A bare "cuda" means this process's GPU (cuda:LOCAL_RANK), not GPU 0 for every process.
        return collective, str(state.device)
    return collective, device or str(state.device)


@click.command(epilog=EXAMPLES)
@repo_argument()
@shard_option("The shard k to label.")
@prior_options
@click.option("--push", is_flag=True, help="Commit the result to branch shard/{k} (one commit), or to a pull request "
              "when the token may not push branches.")
@create_pr_option
@click.option("--overwrite", is_flag=True, help="Replace a shard/{k} result made with another prior.")
@batch_size_option
@click.option("--workers", type=click.IntRange(min=1), default=4, show_default=True,
              help="Threads decoding and preprocessing ahead of the forward pass.")
@precision_option
@compile_option
@device_option()
@click.option("--on-bad-image", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="Undecodable images: stop with their ids, or leave them out and record their ids.")
@workdir_option("Where chunks and results are kept; a rerun continues from what is there.")
@token_option
@json_option
def optimize(repo, shard, model, pretrained, checkpoint, image_size, push, create_pr, overwrite, batch_size, workers,
             precision, compile_prior, device, on_bad_image, workdir, token, out):
    """Label shard K of REPO with a prior model, judge it on the anchors, align it to the best prior.

    Resumable: rerun the same command after an interruption and only unfinished chunks are computed.
    Runs as one process or under `accelerate launch` (every process labels its part; rank 0 writes).
    """
    from coopt_hub.errors import CoOptError
    from coopt_hub.hub.client import Hub
    from coopt_hub.participant.config import load_config, resolve_prior
    from coopt_hub.participant.job import OptimizeOptions, load_job_prior, optimize_shard
    from coopt_hub.participant.push import publish_result, published_at

    config = load_config()
    spec = resolve_prior(model, pretrained, checkpoint, image_size, config)
    collective, device = _launch_state(device)
    # A pull request replaces nobody's branch, so the job's branch checks are not for it: it is opened here.
    options = OptimizeOptions(batch_size=batch_size, workers=workers, on_bad_image=on_bad_image,
                              push=push and not create_pr, overwrite=overwrite,
                              participant=config.name if config else None)
    hub = Hub(token=token)
    try:
        result = optimize_shard(
            hub, repo, shard, lambda: load_job_prior(spec, device, precision, compile_prior),
            workdir=workdir, options=options, collective=collective, progress=out,
        )
        if result is not None and create_pr:
            result.commit, result.pushed = publish_result(hub, repo, shard, result.directory, progress=out,
                                                          create_pr=True)
    except CoOptError as err:
        if collective.rank == 0:
            raise
        # Every rank fails with the same error and rank 0 reports it: one message per job, not per process.
        raise click.exceptions.Exit(err.exit_code) from err
    if result is not None:
        where = published_at(hub, repo, shard, result.commit) if result.commit else None
        out.result(_summary(result, where, workdir), published_at=where, **result.to_dict())


def _summary(result, where: str | None, workdir: Path) -> str:
    repo, shard, report = result.repo, result.shard, result.report
    reference = report["reference"]
    aligned = "its own reference" if reference is None else f"aligned to shard {reference['shard']}"
    lines = [
        f"Shard {shard} of {repo}: {report['counts']['rows']} rows labeled with {report['prior']['model']} "
        f"(V = {report['uniformity']:.4f}, {aligned}, residual {report['residual']:.4f}).",
        f"Files: {result.directory}",
    ]
    if where is not None:
        lines.append(f"{'Pushed' if result.pushed else 'Already there'}: {where} @ {result.commit}")
    else:
        lines.append(f"Not pushed. Send it with: coopt-hub push {repo} --shard {shard} --workdir {workdir}")
    return "\n".join(lines)
