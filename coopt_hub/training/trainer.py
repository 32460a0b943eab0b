"""The training loop shared by every objective: AdamW, two views per sample, probe evaluations.

Run length is a number of epochs, a wall-clock budget in seconds, a number of steps, or several of
them (whichever ends first).
"seconds" everywhere means training time: probe evaluations and checkpoint writes are excluded,
so time-to-accuracy and samples/s measure the objective, not the bookkeeping.

Randomness is keyed, not streamed: the sample order of epoch e comes from a generator seeded with
(seed, e), and the augmentations of step s on rank r from (seed, s, r). A resumed run therefore
replays exactly the batches and views of an uninterrupted one.

The accelerator (multi-process, device, mixed precision) is passed in by the launcher; without one
a single-process Accelerator is made here. Each process takes its slice of every global batch, and
the main process's clock decides for all of them when a time budget is spent.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from coopt_hub.core.progress import Bar, LogProgress, Progress, Silent, terminal_bar
from coopt_hub.errors import ConfigError
from coopt_hub.training.augment import ViewPair, normalize, two_views
from coopt_hub.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from coopt_hub.training.data import TARGET_KINDS, TrainingData
from coopt_hub.training.export import StudentFacts, check_exportable, save_student
from coopt_hub.training.models import BackboneConfig, build_backbone
from coopt_hub.training.objectives import OBJECTIVES, ByolConfig, Objective, build_objective, views_for
from coopt_hub.training.probe import ProbeConfig, evaluate_probe

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "resnet18"
    objective: str = "coopt"
    targets: str = "aligned"  # which targets the coopt objective trains on: aligned | raw
    epochs: int | None = None
    time_budget: float | None = None  # seconds of training
    max_steps: int | None = None
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
    student_dir: str | None = None  # the trained backbone goes here in timm's Hub format (training/export.py)
    student_name: str | None = None  # the ORG/NAME it will be pushed to, named in its model card
    log_every: int = 50  # steps between progress log lines
    small_stem: bool | None = None  # see BackboneConfig
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    views: ViewPair | None = None  # None: the objective's own (objectives.views_for)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}", hint=f"Choose one of {', '.join(OBJECTIVES)}.")
        if self.targets not in TARGET_KINDS:
            raise ConfigError(f"unknown targets {self.targets!r}", hint=f"Choose one of {', '.join(TARGET_KINDS)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", hint=f"Choose one of {', '.join(PRECISIONS)}.")
        if self.epochs is None and self.time_budget is None and self.max_steps is None:
            raise ConfigError("no run length given", hint="Pass --epochs E or --time-budget SECONDS (or both).")
        if any(length is not None and length <= 0 for length in (self.epochs, self.time_budget, self.max_steps)):
            raise ConfigError("--epochs, --time-budget and --max-steps must be positive", hint="Pass a positive number.")
        if self.resume and not self.output_dir:
            raise ConfigError("--resume needs the --output directory of the run to continue", hint="Pass --output DIR.")

    @property
    def resolved_views(self) -> ViewPair:
        return self.views or views_for(self.objective)

    def backbone(self, image_size: int) -> BackboneConfig:
        return BackboneConfig(self.arch, image_size, self.small_stem, self.pretrained, self.model_kwargs)

    def run_identity(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (not the run length)."""
        fixed = ("arch", "objective", "targets", "batch_size", "lr", "weight_decay", "seed", "small_stem",
                 "pretrained", "model_kwargs")
        return {name: getattr(self, name) for name in fixed} | {
            "views": dataclasses.asdict(self.resolved_views),
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
    seed: int
    views: dict[str, Any]  # the augmentations trained with (augment.ViewPair as a dict)
    byol: dict[str, Any] | None  # the BYOL heads and momentum; None for the other objectives
    steps: int
    epochs: float
    seconds: float
    samples: int
    samples_per_s: float
    accuracy: float | None  # the last probe evaluation
    evals: list[EvalPoint]
    epoch_losses: list[float]  # mean training loss of each (complete or final partial) epoch
    checkpoint: str | None  # the last resume checkpoint's directory
    student: str | None = None  # the exported student's directory (timm format)

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


def train(
    config: TrainConfig, data: TrainingData, accelerator=None, progress: Progress | None = None
) -> TrainResult:
    """Train `config.arch` with `config.objective` on `data`; probe, checkpoint and report.

    `progress` gets the log lines and a bar with ETA over the run (its steps, or the seconds of a
    time budget without epochs) and over the probe's epochs; by default notes go to logging and no
    bar is drawn. Processes other than the main one stay silent.
    """
    accelerator = accelerator or make_accelerator(config.precision)
    say = (progress or LogOnly()) if accelerator.is_main_process else Silent()
    try:
        run, state = _setup(config, data, accelerator, say)
        loop = _Loop.start(state, run)
        _train_steps(run, loop, say)
        _finish(run, loop, say)
    finally:
        accelerator.free_memory()  # the next run on this accelerator must not checkpoint this one's model
    return _result(run, loop)


class LogOnly(LogProgress):
    """Notes to logging, never a bar: what library calls get unless they pass a Progress."""

    def bar(self, total: int | None, description: str, unit: str = "it") -> Bar:
        return terminal_bar(total, description, unit, enabled=False)


@dataclass(frozen=True)
class Schedule:
    """How a run's steps are laid out."""

    global_batch: int  # rows per step over all processes
    steps_per_epoch: int
    total_steps: int | None  # None: only the time budget ends the run
    checkpoint_every: int  # in steps
    can_probe: bool


@dataclass
class LoopState:
    """Where a run stands: what a checkpoint stores and a resume restores."""

    step: int = 0
    seconds: float = 0.0  # training seconds so far
    epoch_losses: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    # The running epoch's loss, so that a resume completes the epoch's mean.
    loss_sum: float = 0.0
    loss_count: int = 0

    @classmethod
    def from_checkpoint(cls, loop: dict[str, Any]) -> LoopState:
        return cls(**{**loop, "evals": [EvalPoint(**point) for point in loop["evals"]]})


@dataclass
class _Run:
    """A prepared run: the model, its optimizer and the data on the device, and the step layout."""

    config: TrainConfig
    data: TrainingData
    accelerator: Any
    schedule: Schedule
    model: nn.Module  # as prepared by the accelerator (wrapped for DDP and autocast)
    objective: Objective  # unwrapped: its backbone is probed, its state checkpointed
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    targets: torch.Tensor | None
    labels: torch.Tensor | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def output(self) -> Path | None:
        return Path(self.config.output_dir) if self.config.output_dir else None


def _setup(config: TrainConfig, data: TrainingData, accelerator, say: Progress) -> tuple[_Run, LoopState]:
    """Check that `data` can feed the run, build the model and optimizer, restore a checkpoint
    when resuming, then hand both to the accelerator and move the data to its device."""
    coopt_targets = _coopt_targets(config, data)
    schedule = _schedule(config, data, accelerator.num_processes)
    if config.student_dir:  # before hours of training, not after
        check_exportable(config.backbone(data.image_size), config.resolved_views.first)
    device = accelerator.device
    objective, optimizer = _build(config, data, coopt_targets, device)
    model, optimizer = accelerator.prepare(objective, optimizer)
    state = _restore(config, accelerator, say)
    run = _Run(
        config=config, data=data, accelerator=accelerator, schedule=schedule, model=model,
        objective=accelerator.unwrap_model(model), optimizer=optimizer,
        images=data.images.to(device),
        targets=coopt_targets.to(device) if coopt_targets is not None else None,
        labels=data.labels.to(device) if data.labels is not None else None,
    )
    return run, state


def _coopt_targets(config: TrainConfig, data: TrainingData) -> torch.Tensor | None:
    if config.objective != "coopt":
        return None
    if config.targets not in data.targets:
        raise ConfigError(
            f"this dataset has no {config.targets!r} targets (it has {sorted(data.targets)})",
            hint="Use --targets aligned, or a merge that kept the raw targets.",
        )
    return data.targets[config.targets]


def _schedule(config: TrainConfig, data: TrainingData, world: int) -> Schedule:
    global_batch = config.batch_size * world
    steps_per_epoch = len(data) // global_batch  # drop the last partial batch: BN wants full batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(data)} training rows cannot fill one batch of {config.batch_size} x {world} process(es)",
            hint="Lower --batch-size.",
        )
    can_probe = config.eval_points > 0 and data.labels is not None and data.num_classes is not None
    if can_probe and data.test is None:
        raise ConfigError(
            "probe evaluations need an evaluation split, and this data has none (the training split is never "
            "scored: the student trained on it)",
            hint="Load the data with an evaluation split (--eval-split NAME), or pass --eval-points 0.",
        )
    lengths = [config.epochs * steps_per_epoch] if config.epochs is not None else []
    if config.max_steps is not None:
        lengths.append(config.max_steps)
    return Schedule(
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=min(lengths) if lengths else None,
        checkpoint_every=config.checkpoint_every or steps_per_epoch,
        can_probe=can_probe,
    )


