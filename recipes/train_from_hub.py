"""Train any timm architecture on a merged CoOpt dataset and report linear-probe accuracy.

Examples:
  accelerate launch recipes/train_from_hub.py --dataset org/digits-coopt --revision v1 \\
      --arch resnet18 --objective coopt --epochs 20 --output runs/coopt
  python recipes/train_from_hub.py --dataset org/digits-coopt --revision v1 --objective byol --time-budget 600
  python recipes/train_from_hub.py ... --output runs/coopt --resume      # continue from the last checkpoint
  python recipes/train_from_hub.py ... --arch vit_tiny_patch16_224 --model-kwarg patch_size=4

The last line printed is one JSON object: objective, arch, epochs, seconds, samples/s, accuracy and
the probe evaluations (time-to-accuracy). The Hub is reached through HF_ENDPOINT / HF_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import sys

from coopt_hub.training import train
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, prepare_run, run_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    args = parser.parse_args(argv)

    def body() -> int:
        run = prepare_run(args)
        result = train(run.config, run.data, run.accelerator, run.progress)
        if run.accelerator.is_main_process:
            print(json.dumps(result.to_dict()))
        return 0

    return run_recipe(body)


if __name__ == "__main__":
    sys.exit(main())
