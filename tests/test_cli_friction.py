"""A newcomer's command line without friction: Ctrl-C says how to continue, every command line the
project prints or documents parses, `join` checks the prior and keeps a saved config, an endpoint
that is not there fails in seconds naming its URL, a mistyped command gets a suggestion, and the
documented CPU launch starts the processes it says."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
import torch
from cli_run import run_main
from command_lines import check_line, package_mentions, readme_mentions
from network_faults import free_port

from coopt_hub.cli.runner import INTERRUPTED
from coopt_hub.core.layout import TARGETS_FILE, shard_prefix
from coopt_hub.errors import describe_error
from coopt_hub.hub.client import Hub, RetryPolicy

TESTS = Path(__file__).parent
ROOT = TESTS.parent
BIN = Path(sys.executable).parent
SMALL_ARGS = ["--model", "ViT-S-32", "--image-size", "32"]


@pytest.fixture(scope="module")
def collab(new_collaboration, small_source):
    """2 shards of 120 rows, each in 4 storage units (one chunk each) of 30 rows, and 32 anchors."""
    return new_collaboration(small_source, "friction", shards=2, anchors=32, dim=16)


# Ctrl-C ------------------------------------------------------------------------------------------------

# `coopt-hub` with one more prior backend: `slow:NAME` is the open_clip model NAME (the same
# outputs, fingerprint and recorded spec), slowed down so that Ctrl-C lands mid-encoding.
SLOW_CLI = """
import sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
from fakes import Slow
from coopt_hub.priors import load_prior, register_backend

def slow(spec, device, precision):
    inner = replace(spec, model=spec.model.partition(":")[2])
    return Slow(load_prior(inner, device, precision), seconds_per_batch=0.2)

register_backend("slow", slow)
from coopt_hub.cli import main
main(sys.argv[1:])
"""


def finished_chunks(workdir: Path) -> dict[str, int]:
    """Each finished chunk's name -> the mtime of its data file."""
    return {marker.stem: (marker.parent.parent / "chunks" / f"{marker.stem}.safetensors").stat().st_mtime_ns
            for marker in workdir.rglob("done/*.json")}


