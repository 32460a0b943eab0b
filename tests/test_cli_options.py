"""The options every command shares and the output sink, on the command line against the embedded hub.

REPO is positional, `--repo` its alias (both, naming different repos: a usage error), and a missing
REPO comes from COOPT_HUB_REPO or the joined participant config; `--debug` works before or after
the command; tables fit 100 columns and --json carries the same rows.
"""

from __future__ import annotations

import io
import json
import re
import sys
import uuid
from pathlib import Path

import pytest
from cli_run import Outcome, run_main
from click.testing import CliRunner
from fakes import FakePrior

from coopt_hub.cli import cli, main
from coopt_hub.cli.output import TABLE_WIDTH, Column, Output, format_table
from coopt_hub.cli.status import COLUMNS as STATUS_COLUMNS
from coopt_hub.cli.verify import COLUMNS as VERIFY_COLUMNS
from coopt_hub.errors import PlanError
from coopt_hub.participant.config import ParticipantConfig, save_config
from coopt_hub.priors import PriorSpec

# open_clip's longest kind of name: the status table must shorten it to fit, and still tell it in full.
LONG = FakePrior("hf-hub:laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", output_dim=40, rank=18)
OTHER_LONG = FakePrior("hf-hub:timm/vit_so400m_patch14_siglip_384.webli", output_dim=20, rank=6)


def run(argv: list[str], **env: str | None) -> Outcome:
    return run_main(argv, env)


def error_line(outcome: Outcome) -> str:
    found = re.search(r"^Error: (.*)$", outcome.stderr, re.MULTILINE)
    assert found, f"no error line in: {outcome.stderr}"
    return found.group(1)


@pytest.fixture(scope="module")
def noplan(hub) -> str:
    """A repo that exists but holds no plan: every command that reads the repo names it in its error."""
    repo = f"org/cli-noplan-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(repo)
    return repo


