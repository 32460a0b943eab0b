"""The comparison over seeds: intervals, winner lines, the speedup, its table, JSON and plot, the
"Benchmarks" section it adds to a dataset card, and the paper's recipes that run it.

Most checks use runs with known probe curves (TrainResults written by hand), so every figure has
a known answer; one runs the real comparison on tiny digits to check what it trains.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coopt_hub.errors import ConflictError
from coopt_hub.training import (
    ByolConfig,
    DatasetOrigin,
    ProbeConfig,
    TrainConfig,
    TrainingData,
    compare_objectives,
    summarize,
)
from coopt_hub.training.compare import ComparisonRow, Variant
from coopt_hub.training.plot import curve_figure, save_plot, series_label
from coopt_hub.training.results import markdown, markdown_table, write_comparison
from coopt_hub.training.stats import mean_interval, verdict
from coopt_hub.training.trainer import EvalPoint, TrainResult

RECIPES = Path(__file__).parents[1] / "recipes"
PAPER_CONFIGS = sorted((RECIPES / "paper").glob("*.yaml"))


def _result(objective: str, curve: list[tuple[float, float]], seed: int, views: str) -> TrainResult:
    evals = [EvalPoint(step=10 * (i + 1), epoch=float(i + 1), seconds=s, samples=640 * (i + 1), accuracy=a)
             for i, (s, a) in enumerate(curve)]
    return TrainResult(
        objective=objective, targets="aligned" if objective == "coopt" else None, arch="test_resnet", seed=seed,
        views={"name": views}, byol=None, steps=evals[-1].step, epochs=evals[-1].epoch, seconds=curve[-1][0],
        samples=evals[-1].samples, samples_per_s=evals[-1].samples / curve[-1][0], accuracy=curve[-1][1],
        evals=evals, epoch_losses=[1.0] * len(curve), checkpoint=None,
    )


def _row(variant: str, budget: str, seed: int, curve: list[tuple[float, float]], offset: float = 0.0,
         budget_seconds: float | None = None) -> ComparisonRow:
    objective = "coopt" if variant.startswith("coopt") else variant
    result = _result(objective, curve, seed, "byol" if objective == "byol" else "rela")
    return ComparisonRow(variant, budget, result.epochs, result.seconds, result.samples_per_s, result.accuracy,
                         result, seed, offset, budget_seconds)


# coopt reaches 0.70 (byol's final accuracy) after 20 s of training; byol needs 60 s for it.
COOPT = [(10.0, 0.50), (20.0, 0.70), (30.0, 0.80)]
BYOL = [(20.0, 0.40), (40.0, 0.60), (60.0, 0.70)]


def _known_rows(seeds: int = 3, offset: float = 0.0, byol_final: float = 0.70) -> list[ComparisonRow]:
    rows = []
    for seed in range(seeds):
        jitter = 0.005 * (seed - 1)  # small seed noise, symmetric around the curves
        coopt = [(s, a + jitter) for s, a in COOPT]
        byol = [(s, a + jitter) for s, a in BYOL[:-1]] + [(BYOL[-1][0], byol_final + jitter)]
        rows += [_row("coopt", "epochs", seed, coopt, offset), _row("byol", "epochs", seed, byol)]
    return rows


def test_interval_is_the_student_t_interval_of_the_mean():
    interval = mean_interval([0.5, 0.6, 0.7])
    assert interval.mean == pytest.approx(0.6)
    assert interval.half_width == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert interval.low == pytest.approx(0.6 - interval.half_width)
    single = mean_interval([0.6])
    assert single.half_width is None, "one value has no interval"
    assert "no interval" in single.text()


def test_a_winner_is_named_only_when_the_intervals_separate():
    clear = verdict("epochs", "coopt", mean_interval([0.80, 0.81, 0.79]), "byol", mean_interval([0.70, 0.71, 0.69]))
    assert clear.winner == "coopt"
    assert clear.text.startswith("coopt beats byol at equal epochs"), clear.text

    overlapping = verdict("time", "coopt", mean_interval([0.80, 0.70, 0.75]), "byol", mean_interval([0.74, 0.76, 0.72]))
    assert overlapping.winner is None
    assert "no winner at equal wall-clock" in overlapping.text and "overlap" in overlapping.text, overlapping.text

    one_seed = verdict("epochs", "coopt", mean_interval([0.9]), "byol", mean_interval([0.1]))
    assert one_seed.winner is None, "a single seed never names a winner, however large the gap"
    assert "no interval" in one_seed.text, one_seed.text


def test_summaries_verdicts_and_speedup_from_known_curves():
    comparison = summarize(_known_rows())
    coopt = comparison.summary("coopt", "epochs")
    assert coopt.accuracy.mean == pytest.approx(0.80)
    assert coopt.accuracy.n == 3
    assert [p.seconds.mean for p in coopt.curve] == pytest.approx([10.0, 20.0, 30.0])
    assert [v.winner for v in comparison.verdicts] == ["coopt"], [v.text for v in comparison.verdicts]
    speedup = comparison.speedup
    assert speedup.target == pytest.approx(0.70)
    assert speedup.seconds == pytest.approx(20.0), "the first evaluation that reaches byol's final accuracy"
    assert speedup.value == pytest.approx(3.0)
    assert speedup.text().startswith("coopt speedup over byol: 3.00x"), speedup.text()


def test_labelling_seconds_go_on_coopts_clock():
    comparison = summarize(_known_rows(offset=10.0))
    assert comparison.labeling_seconds == pytest.approx(10.0)
    assert comparison.summary("coopt", "epochs").clock_seconds.mean == pytest.approx(40.0)
    assert comparison.summary("byol", "epochs").clock_seconds.mean == pytest.approx(60.0)
    assert comparison.speedup.value == pytest.approx(2.0), "60 s against 20 s of training + 10 s of labelling"


def test_speedup_at_the_first_evaluation_is_a_lower_bound():
    speedup = summarize(_known_rows(byol_final=0.45)).speedup
    assert speedup.seconds == pytest.approx(10.0)
    assert speedup.value == pytest.approx(6.0)
    assert speedup.at_first_evaluation
    assert "at least" in speedup.text(), speedup.text()
    assert not summarize(_known_rows()).speedup.at_first_evaluation


def test_speedup_says_never_reached_without_a_number():
    speedup = summarize(_known_rows(byol_final=0.95)).speedup
    assert speedup.value is None
    assert speedup.seconds is None
    text = speedup.text()
    assert text.startswith("coopt speedup over byol: never reached"), text
    assert not re.search(r"\d\s*x\b", text), f"a number where there is none: {text}"


def test_plot_is_a_png_with_one_series_per_objective(tmp_path):
    comparison = summarize(_known_rows())
    figure = curve_figure(comparison)
    axes = figure.axes[0]
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == [series_label(comparison.summary("coopt", "epochs")),
                      series_label(comparison.summary("byol", "epochs"))]
    np.testing.assert_allclose(axes.get_lines()[0].get_xdata(), [10.0, 20.0, 30.0])
    np.testing.assert_allclose(axes.get_lines()[1].get_ydata(), [0.40, 0.60, 0.70])
    assert len(axes.collections) == 2, "one interval band per objective"

    path = save_plot(comparison, tmp_path / "curves.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (700, 450)


def test_outputs_hold_the_table_the_findings_and_every_run(tmp_path):
    comparison = summarize(_known_rows())
    files = write_comparison(comparison, tmp_path / "out")
    text = files.markdown.read_text()
    assert text.startswith(markdown_table(comparison))
    assert "probe acc" in text.splitlines()[0]
    assert "coopt beats byol at equal epochs" in text
    assert "coopt speedup over byol: 3.00x" in text
    assert f"]({files.plot.name})" in text, "the plot's image link"
    data = json.loads(files.json.read_text())
    assert data["speedup"]["speedup"] == pytest.approx(3.0)
    assert len(data["runs"]) == 6
    assert data["summaries"][0]["accuracy"]["n"] == 3
    assert files.plot.read_bytes().startswith(b"\x89PNG")


# The Benchmarks section of a dataset card --------------------------------------------------------

CARD = """---
license: cc-by-4.0
tags:
- coopt
---
# digits-coopt