def assert_interrupted(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, f"exit code {process.returncode}, expected 130:\n{stderr[-3000:]}"
    assert INTERRUPTED in stderr, f"no resume note:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr[-3000:]
    return stderr


@pytest.mark.slow
def test_ctrl_c_mid_optimize_keeps_finished_chunks_and_a_rerun_gives_the_same_bytes(collab, tmp_path):
    workdir = tmp_path / "work"
    command = [sys.executable, "-c", SLOW_CLI.format(tests=str(TESTS)), "optimize", collab.repo, "--shard", "0",
               "--model", "slow:ViT-S-32", "--image-size", "32", "--batch-size", "10", "--workdir", str(workdir),
               "--json"]
    # CPU kernels split their sums by thread count: as many threads as the uninterrupted run here.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and job.poll() is None and not finished_chunks(workdir):
        time.sleep(0.02)
    assert job.poll() is None, "the job ended before Ctrl-C: " + job.communicate()[1][-2000:]
    job.send_signal(signal.SIGINT)
    assert_interrupted(job)
    finished = finished_chunks(workdir)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    chunks = summary["report"]["chunks"]
    assert 1 <= len(finished) < chunks["total"], f"Ctrl-C did not land mid-encoding: {len(finished)} chunks done"
    assert chunks == {"total": chunks["total"], "computed": chunks["total"] - len(finished),
                      "reused": len(finished)}, "the rerun did not continue from the finished chunks"
    assert {name: finished_chunks(workdir)[name] for name in finished} == finished, "a finished chunk was redone"

    uninterrupted = run_main(["optimize", collab.repo, "--shard", "0", *SMALL_ARGS, "--batch-size", "10",
                              "--workdir", str(tmp_path / "clean"), "--json"])
    assert uninterrupted.code == 0, uninterrupted.stderr
    clean = Path(json.loads(uninterrupted.stdout)["directory"])
    resumed = Path(summary["directory"])
    assert (resumed / shard_prefix(0) / TARGETS_FILE).read_bytes() == \
        (clean / shard_prefix(0) / TARGETS_FILE).read_bytes(), "other targets than an uninterrupted run"


def test_ctrl_c_while_waiting_for_the_hub_says_how_to_continue(tmp_path):
    # A hub that accepts the connection and never answers: the command is stuck until Ctrl-C.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        job = subprocess.Popen([str(BIN / "coopt-hub"), "status", "org/any"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        silent.settimeout(60)
        connection, _ = silent.accept()
        with connection:
            job.send_signal(signal.SIGINT)
            assert_interrupted(job)


# Every command line the project shows parses -----------------------------------------------------------

MENTIONS = package_mentions(ROOT / "coopt_hub") + readme_mentions(ROOT / "README.md")


def test_every_command_line_in_hints_help_and_the_readme_parses(tmp_path):
    broken = []
    for number, mention in enumerate(MENTIONS):
        scratch = tmp_path / str(number)
        scratch.mkdir()
        try:
            check_line(mention.line, scratch)
        except click.UsageError as err:
            broken.append(f"{mention.where}: `{mention.line}`: {err.format_message()}")
        except AssertionError as err:
            broken.append(f"{mention.where}: `{mention.line}`: {err}")
    assert not broken, "command lines that do not parse:\n" + "\n".join(broken)


def test_the_command_lines_are_collected_from_hints_examples_and_the_readme():
    lines = {(mention.where.split(":")[0], mention.line) for mention in MENTIONS}
    assert ("coopt_hub/errors.py", "coopt-hub status REPO") in lines, "a hint in backticks"
    assert ("coopt_hub/cli/optimize.py", "coopt-hub push K --shard K --workdir K") in lines, "an f-string"
    assert any(where == "coopt_hub/cli/join.py" and line.startswith("coopt-hub join org/digits-coopt --model RN50")
               for where, line in lines), "an example of a command's help"
    assert any(where.startswith("README.md") and line == f"{CPU_LAUNCH} --shard 3 --push" for where, line in lines), \
        "a README line continued with a backslash"


@pytest.mark.parametrize("line, error", [
    ("hf repos refs REPO", "No such command 'refs'"),
    ("coopt-hub stauts REPO", "No such command 'stauts'"),
    ("coopt-hub optimize --shard K --psuh", "No such option '--psuh'"),
    ("coopt-hub status REPO --json | jq . && coopt-hub merge REPO --images link", "'link' is not one of"),
    ("accelerate launch --cpux -m coopt_hub optimize --shard 3", "unrecognized arguments: --cpux"),
    ("accelerate launch --multi_gpu -m coopt_hub optimize --shard x", "'x' is not a valid integer"),
])
def test_a_command_line_that_does_not_parse_is_caught(line, error, tmp_path):
    with pytest.raises((click.UsageError, AssertionError)) as caught:
        check_line(line, tmp_path)
    text = caught.value.format_message() if isinstance(caught.value, click.UsageError) else str(caught.value)
    assert error in text


# join ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior, error, hint", [
    (("--model", "NotAModel"), r"Unknown open_clip model 'NotAModel'", "open_clip.list_models"),
    (("--model", "ViT-B-23"), r"Unknown open_clip model 'ViT-B-23'\. Did you mean .*ViT-B-32", "list_models"),
    (("--model", "ViT-B-32", "--pretrained", "openia"), r"ViT-B-32 has no pretrained tag 'openia'; known tags: openai",
     "--checkpoint"),
    (("--model", "timm:not_a_model"), r"Unknown timm model 'not_a_model'", "timm.list_pretrained"),
    (("--model", "timm:resnet18", "--pretrained", "no_such_tag"), r"resnet18 has no pretrained tag 'no_such_tag'",
     "--checkpoint"),
    (("--model", "nosuchbackend:net"), r"No prior backend 'nosuchbackend'", "entry point"),
])
def test_join_refuses_a_prior_that_does_not_exist_and_saves_nothing(collab, tmp_path, monkeypatch, prior, error, hint):
    monkeypatch.chdir(tmp_path)
    outcome = run_main(["join", collab.repo, *prior])
    assert outcome.code != 0, outcome.stderr
    assert re.search(rf"^Error: .*{error}", outcome.stderr, re.MULTILINE), outcome.stderr
    assert re.search(rf"^Next step: .*{re.escape(hint)}", outcome.stderr, re.MULTILINE), outcome.stderr
    assert not (tmp_path / "coopt-hub.json").exists(), "a config was saved"


@pytest.mark.parametrize("prior", [("--model", "ViT-B-32", "--pretrained", "openai"),
                                   ("--model", "timm:resnet18", "--pretrained", "a1_in1k")])
def test_join_accepts_published_weights_without_downloading_them(collab, tmp_path, monkeypatch, prior):
    # The weights live on huggingface.co, which this machine cannot reach: joining works because
    # nothing is downloaded before `optimize`.
    monkeypatch.chdir(tmp_path)
    outcome = run_main(["join", collab.repo, *prior, "--json"])
    assert outcome.code == 0, outcome.stderr
    assert json.loads((tmp_path / "coopt-hub.json").read_text())["prior"]["pretrained"] == prior[3]


