"""Train one architecture with every objective, over seeds, at the same epoch and wall-clock budgets.

Examples:
  python recipes/compare.py --dataset org/digits-coopt --revision v1 --arch resnet18 --epochs 10 --seeds 3
  python recipes/compare.py --dataset org/digits-coopt --revision v1 --epochs 10 --time-budget 300 \\
      --variants coopt byol --include-labeling-cost --push-results

Variants: coopt (aligned targets), coopt-raw (unaligned targets), byol (on BYOL's own augmentations),
supervised (labels: the upper bound). Without --time-budget the wall-clock budget is the time coopt
took for its epochs. Reports the mean and 95% interval over seeds, names a winner only where the
intervals separate, and the speedup of coopt over byol (its time to reach byol's final accuracy).
Prints the markdown table and the findings, then a final JSON line with one entry per objective
and budget; --results-dir DIR also keeps comparison.md, comparison.json (every run) and
comparison.png (probe accuracy vs wall-clock, with the interval bands).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from coopt_hub.hub.client import Hub
from coopt_hub.training import DEFAULT_VARIANTS, compare_objectives, format_table
from coopt_hub.training.arguments import add_dataset_arguments, add_training_arguments, prepare_run, run_recipe
from coopt_hub.training.compare import summarize
from coopt_hub.training.cost import labeling_cost
from coopt_hub.training.publish import push_results
from coopt_hub.training.results import markdown_table, write_comparison

VARIANTS = {v.name: v for v in DEFAULT_VARIANTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    add_training_arguments(parser, objective=False)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per objective and budget, seeds --seed, --seed + 1, ...; 95%% intervals need 2, "
                        "the paper used 3")
    parser.add_argument("--include-labeling-cost", action="store_true",
                        help="start the coopt runs' clocks at the seconds the participants spent labelling and "
                        "aligning their shards (from their reports)")
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="save comparison.md, comparison.json and comparison.png (the plot) here")
    parser.add_argument("--push-results", action="store_true",
                        help='add the table and plot as the "Benchmarks" section of the dataset\'s card, in one '
                        "commit on main (main must still be the compared revision)")
    args = parser.parse_args(argv)

    def body() -> int:
        run = prepare_run(args)
        origin = run.data.origin
        labeling = labeling_cost(origin.repo, origin.commit).seconds if args.include_labeling_cost else 0.0
        variants = tuple(VARIANTS[name] for name in args.variants)
        rows = compare_objectives(run.data, run.config, variants, run.accelerator, progress=run.progress,
                                  seeds=args.seeds, labeling_seconds=labeling)
        if run.accelerator.is_main_process:
            comparison = summarize(rows, config=run.config, origin=origin)
            run.progress.info("every run:\n" + format_table(rows))
            print(markdown_table(comparison))
            print("\n".join(comparison.findings()))
            with tempfile.TemporaryDirectory(prefix="coopt-comparison-") as staging:
                files = write_comparison(comparison, Path(args.results_dir or staging))
                if args.results_dir:
                    print(f"results: {files.markdown}, {files.json}, {files.plot}")
                if args.push_results:
                    commit = push_results(Hub(), comparison, files)
                    print(f"added the Benchmarks section to {origin.repo}'s card (commit {commit[:12]})")
            print(json.dumps([s.to_dict() for s in comparison.summaries]))
        return 0

    return run_recipe(body, interrupted="Interrupted before the comparison finished: no results were written or "
                      "pushed. Rerun the same command to compare again.")


if __name__ == "__main__":
    sys.exit(main())