Targets from three priors.

## Target quality

| probe | 0.61 |

## Citation

```bibtex
@article{x,
## Benchmarks (inside a code block: not a heading)
}
```
"""


def _published(hub, new_repo_id, card: str) -> tuple[str, str]:
    from huggingface_hub import CommitOperationAdd

    repo = new_repo_id("bench")
    hub.ensure_repo(repo)
    commit = hub.commit(repo, "main", lambda head: [CommitOperationAdd("README.md", card.encode())], "card")
    return repo, commit


def _pushed(hub, comparison, tmp_path) -> str:
    from coopt_hub.training.publish import push_results

    push_results(hub, comparison, write_comparison(comparison, tmp_path))
    return hub.download(comparison.origin.repo, "README.md", "main").read_text()


def test_push_results_adds_the_section_and_touches_nothing_else(hub, new_repo_id, tmp_path):
    repo, commit = _published(hub, new_repo_id, CARD)
    comparison = summarize(_known_rows(), origin=DatasetOrigin(repo, "v1", commit, "train", "test"))
    card = _pushed(hub, comparison, tmp_path / "first")
    assert card.startswith(CARD), "the card before the section changed"
    section = card[len(CARD):]
    assert section.lstrip("\n").startswith("## Benchmarks\n")
    assert markdown_table(comparison) in section
    assert "](benchmarks/comparison.png)" in section
    assert hub.download(repo, "benchmarks/comparison.png", "main").read_bytes().startswith(b"\x89PNG")

    # Again, with other figures: the section is replaced, not repeated.
    head = hub.head(repo, "main")
    again = summarize(_known_rows(seeds=2), origin=DatasetOrigin(repo, "main", head, "train", "test"))
    card = _pushed(hub, again, tmp_path / "second")
    assert card.startswith(CARD)
    assert card.count("\n## Benchmarks\n") == 1
    assert markdown_table(again) in card and markdown_table(comparison) not in card


def test_push_results_replaces_a_section_in_the_middle_in_place(hub, new_repo_id, tmp_path):
    before, after = CARD.split("## Citation")
    card = before + "## Benchmarks\n\nold figures\n\n## Citation" + after
    repo, commit = _published(hub, new_repo_id, card)
    comparison = summarize(_known_rows(), origin=DatasetOrigin(repo, "v1", commit, "train", "test"))
    pushed = _pushed(hub, comparison, tmp_path)
    assert pushed.startswith(before + "## Benchmarks\n")
    assert pushed.endswith("\n## Citation" + after), "the sections after it changed"
    assert "old figures" not in pushed


def test_push_results_refuses_a_main_that_moved_on(hub, new_repo_id, tmp_path):
    from huggingface_hub import CommitOperationAdd

    repo, commit = _published(hub, new_repo_id, CARD)
    hub.commit(repo, "main", lambda head: [CommitOperationAdd("notes.txt", b"newer")], "a newer version")
    comparison = summarize(_known_rows(), origin=DatasetOrigin(repo, "v1", commit, "train", "test"))
    with pytest.raises(ConflictError, match="not at the evaluated v1"):
        _pushed(hub, comparison, tmp_path)
    assert hub.download(repo, "README.md", "main").read_text() == CARD


# The labelling cost of a merged version ----------------------------------------------------------------


def _with_timings(labeling: float, alignment: float):
    def tamper(directory: Path) -> None:
        report = json.loads((directory / "report.json").read_text())
        report["timings"] = {"labeling_s": labeling, "alignment_s": alignment}
        (directory / "report.json").write_text(json.dumps(report))

    return tamper


def test_labelling_cost_sums_the_merged_shards_reports(hub, digits_source, new_collaboration):
    from helpers_hub import FakePrior

    from coopt_hub.platform.merge.run import merge
    from coopt_hub.training.cost import labeling_cost

    collab = new_collaboration(digits_source, "cost", shards=2, anchors=64, dim=16)
    good = FakePrior("good", 24)
    first = collab.push(0, good, tamper=_with_timings(1.5, 0.25))
    collab.push(1, FakePrior("other", 12, rank=12), reference=(0, good, first), tamper=_with_timings(2.0, 0.5))
    merged = merge(hub, collab.repo)
    cost = labeling_cost(collab.repo, merged.tag)
    assert cost.commit == merged.commit
    assert [(s.shard, s.labeling_seconds, s.alignment_seconds) for s in cost.shards] == [(0, 1.5, 0.25), (1, 2.0, 0.5)]
    assert cost.seconds == pytest.approx(4.25)


# The real comparison on tiny data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_digits() -> TrainingData:
    from sklearn.datasets import load_digits

    from coopt_hub.training.data import LabeledImages

    digits = load_digits()
    images = torch.from_numpy((digits.images * 15.9).astype(np.uint8)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()  # 16 px RGB
    labels = torch.from_numpy(digits.target)
    targets = torch.from_numpy(np.eye(10)[digits.target[:256]] @ np.random.default_rng(0).normal(size=(10, 16)))
    return TrainingData(ids=torch.arange(256), images=images[:256], targets={"aligned": targets.half()},
                        labels=labels[:256], test=LabeledImages(images[256:512], labels[256:512]), num_classes=10)


def test_compare_runs_every_seed_and_puts_labelling_on_coopts_clock(tiny_digits):
    torch.set_num_threads(1)
    config = TrainConfig(arch="test_resnet", epochs=1, batch_size=64, eval_points=1, log_every=10**6, seed=5,
                         probe=ProbeConfig(epochs=5), byol=ByolConfig(hidden_dim=64, projection_dim=32))
    rows = compare_objectives(tiny_digits, config, (Variant("coopt", "coopt"), Variant("byol", "byol")),
                              seeds=2, labeling_seconds=3.0)
    assert [(r.variant, r.budget, r.seed) for r in rows] == [
        ("coopt", "epochs", 5), ("coopt", "epochs", 6), ("byol", "epochs", 5), ("byol", "epochs", 6),
        ("coopt", "time", 5), ("coopt", "time", 6), ("byol", "time", 5), ("byol", "time", 6)]
    assert [r.offset for r in rows if r.variant == "coopt"] == [3.0] * 4
    assert [r.offset for r in rows if r.variant == "byol"] == [0.0] * 4
    budget = (rows[0].clock_seconds + rows[1].clock_seconds) / 2
    assert rows[4].result is rows[0].result, "coopt's equal-epoch runs are its equal-time runs: the budget is its time"
    for row in rows[6:]:
        assert row.budget_seconds == pytest.approx(budget)
        assert row.seconds >= budget - 1e-6, "byol trains as long as coopt's clock, labelling included"
    assert {r.result.views["name"] for r in rows if r.variant == "byol"} == {"byol"}
    assert {r.result.views["name"] for r in rows if r.variant == "coopt"} == {"rela"}

    comparison = summarize(rows, config=config)
    assert [(s.variant, s.budget) for s in comparison.summaries] == [
        ("coopt", "epochs"), ("byol", "epochs"), ("coopt", "time"), ("byol", "time")]
    assert all(s.accuracy.n == 2 and s.accuracy.half_width is not None for s in comparison.summaries)
    assert comparison.time_budget == pytest.approx(budget)
    assert markdown(comparison).count("\n| ") == 1 + len(comparison.summaries)


# recipes/paper --------------------------------------------------------------------------------------


def _paper(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(RECIPES / "paper" / "run.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _paper_module(monkeypatch):
    """recipes/paper/run.py, loaded as a module (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("paper_run", RECIPES / "paper" / "run.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_paper_configs_parse_into_the_papers_commands(tmp_path, monkeypatch):
    paper = _paper_module(monkeypatch)
    assert [p.stem for p in PAPER_CONFIGS] == ["cifar10", "cifar100", "tiny_imagenet"]
    for path in PAPER_CONFIGS:
        lines = paper.commands(paper.load_config(path, []), "org/paper", tmp_path)
        optimize = [line for line in lines if "optimize" in line]
        assert [line[line.index("--model") + 1] for line in optimize] == ["RN50", "ViT-B-32", "ViT-B-16"], path
        assert all(line[line.index("--pretrained") + 1] == "openai" for line in optimize), path
        compare = lines[-1]
        assert compare[compare.index("--arch") + 1] == "resnet18", path
        assert "--small-stem" in compare, path
        assert compare[compare.index("--batch-size") + 1] == "128", path
        assert compare[compare.index("--seeds") + 1] == "3", path
        assert "--include-labeling-cost" in compare, path


def test_paper_run_prints_its_commands_offline(tmp_path):
    done = _paper(str(RECIPES / "paper" / "cifar100.yaml"), "--repo", "org/c100", "--dry-run",
                  "--set", "student.epochs=7", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6, lines
    assert "init org/c100 --source uoft-cs/cifar100" in lines[0]
    assert "--epochs 7" in lines[-1]
    bad = _paper(str(RECIPES / "paper" / "cifar10.yaml"), "--repo", "org/c10", "--dry-run", "--set", "student")
    assert bad.returncode == 2, bad.stderr
    assert "Next step:" in bad.stderr


@pytest.mark.slow
def test_paper_run_two_steps_on_digits(digits_source, new_repo_id, tmp_path):
    """The whole chain offline: random-init priors label the digits, the merge, and 2 training steps per run."""
    repo = new_repo_id("paper")
    done = _paper(
        str(RECIPES / "paper" / "cifar10.yaml"), "--repo", repo, "--workdir", str(tmp_path), "--max-steps", "2",
        "--set", f"source={digits_source}", "--set", "image_column=image", "--set", "anchors=64",
        "--set", "dim=32", "--set", "priors=[{model: ViT-S-32, image_size: 32}, {model: ViT-S-16, image_size: 32}]",
        "--set", "label_precision=fp32", "--set", "label_batch_size=128",
        "--set", "student.arch=test_resnet", "--set", "student.image_size=16", "--set", "student.seeds=1",
        "--set", "student.eval_points=1", "--set", "student.probe_epochs=5",
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summaries = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(s["variant"], s["budget"]) for s in summaries} >= {("coopt", "epochs"), ("byol", "epochs")}
    assert all(s["epochs"]["mean"] > 0 for s in summaries)
    results = tmp_path / repo.replace("/", "--") / "results"
    assert (results / "comparison.png").read_bytes().startswith(b"\x89PNG")
    data = json.loads((results / "comparison.json").read_text())
    assert data["labeling_seconds"] > 0, "the participants' labelling seconds were not on coopt's clock"
    assert all(run["result"]["steps"] <= 2 for run in data["runs"] if run["budget"] == "epochs")
