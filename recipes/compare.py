"""Train one architecture with every objective at the same epoch and wall-clock budgets.

Examples:
  python recipes/compare.py --dataset org/digits-coopt --revision v1 --arch resnet18 --epochs 10
  python recipes/compare.py --dataset org/digits-coopt --revision v1 --epochs 10 --time-budget 300 \\
      --variants coopt byol

Variants: coopt (aligned targets), coopt-raw (unaligned targets), byol, supervised. Without
--time-budget the wall-clock budget is the time coopt took for its epochs. Prints one table, then
a final JSON line with the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from coopt_hub.errors import CoOptError
from coopt_hub.training import DEFAULT_VARIANTS, compare_objectives, format_table, load_training_data, make_accelerator
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, config_from_arguments

VARIANTS = {v.name: v for v in DEFAULT_VARIANTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser, objective=False)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    try:
        config = config_from_arguments(args)
        accelerator = make_accelerator(config.precision)
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
        if accelerator.is_main_process:  # progress from this library only, not every HTTP request
            logging.getLogger("coopt_hub").setLevel(logging.INFO)
        with accelerator.main_process_first():  # one process fills the download caches, the rest reuse them
            data = load_training_data(args.dataset, args.revision, image_size=args.image_size)
        rows = compare_objectives(data, config, tuple(VARIANTS[name] for name in args.variants), accelerator)
    except CoOptError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    if accelerator.is_main_process:
        print(format_table(rows))
        print(json.dumps([{k: v for k, v in vars(r).items() if k != "result"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