@pytest.fixture(scope="module")
def collab(new_collaboration, small_source):
    """Shards 0 and 1 pushed with priors of long names, shard 2 missing."""
    collaboration = new_collaboration(small_source, "cli-options", shards=3, anchors=32, dim=8)
    first = collaboration.push(0, LONG)
    collaboration.push(1, OTHER_LONG, reference=(0, LONG, first))
    return collaboration


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """An empty working directory: no participant config unless the test writes one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Each command that takes a repo: the options it needs besides REPO, and the error that names a repo without a plan.
READS_REPO = {
    "status": ((), "No CoOpt plan in {repo}"),
    "verify": ((), "No CoOpt plan in {repo}"),
    "merge": ((), "No CoOpt plan in {repo}"),
    "push": (("--shard", "0", "--workdir", "{tmp}"), "No finished result of shard 0 of {repo}"),
    "optimize": (("--shard", "0", "--model", "ViT-S-32", "--workdir", "{tmp}"), "No CoOpt plan in {repo}"),
}
NEEDS_REPO = {
    "join": (("--model", "ViT-S-32"), "No CoOpt plan in {repo}"),
    "init": (("--source", "{source}", "--shards", "2", "--anchors", "8"), "{repo}"),
}
INVALID_REPO = "org/bad name"  # init refuses it, naming the repo it got


def _argv(command: str, options: tuple[str, ...], tmp: Path, source: str = "org/any") -> list[str]:
    return [command, *(option.format(tmp=tmp, source=source) for option in options)]


@pytest.mark.parametrize("command", [*READS_REPO, *NEEDS_REPO])
@pytest.mark.parametrize("form", ["positional", "alias"])
def test_repo_positional_or_alias_reaches_the_command(command, form, noplan, small_source, in_tmp):
    options, message = {**READS_REPO, **NEEDS_REPO}[command]
    repo = INVALID_REPO if command == "init" else noplan
    given = [repo] if form == "positional" else ["--repo", repo]
    outcome = run([*_argv(command, options, in_tmp, small_source), *given])
    assert outcome.code != 0 and "correct the command line" not in outcome.stderr, outcome.stderr
    assert message.format(repo=repo) in error_line(outcome), f"`{command}` did not get {form} REPO"


@pytest.mark.parametrize("command", [*READS_REPO, *NEEDS_REPO])
def test_repo_and_a_different_alias_is_a_usage_error(command, in_tmp):
    options, _ = {**READS_REPO, **NEEDS_REPO}[command]
    outcome = run([*_argv(command, options, in_tmp), "org/one", "--repo", "org/other"])
    assert outcome.code == 2, outcome.stderr
    assert "REPO (org/one) and --repo (org/other) name different repos" in error_line(outcome)
    assert "Next step: correct the command line" in outcome.stderr


def test_repo_and_the_same_alias_is_one_repo(noplan, in_tmp):
    outcome = run(["status", noplan, "--repo", noplan])
    assert f"No CoOpt plan in {noplan}" in error_line(outcome)


@pytest.mark.parametrize("command", READS_REPO)
def test_missing_repo_comes_from_the_joined_config(command, noplan, in_tmp):
    save_config(ParticipantConfig(repo=noplan, prior=PriorSpec(model="ViT-S-32")))
    options, message = READS_REPO[command]
    outcome = run(_argv(command, options, in_tmp))
    assert message.format(repo=noplan) in error_line(outcome), f"`{command}` did not read ./coopt-hub.json"


def test_missing_repo_comes_from_the_environment_before_the_config(noplan, in_tmp):
    save_config(ParticipantConfig(repo="org/joined-elsewhere", prior=PriorSpec(model="ViT-S-32")))
    outcome = run(["status"], COOPT_HUB_REPO=noplan)
    assert f"No CoOpt plan in {noplan}" in error_line(outcome)


def test_a_repo_on_the_command_line_wins_over_a_broken_config(noplan, in_tmp):
    (in_tmp / "coopt-hub.json").write_text('{"version": 1, "repo": ')
    outcome = run(["status", noplan])
    assert f"No CoOpt plan in {noplan}" in error_line(outcome)


def test_no_repo_anywhere_says_where_one_can_come_from(in_tmp):
    outcome = run(["status"])
    assert "No CoOpt repo given" in error_line(outcome) and "coopt-hub join" in outcome.stderr


@pytest.mark.parametrize("command", NEEDS_REPO)
def test_commands_that_make_the_config_need_repo(command, noplan, in_tmp):
    save_config(ParticipantConfig(repo=noplan, prior=PriorSpec(model="ViT-S-32")))
    options, _ = NEEDS_REPO[command]
    outcome = run(_argv(command, options, in_tmp))
    assert outcome.code == 2 and "Missing argument 'REPO'" in error_line(outcome), outcome.stderr


# --debug ------------------------------------------------------------------------------------------


def test_errors_are_a_message_without_debug(noplan):
    outcome = run(["status", noplan])
    assert outcome.code != 0 and "Traceback" not in outcome.stderr
    assert f"No CoOpt plan in {noplan}" in error_line(outcome)


@pytest.mark.parametrize("argv", [["--debug", "status", "{repo}"], ["status", "{repo}", "--debug"]],
                         ids=["before", "after"])
def test_debug_before_or_after_the_command_raises_the_error(argv, noplan, monkeypatch):
    monkeypatch.delenv("COOPT_HUB_DEBUG", raising=False)
    with pytest.raises(PlanError, match="No CoOpt plan"):
        main([part.format(repo=noplan) for part in argv])


def test_debug_from_the_environment_raises_the_error(noplan, monkeypatch):
    monkeypatch.setenv("COOPT_HUB_DEBUG", "1")
    with pytest.raises(PlanError, match="No CoOpt plan"):
        main(["status", noplan])


def test_every_command_and_subcommand_takes_debug():
    runner = CliRunner()
    for argv in (["status", "--help"], ["optimize", "--help"], ["hub", "serve", "--help"]):
        shown = runner.invoke(cli, argv)
        assert shown.exit_code == 0 and "--debug" in shown.output, f"{' '.join(argv)} lacks --debug"


# Tables ------------------------------------------------------------------------------------------


def _table_lines(text: str, rows: int) -> list[str]:
    """The header and the rows of a table printed after a message and a blank line."""
    lines = text.splitlines()
    start = lines.index("") + 1
    return lines[start: start + 1 + rows]


def test_a_wide_status_fits_100_columns_and_names_each_prior_in_full(collab):
    outcome = run(["status", collab.repo])
    assert outcome.code == 0, outcome.stderr
    table = _table_lines(outcome.stdout, rows=3)
    # Output sizes and noise flags are in --json; a noise-like prior is also named in a note.
    assert table[0].split() == ["shard", "state", "commit", "prior", "V", "reference", "residual", "held-out",
                                "rows", "skipped", "merged"]
    too_wide = [line for line in table if len(line) > TABLE_WIDTH]
    assert not too_wide, f"lines over {TABLE_WIDTH} columns: {too_wide}"
    assert LONG.name not in "\n".join(table), "the long prior should have been shortened in the table"
    # Hub models bring their own weights: the label names the model, never "random init".
    assert f"prior of shard 0: {LONG.name}\n" in outcome.stdout, outcome.stdout
    assert f"prior of shard 1: {OTHER_LONG.name}\n" in outcome.stdout, outcome.stdout


def test_status_json_holds_the_rows_of_the_table(collab):
    document = json.loads(run(["status", collab.repo, "--json"]).stdout)
    text = run(["status", collab.repo]).stdout
    shards = document["shards"]
    table = _table_lines(text, rows=len(shards))
    assert table == format_table(shards, STATUS_COLUMNS)[: 1 + len(shards)]
    for line, shard in zip(table[1:], shards):
        cells = line.split()
        assert cells[:2] == [str(shard["shard"]), shard["state"]], f"shard {shard['shard']}: {line}"
        if shard["commit"]:
            assert cells[2] == shard["commit"][:8], f"shard {shard['shard']}: {line}"
    assert [s["state"] for s in shards] == ["done", "done", "missing"]
    assert shards[0]["prior"]["model"] == LONG.name and document["counts"] == {"done": 2, "missing": 1, "stale": 0}


def test_verify_json_holds_the_rows_of_the_table(collab):
    outcome = run(["verify", collab.repo, "--shard", "2"])
    document = json.loads(run(["verify", collab.repo, "--shard", "2", "--json"]).stdout)
    assert outcome.code == 1 and "Nothing has been pushed for shard(s) 2" in error_line(outcome)
    assert [(s["shard"], s["status"]) for s in document["shards"]] == [(2, "missing")]
    table = _table_lines(outcome.stdout, rows=1)
    assert table == format_table(document["shards"], VERIFY_COLUMNS)[:2]
    assert table[1].split()[:3] == ["2", "missing", "-"]


def test_tables_shorten_names_at_the_end_and_hashes_in_the_middle():
    fingerprint = "0123456789abcdef" * 4
    rows = [{"shard": k, "prior": f"hf-hub:org/a-very-long-model-name-number-{k}-" + "x" * 40,
             "fingerprint": fingerprint, "state": None} for k in range(2)]
    columns = [Column("shard"), Column("prior", elide="end"), Column("fingerprint", elide="middle"), Column("state")]
    lines = format_table(rows, columns, width=60)
    table, legend = lines[:3], lines[3:]
    assert all(len(line) <= 60 for line in table), table
    prior, hashed, state = table[1].split()[1:]
    assert prior.startswith("hf-hub:org/") and prior.endswith("…")
    assert hashed.startswith("0123") and hashed.endswith("cdef") and "…" in hashed
    assert state == "-"
    assert f"prior of shard 0: {rows[0]['prior']}" in legend and f"fingerprint of shard 0, 1: {fingerprint}" in legend


def test_a_table_that_fits_is_left_whole():
    rows = [{"shard": 0, "prior": "ViT-S-32 (random init, seed 0)"}]
    lines = format_table(rows, [Column("shard"), Column("prior", elide="end")])
    assert lines == ["shard  prior", "0      ViT-S-32 (random init, seed 0)"]


def test_json_output_is_one_document_and_draws_no_bar(capsys):
    out = Output(as_json=True)
    out.info("a note")
    with out.bar(3, "encoding", unit="img") as bar:
        bar.update(3)
    out.table([{"shard": 0}], [Column("shard")], message="title", key="shards", repo="org/x")
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"repo": "org/x", "shards": [{"shard": 0}]}
    assert captured.err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_people_get_the_message_and_a_bar_on_a_terminal(capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = Output()
    with out.bar(3, "encoding", unit="img") as bar:
        bar.update(3)
    out.result("Done.", repo="org/x")
    assert capsys.readouterr().out == "Done.\n"
    drawn = terminal.getvalue()
    assert "encoding:" in drawn and "0/3" in drawn and "img/s" in drawn


def test_no_bar_clutters_a_log(capsys):
    with Output().bar(3, "encoding", unit="img") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
