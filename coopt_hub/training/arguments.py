"""Command-line options of the training recipes, defined once for every script that trains."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coopt_hub.core.progress import LogProgress, Progress, Silent
from coopt_hub.errors import describe_error
from coopt_hub.priors.weights import WEIGHTS_ENDPOINT_ENV, use_weights_endpoint
from coopt_hub.training.data import TARGET_KINDS, TrainingData, load_training_data
from coopt_hub.training.objectives import MOMENTUM_SCHEDULES, OBJECTIVES, ByolConfig
from coopt_hub.training.probe import ProbeConfig
from coopt_hub.training.trainer import PRECISIONS, TrainConfig, make_accelerator

DEFAULTS = TrainConfig(epochs=1)  # read for its defaults only; the run length is the user's


def _model_kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="merged CoOpt dataset repo, e.g. org/digits-coopt")
    parser.add_argument("--revision", default=None, help="tag, branch or commit of the merge (e.g. v1)")
    parser.add_argument("--image-size", type=int, default=32, help="images are decoded once at this size")
    parser.add_argument("--train-split", default=None,
                        help="the split to train on; only the plan's split has targets (default: the plan's split)")
    parser.add_argument("--eval-split", default=None,
                        help="the labeled split the linear probe is scored on, never the training split "
                        "(default: test, else validation, else valid)")


def add_training_arguments(parser: argparse.ArgumentParser, *, objective: bool = True) -> None:
    """Options shared by the recipes; `objective=False` leaves out the ones a comparison varies."""
    if objective:
        parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULTS.objective)
        parser.add_argument("--targets", choices=TARGET_KINDS, default=DEFAULTS.targets,
                            help="coopt only: aligned targets, or the raw (unaligned) ones")
    parser.add_argument("--arch", default=DEFAULTS.arch, help="any timm architecture name")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop after this many seconds of training (probe and checkpoints excluded)")
    parser.add_argument("--max-steps", type=int, default=None, metavar="STEPS",
                        help="stop after this many optimiser steps (e.g. a short check of a long recipe)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision)
    parser.add_argument("--eval-points", type=int, default=DEFAULTS.eval_points,
                        help="linear-probe evaluations spread over the run (time-to-accuracy)")
    parser.add_argument("--probe-epochs", type=int, default=ProbeConfig().epochs)
    parser.add_argument("--output", default=None, metavar="DIR", help="checkpoint directory")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="default: at the end of every epoch")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="small-image stem (default: on at 64 px and below)")
    parser.add_argument("--pretrained", action="store_true",
                        help="start from timm's published weights for --arch (ARCH or ARCH.TAG), downloaded from "
                        "the weights endpoint, not from HF_ENDPOINT")
    parser.add_argument("--weights-endpoint", default=os.environ.get(WEIGHTS_ENDPOINT_ENV), metavar="URL",
                        help=f"the hub --pretrained weights come from (default: {WEIGHTS_ENDPOINT_ENV}, else "
                        "huggingface.co), e.g. a mirror or an embedded hub filled by `coopt-hub hub import-model`")
    parser.add_argument("--model-kwarg", type=_model_kwarg, action="append", default=[], metavar="KEY=VALUE",
                        help="passed to timm.create_model, e.g. --model-kwarg patch_size=4 (repeatable)")
    byol = ByolConfig()
    parser.add_argument("--byol-hidden-dim", type=int, default=byol.hidden_dim,
                        help="BYOL's MLP hidden width (default: 2x the backbone's feature width, as ReLA; BYOL: 4096)")
    parser.add_argument("--byol-projection-dim", type=int, default=byol.projection_dim,
                        help=f"BYOL's projection and prediction width (default: {byol.projection_dim}, as ReLA and BYOL)")
    parser.add_argument("--byol-momentum", type=float, default=byol.base_momentum,
                        help=f"the target network's (base) momentum (default: {byol.base_momentum}, as ReLA; BYOL: 0.996)")
    parser.add_argument("--byol-momentum-schedule", choices=MOMENTUM_SCHEDULES, default=byol.momentum_schedule,
                        help="constant (ReLA, the default), or cosine from the base momentum to 1 (BYOL)")


def config_from_arguments(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values = dict(
        arch=args.arch,
        epochs=args.epochs,
        time_budget=args.time_budget,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        precision=args.precision,
        eval_points=args.eval_points,
        output_dir=args.output,
        checkpoint_every=args.checkpoint_every,
        resume=getattr(args, "resume", False),
        small_stem=args.small_stem,
        pretrained=args.pretrained,
        model_kwargs=dict(args.model_kwarg),
        probe=ProbeConfig(epochs=args.probe_epochs),
        byol=ByolConfig(hidden_dim=args.byol_hidden_dim, projection_dim=args.byol_projection_dim,
                        base_momentum=args.byol_momentum, momentum_schedule=args.byol_momentum_schedule),
    )
    if hasattr(args, "objective"):
        values.update(objective=args.objective, targets=args.targets)
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class RecipeRun:
    """What a recipe trains with: the run's settings, the accelerator, the data, and where progress goes."""

    config: TrainConfig
    accelerator: Any
    data: TrainingData
    progress: Progress  # notes and bars on the main process's terminal; the other processes stay silent


def prepare_run(args: argparse.Namespace, **overrides: Any) -> RecipeRun:
    """The recipe's run (`overrides`: TrainConfig fields the recipe sets itself): the dataset is read once
    per machine, progress reported by the main process only."""
    if args.weights_endpoint:
        use_weights_endpoint(args.weights_endpoint)
    config = config_from_arguments(args, **overrides)
    accelerator = make_accelerator(config.precision)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if accelerator.is_main_process:  # progress from this library only, not every HTTP request
        logging.getLogger("coopt_hub").setLevel(logging.INFO)
    progress = LogProgress() if accelerator.is_main_process else Silent()
    with accelerator.main_process_first():  # one process fills the download caches, the rest reuse them
        data = load_training_data(args.dataset, args.revision, image_size=args.image_size, progress=progress,
                                  train_split=args.train_split, eval_split=args.eval_split,
                                  need_eval=config.eval_points > 0)
    return RecipeRun(config, accelerator, data, progress)


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a job stopped with Ctrl-C, as `coopt-hub` does


def run_recipe(body: Callable[[], int], interrupted: str = "Interrupted.") -> int:
    """Run a recipe's body; any error becomes the CLI's message and next step through the one error
    table (traceback with COOPT_HUB_DEBUG=1), so recipes and `coopt-hub` commands fail alike.
    Ctrl-C prints `interrupted` (what is kept, how to continue) and exits with 130."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - the recipe's one exit point for errors
        if os.environ.get("COOPT_HUB_DEBUG", "").lower() in {"1", "true", "yes"}:
            raise
        code, message, hint = describe_error(err)
        print(f"Error: {message}", file=sys.stderr)
        if hint:
            print(f"Next step: {hint}", file=sys.stderr)
        return code
