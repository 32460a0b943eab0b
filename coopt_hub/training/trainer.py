"""The training loop shared by every objective: AdamW, two views per sample, probe evaluations.

Run length is a number of epochs, a wall-clock budget in seconds, or both (whichever ends first).
"seconds" everywhere means training time: probe evaluations and checkpoint writes are excluded,
so time-to-accuracy and samples/s measure the objective, not the bookkeeping.

Randomness is keyed, not streamed: the sample order of epoch e comes from a generator seeded with
(seed, e), and the augmentations of step s on rank r from (seed, s, r). A resumed run therefore
replays exactly the batches and views of an uninterrupted one.

The accelerator (multi-process, device, mixed precision) is passed in by the launcher; without one
a single-process Accelerator is made here. Each process takes its slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coopt_hub.errors import ConfigError
from coopt_hub.training.augment import AugmentConfig, two_views
from coopt_hub.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from coopt_hub.training.data import TARGET_KINDS, TrainingData
from coopt_hub.training.models import BackboneConfig, build_backbone
from coopt_hub.training.objectives import OBJECTIVES, ByolConfig, Objective, build_objective
from coopt_hub.training.probe import ProbeConfig, evaluate_probe

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet18"
    objective: str = "coopt"
    targets: str = "aligned"  # which targets the coopt objective trains on: aligned | raw
    epochs: int | None = None
    time_budget: float | None = None  # seconds of training
    batch_size: int = 128  # per process
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, fp32 elsewhere
    eval_points: int = 4  # probe evaluations spread evenly over the run, the last one at its end
    output_dir: str | None = None  # checkpoints go here; None: no checkpoints
    checkpoint_every: int | None = None  # in steps; None: at the end of every epoch
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 50  # steps between progress log lines
    small_stem: bool | None = None  # see BackboneConfig
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}", hint=f"Choose one of {', '.join(OBJECTIVES)}.")
        if self.targets not in TARGET_KINDS:
            raise ConfigError(f"unknown targets {self.targets!r}", hint=f"Choose one of {', '.join(TARGET_KINDS)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", hint=f"Choose one of {', '.join(PRECISIONS)}.")
        if self.epochs is None and self.time_budget is None:
            raise ConfigError("no run length given", hint="Pass --epochs E or --time-budget SECONDS (or both).")
        if (self.epochs is not None and self.epochs <= 0) or (self.time_budget is not None and self.time_budget <= 0):
            raise ConfigError("--epochs and --time-budget must be positive", hint="Pass a positive number.")
        if self.resume and not self.output_dir:
            raise ConfigError("--resume needs the --output directory of the run to continue", hint="Pass --output DIR.")

    def run_identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (not the run length)."""
        fixed = ("arch", "objective", "targets", "batch_size", "lr", "weight_decay", "seed", "small_stem",
                 "pretrained", "model_kwargs")
        return {name: getattr(self, name) for name in fixed} | {
            "augment": dataclasses.asdict(self.augment),
            "byol": dataclasses.asdict(self.byol),
        }


@dataclass(frozen=True)
class EvalPoint:
    step: int
    epoch: float
    seconds: float  # training seconds when evaluated
    samples: int
    accuracy: float


