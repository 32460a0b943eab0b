"""One of the paper's settings end to end, with the project's own commands: `coopt-hub init`, one
`coopt-hub optimize --push` per prior, `coopt-hub merge`, then recipes/compare.py.

  python recipes/paper/run.py recipes/paper/cifar10.yaml --repo ORG/cifar10-coopt
  python recipes/paper/run.py recipes/paper/cifar10.yaml --repo ORG/cifar10-coopt --dry-run   # print the commands
  python recipes/paper/run.py recipes/paper/tiny_imagenet.yaml --repo ORG/tin-coopt --set student.seeds=1 --max-steps 2

What to run it on: a machine with a GPU (three CLIP priors label 50k-100k images, then ResNet-18
trains 4 objectives x 2 budgets x 3 seeds) and internet (the source dataset and the OpenAI weights
come from huggingface.co; the merged dataset goes to HF_ENDPOINT with HF_TOKEN). Every step
resumes or skips what is done: after an interruption, rerun the same command.

--set KEY=VALUE overrides the config (dotted keys reach into `student`; values are YAML, e.g.
--set 'priors=[{model: ViT-S-32}]'); --max-steps N stops every training run after N steps (a check
that the whole chain works before the hours it takes).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coopt_hub.errors import ConfigError
from coopt_hub.training.arguments import run_recipe

COMPARE = Path(__file__).resolve().parents[1] / "compare.py"


@dataclass(frozen=True)
class Prior:
    model: str
    pretrained: str | None = None  # None: random weights (offline checks only)
    image_size: int | None = None  # None: the model's own input size


@dataclass(frozen=True)
class Student:
    arch: str
    small_stem: bool
    image_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seeds: int
    eval_points: int
    probe_epochs: int


@dataclass(frozen=True)
class PaperConfig:
    source: str
    split: str
    image_column: str
    eval_split: str
    shards: int
    anchors: float
    dim: int
    seed: int
    priors: tuple[Prior, ...]
    label_batch_size: int
    label_precision: str
    student: Student

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PaperConfig:
        try:
            return cls(**{**data, "priors": tuple(Prior(**p) for p in data["priors"]),
                          "student": Student(**data["student"])})
        except (KeyError, TypeError) as err:
            raise ConfigError(f"the config does not describe a paper run ({type(err).__name__}: {err})",
                              hint="Start from recipes/paper/cifar10.yaml; every key there is needed.") from err


def _set(data: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {assignment!r}", hint="E.g. --set student.epochs=10.")
    *parents, leaf = key.split(".")
    target = data
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = yaml.safe_load(value)


def load_config(path: Path, assignments: list[str]) -> PaperConfig:
    data = yaml.safe_load(Path(path).read_text())
    for assignment in assignments:
        _set(data, assignment)
    return PaperConfig.from_dict(data)


def _anchors(value: float) -> str:
    return str(int(value)) if value >= 1 else str(value)


def commands(config: PaperConfig, repo: str, workdir: Path, max_steps: int | None = None,
             push_results: bool = False) -> list[list[str]]:
    """The run as command lines, in order."""
    cli = [sys.executable, "-m", "coopt_hub"]
    steps = [cli + ["init", repo, "--source", config.source, "--split", config.split,
                    "--image-column", config.image_column, "--shards", str(config.shards),
                    "--anchors", _anchors(config.anchors), "--dim", str(config.dim), "--seed", str(config.seed)]]
    for shard in range(config.shards):
        prior = config.priors[shard % len(config.priors)]
        steps.append(cli + ["optimize", repo, "--shard", str(shard), "--model", prior.model]
                     + (["--pretrained", prior.pretrained] if prior.pretrained else [])
                     + (["--image-size", str(prior.image_size)] if prior.image_size else [])
                     + ["--batch-size", str(config.label_batch_size), "--precision", config.label_precision,
                        "--workdir", str(workdir / f"shard-{shard}"), "--push"])
    steps.append(cli + ["merge", repo])
    steps.append(_compare(config.student, config.eval_split, repo, workdir, max_steps, push_results))
    return steps


def _compare(student: Student, eval_split: str, repo: str, workdir: Path, max_steps: int | None,
             push_results: bool) -> list[str]:
    command = [sys.executable, str(COMPARE), "--dataset", repo, "--revision", "main", "--eval-split", eval_split,
               "--arch", student.arch, "--small-stem" if student.small_stem else "--no-small-stem",
               "--image-size", str(student.image_size), "--epochs", str(student.epochs),
               "--batch-size", str(student.batch_size), "--lr", str(student.lr),
               "--weight-decay", str(student.weight_decay), "--seeds", str(student.seeds),
               "--eval-points", str(student.eval_points), "--probe-epochs", str(student.probe_epochs),
               "--include-labeling-cost", "--results-dir", str(workdir / "results")]
    if max_steps is not None:
        command += ["--max-steps", str(max_steps)]
    return command + (["--push-results"] if push_results else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="a setting: recipes/paper/cifar10.yaml, cifar100.yaml, tiny_imagenet.yaml")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="the CoOpt dataset repo to create or continue")
    parser.add_argument("--workdir", type=Path, default=Path("paper-runs"),
                        help="labelling chunks and the comparison's results (default: ./paper-runs)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set student.epochs=10")
    parser.add_argument("--max-steps", type=int, default=None, help="stop every training run after this many steps")
    parser.add_argument("--push-results", action="store_true", help="add the comparison to the dataset card")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    def body() -> int:
        config = load_config(args.config, args.assignments)
        workdir = args.workdir / args.repo.replace("/", "--")
        for command in commands(config, args.repo, workdir, args.max_steps, args.push_results):
            print(shlex.join(command), flush=True)
            if args.dry_run:
                continue
            done = subprocess.run(command)
            if done.returncode != 0:
                print(f"Error: that step failed (exit {done.returncode}); rerun this command to resume.",
                      file=sys.stderr)
                return done.returncode
        return 0

    return run_recipe(body, interrupted="Interrupted. Every step keeps what it finished: rerun the same command to "
                      "continue from there.")


if __name__ == "__main__":
    sys.exit(main())
