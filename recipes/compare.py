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
import sys

from coopt_hub.training import DEFAULT_VARIANTS, compare_objectives, format_table
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, prepare_run, run_recipe

VARIANTS = {v.name: v for v in DEFAULT_VARIANTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser, objective=False)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)

    def body() -> int:
        run = prepare_run(args)
        variants = tuple(VARIANTS[name] for name in args.variants)
        rows = compare_objectives(run.data, run.config, variants, run.accelerator, progress=run.progress)
        if run.accelerator.is_main_process:
            print(format_table(rows))
            print(json.dumps([{k: v for k, v in vars(r).items() if k != "result"} for r in rows]))
        return 0

    return run_recipe(body)


if __name__ == "__main__":
    sys.exit(main())