@dataclass
class TrainResult:
    objective: str
    targets: str | None  # aligned/raw for coopt, None for the others
    arch: str
    steps: int
    epochs: float
    seconds: float
    samples: int
    samples_per_s: float
    accuracy: float | None  # the last probe evaluation
    evals: list[EvalPoint]
    epoch_losses: list[float]  # mean training loss of each (complete or final partial) epoch
    checkpoint: str | None

    def time_to_accuracy(self, threshold: float) -> float | None:
        """Training seconds at the first evaluation reaching `threshold`, or None."""
        return next((p.seconds for p in self.evals if p.accuracy >= threshold), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_accelerator(precision: str = "auto"):
    """A single- or multi-process Accelerator (as launched) with the mixed precision resolved."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if mixed != "no" and not cuda:
        raise ConfigError(f"{precision} autocast needs a GPU here", hint="Use --precision fp32 (or auto) on CPU.")
    return Accelerator(mixed_precision=mixed, cpu=not cuda)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, epoch)))


def _key(*parts: int) -> int:
    # SeedSequence mixes the parts, so neighbouring (seed, step) pairs give unrelated streams.
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class _Clock:
    """Training seconds: runs only between resume() and pause()."""

    def __init__(self, seconds: float, device: torch.device):
        self.total = seconds
        self.device = device
        self.started: float | None = None

    def resume(self) -> None:
        self.started = time.perf_counter()

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued kernels belong to the training time
        self.total += time.perf_counter() - self.started
        self.started = None

    def now(self) -> float:
        return self.total + (time.perf_counter() - self.started if self.started is not None else 0.0)


def train(config: TrainConfig, data: TrainingData, accelerator=None) -> TrainResult:
    """Train `config.arch` with `config.objective` on `data`; probe, checkpoint and report."""
    accelerator = accelerator or make_accelerator(config.precision)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    coopt_targets = data.targets.get(config.targets) if config.objective == "coopt" else None
    if config.objective == "coopt" and coopt_targets is None:
        raise ConfigError(
            f"this dataset has no {config.targets!r} targets (it has {sorted(data.targets)})",
            hint="Use --targets aligned, or a merge that kept the raw targets.",
        )
    global_batch = config.batch_size * world
    steps_per_epoch = len(data) // global_batch  # drop the last partial batch: BN wants full batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(data)} training rows cannot fill one batch of {config.batch_size} x {world} process(es)",
            hint="Lower --batch-size.",
        )
    total_steps = config.epochs * steps_per_epoch if config.epochs is not None else None
    can_probe = config.eval_points > 0 and data.labels is not None and data.num_classes is not None

    torch.manual_seed(config.seed)
    backbone, width = build_backbone(
        BackboneConfig(config.arch, data.image_size, config.small_stem, config.pretrained, config.model_kwargs)
    )
    objective = build_objective(
        config.objective, backbone, width, targets=coopt_targets, num_classes=data.num_classes, byol=config.byol
    ).to(device)
    cuda = device.type == "cuda"
    if cuda:
        # Inputs have one fixed shape, so cuDNN's autotuning pays off; channels-last is the layout
        # its mixed-precision convolution kernels are fastest in.
        torch.backends.cudnn.benchmark = True
        objective.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    loop: dict[str, Any] = {"step": 0, "seconds": 0.0, "epoch_losses": [], "evals": [], "loss_sum": 0.0, "loss_count": 0}
    output = Path(config.output_dir) if config.output_dir else None
    if config.resume:
        if found := list_checkpoints(output):
            loop = load_checkpoint(found[-1], objective, optimizer, config.run_identity())
            logger.info("resumed from %s at step %d", found[-1], loop["step"])
        else:
            logger.info("no checkpoint in %s yet; starting at step 0", output)
    model, optimizer = accelerator.prepare(objective, optimizer)
    unwrapped: Objective = accelerator.unwrap_model(model)

    images = data.images.to(device)
    targets = coopt_targets.to(device) if coopt_targets is not None else None
    labels = data.labels.to(device) if data.labels is not None else None
    step = loop["step"]
    clock = _Clock(loop["seconds"], device)
    loss_sum = torch.tensor(loop["loss_sum"], device=device)
    loss_count = loop["loss_count"]
    evals = [EvalPoint(**p) for p in loop["evals"]]
    epoch_losses: list[float] = list(loop["epoch_losses"])
    checkpoint_every = config.checkpoint_every or steps_per_epoch
    last_checkpoint: Path | None = None

    def progress() -> float:
        by_steps = step / total_steps if total_steps else 0.0
        by_time = clock.now() / config.time_budget if config.time_budget else 0.0
        return max(by_steps, by_time)

    def evaluate() -> None:
        if accelerator.is_main_process:
            with accelerator.autocast():
                accuracy = evaluate_probe(
                    unwrapped.backbone, data, device=device, config=config.probe, augment=config.augment, seed=config.seed
                )
            point = EvalPoint(step, step / steps_per_epoch, clock.total, step * global_batch, accuracy)
            evals.append(point)
            logger.info("eval step %d epoch %.2f: probe accuracy %.4f at %.1f s", step, point.epoch, accuracy, point.seconds)
        accelerator.wait_for_everyone()

    def save() -> Path | None:
        state = {"step": step, "seconds": clock.total, "epoch_losses": epoch_losses,
                 "evals": [dataclasses.asdict(p) for p in evals], "loss_sum": float(loss_sum), "loss_count": loss_count}
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(output, step, unwrapped, optimizer, state, config.run_identity(), config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    def finished() -> bool:
        return (total_steps is not None and step >= total_steps) or (
            config.time_budget is not None and clock.now() >= config.time_budget
        )

    order: torch.Tensor | None = None
    order_epoch = -1
    model.train()
    clock.resume()
    log_start, log_step = clock.now(), step
    while not finished():
        epoch, within = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(config.seed, epoch, len(data)).to(device), epoch
        start = within * global_batch + rank * config.batch_size
        rows = order[start : start + config.batch_size]
        views = two_views(images[rows], torch.Generator().manual_seed(_key(config.seed, step, rank)), config.augment)
        if cuda:
            views = views.contiguous(memory_format=torch.channels_last)
        loss = model(views, targets[rows] if targets is not None else None, labels[rows] if labels is not None else None)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        unwrapped.after_step(progress())
        loss_sum += loss.detach().float()
        loss_count += 1
        if step % steps_per_epoch == 0:
            epoch_losses.append(float(loss_sum) / loss_count)
            loss_sum.zero_()
            loss_count = 0
        if accelerator.is_main_process and step % config.log_every == 0:
            rate = (step - log_step) * global_batch / max(clock.now() - log_start, 1e-9)
            logger.info("step %d epoch %.2f loss %.4f %.0f samples/s", step, step / steps_per_epoch, loss.item(), rate)
            log_start, log_step = clock.now(), step
        due_eval = can_probe and len(evals) < config.eval_points and progress() >= (len(evals) + 1) / config.eval_points
        due_checkpoint = output is not None and step % checkpoint_every == 0
        if due_eval or due_checkpoint:
            clock.pause()
            if due_eval and not finished():  # the final evaluation happens once, after the loop
                evaluate()
            if due_checkpoint and not finished():
                last_checkpoint = save()
            clock.resume()
    clock.pause()
    if can_probe and (not evals or evals[-1].step != step):
        evaluate()
    if output is not None:
        last_checkpoint = save()  # keeps a partial epoch's running loss, so a resume completes it
    if loss_count:
        epoch_losses.append(float(loss_sum) / loss_count)
    accelerator.free_memory()

    samples = step * global_batch
    return TrainResult(
        objective=config.objective,
        targets=config.targets if config.objective == "coopt" else None,
        arch=config.arch,
        steps=step,
        epochs=step / steps_per_epoch,
        seconds=clock.total,
        samples=samples,
        samples_per_s=samples / clock.total if clock.total > 0 else 0.0,
        accuracy=evals[-1].accuracy if evals else None,
        evals=evals,
        epoch_losses=epoch_losses,
        checkpoint=str(last_checkpoint) if last_checkpoint else None,
    )
