"""Train any timm architecture on a merged CoOpt dataset and report linear-probe accuracy.

Examples:
  accelerate launch recipes/train_from_hub.py --dataset org/digits-coopt --revision v1 \\
      --arch resnet18 --objective coopt --epochs 20 --output runs/coopt
  python recipes/train_from_hub.py --dataset org/digits-coopt --revision v1 --objective byol --time-budget 600
  python recipes/train_from_hub.py ... --output runs/coopt --resume      # continue from the last checkpoint
  python recipes/train_from_hub.py ... --arch vit_tiny_patch16_224 --model-kwarg patch_size=4
  python recipes/train_from_hub.py ... --no-small-stem --push-to-hub org/digits-student   # then, anywhere:
      timm.create_model("hf-hub:org/digits-student", pretrained=True)

The last line printed is one JSON object: objective, arch, epochs, seconds, samples/s, accuracy and
the probe evaluations (time-to-accuracy). The Hub is reached through HF_ENDPOINT / HF_TOKEN.
--output holds resume checkpoints (model, optimizer, RNG and step, through accelerate); the trained
student goes to --output-dir and/or --push-to-hub in timm's Hub format, with a model card.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from coopt_hub.hub.client import Hub
from coopt_hub.training import train
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, prepare_run, run_recipe
from coopt_hub.training.publish import push_student


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="save the trained student here in timm's Hub format (config.json, model.safetensors, "
                        "README.md)")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="push the trained student to this model repo (one commit); "
                        "timm.create_model('hf-hub:ORG/NAME', pretrained=True) then loads it")
    args = parser.parse_args(argv)

    def body(student_dir: str | None) -> int:
        run = prepare_run(args, student_dir=student_dir, student_name=args.push_to_hub)
        result = train(run.config, run.data, run.accelerator, run.progress)
        if run.accelerator.is_main_process:
            if args.push_to_hub:
                commit = push_student(Hub(), args.push_to_hub, Path(result.student),
                                      f"{result.arch} trained with {result.objective} on {args.dataset}")
                run.progress.info(f"pushed the student to {args.push_to_hub} (commit {commit[:12]})")
            print(json.dumps(result.to_dict()))
        return 0

    def with_student_dir() -> int:
        if args.output_dir or not args.push_to_hub:
            return body(args.output_dir)
        with tempfile.TemporaryDirectory(prefix="coopt-student-") as staging:
            return body(staging)

    return run_recipe(with_student_dir, interrupted="Interrupted. With --output DIR the checkpoints written so far are "
                      "kept: rerun the same command with --resume to continue.")


if __name__ == "__main__":
    sys.exit(main())