def test_join_keeps_a_saved_config_unless_forced(collab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "coopt-hub.json"
    first = run_main(["join", collab.repo, *SMALL_ARGS, "--name", "alice", "--json"])
    assert first.code == 0 and json.loads(first.stdout)["saved"], first.stderr
    saved, written = config.read_bytes(), config.stat().st_mtime_ns

    again = run_main(["join", collab.repo, *SMALL_ARGS, "--name", "alice"])
    assert again.code == 0, again.stderr
    assert "nothing changed" in again.stdout, again.stdout
    assert (config.read_bytes(), config.stat().st_mtime_ns) == (saved, written), "the same join rewrote the config"

    other = run_main(["join", collab.repo, "--model", "ViT-M-32", "--name", "alice"])
    assert other.code == 2, other.stderr
    refusal = (r"^Error: .*coopt-hub\.json holds .* with --model ViT-S-32 --image-size 32 as alice; "
               r"this join asks for .* with --model ViT-M-32 as alice\.")
    assert re.search(refusal, other.stderr, re.MULTILINE), other.stderr
    assert re.search(r"^Next step: Pass --force", other.stderr, re.MULTILINE), other.stderr
    assert config.read_bytes() == saved, "another join replaced the config without --force"

    forced = run_main(["join", collab.repo, "--model", "ViT-M-32", "--name", "alice", "--force"])
    assert forced.code == 0, forced.stderr
    assert json.loads(config.read_text())["prior"]["model"] == "ViT-M-32", "--force did not replace the config"

    config.write_text('{"version": 1, "repo": ')
    broken = run_main(["join", collab.repo, *SMALL_ARGS])
    assert broken.code == 2 and "is not a valid participant config" in broken.stderr, broken.stderr
    assert config.read_text() == '{"version": 1, "repo": ', "a broken config was replaced without --force"
    assert run_main(["join", collab.repo, *SMALL_ARGS, "--force"]).code == 0
    assert json.loads(config.read_text())["prior"]["model"] == "ViT-S-32", "--force did not replace a broken config"


# Unreachable endpoints -------------------------------------------------------------------------------


def test_an_endpoint_with_nothing_listening_fails_within_5_seconds_naming_its_url(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    # The time spent on the closed port, measured in process: a command's own start-up (interpreter,
    # imports) is seconds on a loaded machine and is not waiting on the endpoint.
    started = time.monotonic()
    with pytest.raises(Exception) as refused:
        Hub(token="t", endpoint=endpoint).head("org/any")
    waited = time.monotonic() - started
    assert waited < 5, f"{waited:.1f} s to give up on a closed port"
    assert endpoint in str(refused.value) or endpoint in describe_error(refused.value)[1], refused.value
    # The command line says the same, with the URL and the next step.
    env = {**os.environ, "HF_ENDPOINT": endpoint}
    done = subprocess.run([str(BIN / "coopt-hub"), "status", "org/any"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert re.search(rf"^Error: Cannot connect to the Hub endpoint: .*\(HEAD {re.escape(endpoint)}\)$", done.stderr,
                     re.MULTILINE), done.stderr
    assert "Next step: Check HF_ENDPOINT" in done.stderr, done.stderr


def test_a_hub_still_binding_its_port_is_reached_and_a_later_refusal_names_the_url(tmp_path):
    from coopt_hub.server import HubServer

    port = free_port()
    client = Hub(token="t", endpoint=f"http://127.0.0.1:{port}")
    late = HubServer(tmp_path / "root", tokens=["t"], port=port)
    # Within the first contact's grace, a hub that starts a moment after the call is reached.
    threading.Timer(0.2, late.start).start()
    try:
        client.ensure_repo("org/late")
        assert client.head("org/late"), "no head read from the late hub"
    finally:
        late.stop()
    # Once it has answered, a refusal is a restart to wait for (here with a policy cut short).
    client.retry = RetryPolicy(attempts=3, base_seconds=0.01)
    with pytest.raises(Exception) as refused:
        client.head("org/late")
    code, message, _ = describe_error(refused.value)
    assert code == 5 and f"127.0.0.1:{port}/api/datasets/org/late" in message, message


# Did you mean ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, suggestion", [
    (["stauts"], "No such command 'stauts'. Did you mean 'status'?"),
    (["optimise", "--shard", "1"], "No such command 'optimise'. Did you mean 'optimize'?"),
    (["hub", "serv"], "No such command 'serv'. Did you mean 'serve'?"),
])
def test_a_mistyped_command_gets_the_closest_one(argv, suggestion):
    outcome = run_main(argv)
    assert outcome.code == 2, outcome.stderr
    assert f"Error: {suggestion}" in outcome.stderr, outcome.stderr


# accelerate on CPU -------------------------------------------------------------------------------------

CPU_LAUNCH = ("accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
              "--dynamo_backend no -m coopt_hub optimize")


@pytest.mark.slow
def test_the_documented_cpu_launch_starts_two_processes(collab, tmp_path):
    documented = [m.line for m in readme_mentions(ROOT / "README.md") if m.line.startswith(CPU_LAUNCH)]
    assert documented, f"README.md does not show `{CPU_LAUNCH} ...`"
    launcher = shlex.split(CPU_LAUNCH)
    # Its own port, so that the test runs beside others; everything else as documented.
    command = [str(BIN / "accelerate"), "launch", "--main_process_port", str(free_port()), *launcher[2:],
               collab.repo, "--shard", "1", *SMALL_ARGS, "--workdir", str(tmp_path), "--json"]
    # A machine without GPUs and without any variable set for the launch.
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)["report"]
    assert report["run"]["world_size"] == 2, "the documented line did not start 2 processes"
    assert report["counts"]["rows"] == len(collab.plan.shard_ids(1)), "the processes did not label the whole shard"
