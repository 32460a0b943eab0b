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
import logging
import sys

from coopt_hub.errors import CoOptError
from coopt_hub.training import load_training_data, make_accelerator, train
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, config_from_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
        accelerator = make_accelerator(config.precision)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
        if accelerator.is_main_process:  # progress from this library only, not every HTTP request
            logging.getLogger("coopt_hub").setLevel(logging.INFO)
        with accelerator.main_process_first():  # one process fills the download caches, the rest reuse them
            data = load_training_data(args.dataset, args.revision, image_size=args.image_size)
        result = train(config, data, accelerator)
    except CoOptError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    if accelerator.is_main_process:
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