def _build(
    config: TrainConfig, data: TrainingData, coopt_targets: torch.Tensor | None, device: torch.device
) -> tuple[Objective, torch.optim.Optimizer]:
    torch.manual_seed(config.seed)
    backbone, width = build_backbone(config.backbone(data.image_size))
    objective = build_objective(
        config.objective, backbone, width, targets=coopt_targets, num_classes=data.num_classes, byol=config.byol
    ).to(device)
    if device.type == "cuda":
        # Inputs have one fixed shape, so cuDNN's autotuning pays off; channels-last is the layout
        # its mixed-precision convolution kernels are fastest in.
        torch.backends.cudnn.benchmark = True
        objective.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [p for p in objective.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    return objective, optimizer


def _restore(config: TrainConfig, accelerator, say: Progress) -> LoopState:
    """The loop state of the last checkpoint (the prepared model, optimizer and RNGs restored), or a fresh one."""
    if not config.resume:
        return LoopState()
    output = Path(config.output_dir)
    found = list_checkpoints(output)
    if not found:
        say.info(f"no checkpoint in {output} yet; starting at step 0")
        return LoopState()
    state = LoopState.from_checkpoint(load_checkpoint(accelerator, found[-1], config.run_identity()))
    say.info(f"resumed from {found[-1]} at step {state.step}")
    return state


@dataclass
class _Loop:
    """The running loop: a LoopState with the clock running and the epoch's loss summed on the device."""

    step: int
    clock: _Clock
    loss_sum: torch.Tensor
    loss_count: int
    epoch_losses: list[float]
    evals: list[EvalPoint]
    done: float = 0.0  # fraction of the run done, read once per step and the same on every process
    order: torch.Tensor | None = None  # the sample order of epoch `order_epoch`
    order_epoch: int = -1
    checkpoint: Path | None = None
    student: Path | None = None

    @classmethod
    def start(cls, state: LoopState, run: _Run) -> _Loop:
        loop = cls(
            step=state.step, clock=_Clock(state.seconds, run.device),
            loss_sum=torch.tensor(state.loss_sum, device=run.device), loss_count=state.loss_count,
            epoch_losses=list(state.epoch_losses), evals=list(state.evals),
        )
        loop.done = _fraction_done(run, loop)
        return loop

    def state(self) -> LoopState:
        return LoopState(self.step, self.clock.total, list(self.epoch_losses), list(self.evals),
                         float(self.loss_sum), self.loss_count)

    def add_loss(self, loss: torch.Tensor, steps_per_epoch: int) -> None:
        self.loss_sum += loss.detach().float()
        self.loss_count += 1
        if self.step % steps_per_epoch == 0:
            self.close_epoch()

    def close_epoch(self) -> None:
        self.epoch_losses.append(float(self.loss_sum) / self.loss_count)
        self.loss_sum.zero_()
        self.loss_count = 0


def _fraction_done(run: _Run, loop: _Loop) -> float:
    """How far the run is, by steps or by training seconds, whichever is further."""
    config, total_steps = run.config, run.schedule.total_steps
    by_steps = loop.step / total_steps if total_steps else 0.0
    if not config.time_budget:
        return by_steps
    by_time = loop.clock.now() / config.time_budget
    if run.accelerator.num_processes > 1:
        # Every process keeps its own clock; they must agree on when the budget ends (and on the
        # evaluation points and the objective's schedule), or one would wait forever for the others.
        by_time = broadcast_object_list([by_time], from_process=0)[0]
    return max(by_steps, by_time)


def _train_steps(run: _Run, loop: _Loop, say: Progress) -> None:
    """Train until the run length is reached; the clock stops for evaluation points and checkpoints."""
    config = run.config
    targets = f" ({config.targets} targets)" if config.objective == "coopt" else ""
    rate = _RateLine(config.log_every, loop.clock.now(), loop.step)
    counter = _BarCounter.start(run, loop)
    run.model.train()
    loop.clock.resume()
    with say.bar(counter.total - counter.shown, f"train {config.objective}{targets}", counter.unit) as bar:
        while loop.done < 1.0:
            loss = _train_step(run, loop)
            counter.advance(bar, loop)
            rate.after_step(run, loop, loss, say)
            _evaluate_or_checkpoint(run, loop, say)
    loop.clock.pause()


@dataclass
class _BarCounter:
    """What the training bar counts: steps when the run has a number of epochs, else whole training
    seconds of the budget, so that either way its ETA is the run's."""

    by_steps: bool
    total: int
    shown: int = 0

    @classmethod
    def start(cls, run: _Run, loop: _Loop) -> _BarCounter:
        total_steps = run.schedule.total_steps
        if total_steps is not None:
            counter = cls(by_steps=True, total=total_steps)
        else:
            counter = cls(by_steps=False, total=math.ceil(run.config.time_budget))
        counter.shown = counter.position(loop)
        return counter

    @property
    def unit(self) -> str:
        return "step" if self.by_steps else "s"

    def position(self, loop: _Loop) -> int:
        return min(self.total, loop.step if self.by_steps else int(loop.clock.now()))

    def advance(self, bar: Bar, loop: _Loop) -> None:
        position = self.position(loop)
        if position > self.shown:  # tqdm would count an empty update into its rate
            bar.update(position - self.shown)
            self.shown = position


def _train_step(run: _Run, loop: _Loop) -> torch.Tensor:
    """One optimiser step on this process's slice of the step's global batch; returns its loss."""
    config, schedule = run.config, run.schedule
    epoch, within = divmod(loop.step, schedule.steps_per_epoch)
    if epoch != loop.order_epoch:
        loop.order, loop.order_epoch = _epoch_order(config.seed, epoch, len(run.data)).to(run.device), epoch
    rank = run.accelerator.process_index
    start = within * schedule.global_batch + rank * config.batch_size
    rows = loop.order[start : start + config.batch_size]
    generator = torch.Generator().manual_seed(_key(config.seed, loop.step, rank))
    pair = config.resolved_views
    views = two_views(run.images[rows], generator, pair.first, pair.second)
    if run.device.type == "cuda":
        views = views.contiguous(memory_format=torch.channels_last)
    targets = run.targets[rows] if run.targets is not None else None
    labels = run.labels[rows] if run.labels is not None else None
    loss = run.model(views, targets, labels)
    run.accelerator.backward(loss)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    loop.done = _fraction_done(run, loop)
    run.objective.after_step(loop.done)
    loop.add_loss(loss, schedule.steps_per_epoch)
    return loss


@dataclass
class _RateLine:
    """Every `every` steps, a line with the loss and the samples/s since the previous line."""

    every: int
    seconds: float
    step: int

    def after_step(self, run: _Run, loop: _Loop, loss: torch.Tensor, say: Progress) -> None:
        if loop.step % self.every or not run.accelerator.is_main_process:
            return
        now = loop.clock.now()
        rate = (loop.step - self.step) * run.schedule.global_batch / max(now - self.seconds, 1e-9)
        say.info(f"step {loop.step} epoch {loop.step / run.schedule.steps_per_epoch:.2f} "
                 f"loss {loss.item():.4f} {rate:.0f} samples/s")
        self.seconds, self.step = now, loop.step


def _evaluate_or_checkpoint(run: _Run, loop: _Loop, say: Progress) -> None:
    """Probe at the evaluation points and checkpoint every `checkpoint_every` steps, clock stopped.

    Neither happens at the step that ends the run: `_finish` evaluates and checkpoints once, there.
    """
    config, schedule = run.config, run.schedule
    due_eval = (
        schedule.can_probe and len(loop.evals) < config.eval_points
        and loop.done >= (len(loop.evals) + 1) / config.eval_points
    )
    due_checkpoint = run.output is not None and loop.step % schedule.checkpoint_every == 0
    if loop.done >= 1.0 or not (due_eval or due_checkpoint):
        return
    loop.clock.pause()
    if due_eval:
        loop.evals.append(_evaluate(run, loop, say))
    if due_checkpoint:
        loop.checkpoint = _save(run, loop)
    loop.clock.resume()


def _evaluate(run: _Run, loop: _Loop, say: Progress) -> EvalPoint:
    """Probe the backbone on the main process; every process records the same point."""
    config, schedule = run.config, run.schedule
    point = None
    if run.accelerator.is_main_process:
        with run.accelerator.autocast():
            accuracy = evaluate_probe(
                run.objective.backbone, run.data, device=run.device, config=config.probe,
                augment=config.resolved_views.first, seed=config.seed, progress=say,
            )
        point = EvalPoint(loop.step, loop.step / schedule.steps_per_epoch, loop.clock.total,
                          loop.step * schedule.global_batch, accuracy)
        say.info(f"eval step {point.step} epoch {point.epoch:.2f}: probe accuracy {accuracy:.4f} "
                 f"at {point.seconds:.1f} s")
    # Also the barrier: the other processes wait here while the main one probes.
    return broadcast_object_list([point], from_process=0)[0]


def _save(run: _Run, loop: _Loop) -> Path:
    """Write a checkpoint; every process takes part (each saves its RNG state, FSDP its shards)."""
    config = run.config
    return save_checkpoint(run.accelerator, run.output, loop.step, dataclasses.asdict(loop.state()),
                           config.run_identity(), config.keep_checkpoints)


def _finish(run: _Run, loop: _Loop, say: Progress) -> None:
    """The run's last evaluation and checkpoint, and the mean loss of a final partial epoch."""
    if run.schedule.can_probe and (not loop.evals or loop.evals[-1].step != loop.step):
        loop.evals.append(_evaluate(run, loop, say))
    if run.output is not None:
        loop.checkpoint = _save(run, loop)  # keeps a partial epoch's running loss, so a resume completes it
    if loop.loss_count:
        loop.close_epoch()
    if run.config.student_dir and run.accelerator.is_main_process:
        loop.student = _export(run, loop)
    run.accelerator.wait_for_everyone()


def _export(run: _Run, loop: _Loop) -> Path:
    """The trained backbone in timm's format, checked to load back with the features it has here."""
    config, views = run.config, run.config.resolved_views
    facts = StudentFacts(
        arch=config.arch, objective=config.objective, targets=config.targets if config.objective == "coopt" else None,
        seeds=(config.seed,), epochs=loop.step / run.schedule.steps_per_epoch, image_size=run.data.image_size,
        views=views.name, accuracy=loop.evals[-1].accuracy if loop.evals else None, origin=run.data.origin,
        hub_name=config.student_name,
    )
    sample = normalize(run.data.images[:8], views.first)
    return save_student(run.objective.backbone, Path(config.student_dir), facts, views.first, sample)


def _result(run: _Run, loop: _Loop) -> TrainResult:
    config, schedule = run.config, run.schedule
    samples = loop.step * schedule.global_batch
    seconds = loop.clock.total
    return TrainResult(
        objective=config.objective,
        targets=config.targets if config.objective == "coopt" else None,
        arch=config.arch,
        seed=config.seed,
        views=dataclasses.asdict(config.resolved_views),
        byol=dataclasses.asdict(config.byol) if config.objective == "byol" else None,
        steps=loop.step,
        epochs=loop.step / schedule.steps_per_epoch,
        seconds=seconds,
        samples=samples,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        accuracy=loop.evals[-1].accuracy if loop.evals else None,
        evals=loop.evals,
        epoch_losses=loop.epoch_losses,
        checkpoint=str(loop.checkpoint) if loop.checkpoint else None,
        student=str(loop.student) if loop.student else None,
    )
