"""huggingface_hub's own tests against the embedded hub: the conformance harness (issue 12).

    .venv/bin/python tests/hf_conformance/harness.py [--workers N] [-k EXPR]
    .venv/bin/python -m pytest -m slow tests/test_hf_conformance.py   # the same, asserting the pass rate

The tests come from the sdist of the installed huggingface_hub, fetched at run time with
`pip download` (none of them is kept in this repo; COOPT_HUB_HF_SDIST may name a local copy of the
sdist instead). The sdist ships no tests/conftest.py although its tests import one, so
sdist_conftest.py becomes theirs. A hub started here on a temporary root knows the tokens of the
test users (USER, OTHER_USER and the enterprise admin of testing_constants), and HF_ENDPOINT
points every client at it. What runs is the fixed list in selection.txt: every test of the seven
files there that talks to a server, less the excluded ones, each listed with its reason.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from coopt_hub.server import HubServer
from coopt_hub.server.access import Grant

HERE = Path(__file__).resolve().parent
SELECTION = HERE / "selection.txt"
SDIST_ENV = "COOPT_HUB_HF_SDIST"
REQUIRED_PASS_RATE = 0.9
TEST_TIMEOUT_S = 120


@dataclass(frozen=True)
class Selection:
    """selection.txt: the huggingface_hub version it was made for, the tests to run, and the
    excluded ones with their reasons."""

    version: str
    run: list[str]
    excluded: dict[str, str]

    @classmethod
    def load(cls, path: Path = SELECTION) -> Selection:
        hub_version, run, excluded = "", [], {}
        for line in path.read_text().splitlines():
            kind, _, rest = line.strip().partition(" ")
            if kind == "version":
                hub_version = rest.strip()
            elif kind == "run":
                run.append(rest.strip())
            elif kind == "exclude":
                node, _, reason = rest.partition(" -- ")
                excluded[node.strip()] = reason.strip()
        return cls(hub_version, run, excluded)


@dataclass
class Outcome:
    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # node id -> first line of the failure

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed)

    @property
    def rate(self) -> float:
        return len(self.passed) / self.total if self.total else 0.0

    def summary(self) -> str:
        lines = [f"{len(self.passed)}/{self.total} passed ({self.rate:.1%})"]
        lines += [f"FAILED {node}: {reason}" for node, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def fetch_tests(workdir: Path) -> Path:
    """The sdist's tests/ as a package under `workdir`, with our conftest.py; returns that folder."""
    sdist = os.environ.get(SDIST_ENV) or _download_sdist(workdir)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and "/tests/" in m.name]
        archive.extractall(workdir / "sdist", members=members, filter="data")
    [source] = (workdir / "sdist").glob("*/tests")
    tests = workdir / "tests"
    shutil.copytree(source, tests)
    (tests / "__init__.py").touch()  # the tests import their helpers relatively
    shutil.copy(HERE / "sdist_conftest.py", tests / "conftest.py")
    return tests


def _download_sdist(workdir: Path) -> Path:
    installed = version("huggingface_hub")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", f"huggingface_hub=={installed}", "--no-binary",
                        ":all:", "--no-deps", "--quiet", "--dest", str(workdir)], check=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"pip could not download the sdist of huggingface_hub {installed} ({err}); without "
                           f"access to the package registry, set {SDIST_ENV} to a local copy of it.") from None
    [sdist] = workdir.glob("huggingface_hub-*.tar.gz")
    return sdist


def hub_users(tests: Path) -> dict[str, Grant]:
    """The tokens of the accounts testing_constants names, read from the sdist's own file (so they
    are whatever that version's tests send), and what each may do."""
    constants = {}
    for node in ast.parse((tests / "testing_constants.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            constants[node.targets[0].id] = node.value.value
    # On the Hub each test user deletes its repos, changes their visibility and moves their tags:
    # an admin here, on a hub it shares with the other test users only.
    return {constants[token]: Grant(constants[user], "admin") for token, user in (
        ("TOKEN", "USER"), ("OTHER_TOKEN", "OTHER_USER"), ("ENTERPRISE_TOKEN", "ENTERPRISE_USER"))}


def run_selection(selection: Selection, workdir: Path, workers: int = 0, keyword: str | None = None) -> Outcome:
    """Start a hub for the test users, run the selected tests against it, and collect the outcome."""
    installed = version("huggingface_hub")
    if installed != selection.version:
        raise RuntimeError(f"{SELECTION.name} lists the tests of huggingface_hub {selection.version}, but "
                           f"{installed} is installed: update the list for this version.")
    tests = fetch_tests(workdir)
    with HubServer(workdir / "hub", tokens=hub_users(tests)) as hub:
        report = workdir / "report.xml"
        _pytest(selection.run, tests, _client_env(hub.env(), workdir), report, workers, keyword)
        return _outcome(report, selection.run, keyword is None)


def _client_env(hub_env: dict[str, str], workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "PYTEST_")) and key != "COOPT_HUB_HOME"}
    env.update(hub_env)
    env.update({"HF_TOKEN": "", "HF_HOME": str(workdir / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DISABLE_SYMLINKS_IN_WINDOWS_TESTS": "1"})
    return env


def _pytest(nodes: Sequence[str], tests: Path, env: dict[str, str], report: Path, workers: int,
            keyword: str | None) -> None:
    args_file = tests.parent / "selected.txt"
    args_file.write_text("\n".join(f"tests/{node}" for node in nodes) + "\n")
    command = [sys.executable, "-m", "pytest", f"@{args_file}", "-c", os.devnull, "--rootdir", str(tests.parent),
               "-p", "no:cacheprovider", "-q", "--tb=short", "-W", "ignore", f"--timeout={TEST_TIMEOUT_S}",
               f"--junitxml={report}", "-o", "junit_family=xunit1"]
    if workers:
        command += ["-n", str(workers)]
    if keyword:
        command += ["-k", keyword]
    subprocess.run(command, cwd=tests.parent, env=env, check=False)


def _outcome(report: Path, nodes: Sequence[str], complete: bool) -> Outcome:
    """Each selected test's result from the JUnit report; a selected test that did not run (a
    missing node id, an import error) counts as failed, unless a -k filter left it out."""
    results: dict[str, str | None] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        node, problem = _node_id(case), _problem(case)
        if problem is not None or node not in results:  # a teardown error adds a second entry
            results[node] = problem
    outcome = Outcome()
    for node in nodes:
        if node not in results and not complete:
            continue
        problem = results.get(node, "did not run")
        if problem is None:
            outcome.passed.append(node)
        else:
            outcome.failed[node] = problem
    return outcome


def _node_id(case: ElementTree.Element) -> str:
    """`test_hf_api.py::TestX::test_y` from classname `tests.test_hf_api.TestX` and name `test_y`."""
    module, _, cls = case.get("classname", "").removeprefix("tests.").partition(".")
    return "::".join(part for part in (f"{module}.py", cls, case.get("name")) if part)


def _problem(case: ElementTree.Element) -> str | None:
    """None for a pass; else the first line of the failure, error or skip (a skip is no pass)."""
    for child in case:
        if child.tag in ("failure", "error", "skipped"):
            first = (child.get("message") or child.tag).strip().splitlines()[:1]
            return ("skipped: " if child.tag == "skipped" else "") + (first[0][:300] if first else child.tag)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (0: run in one process)")
    parser.add_argument("-k", dest="keyword", help="only the selected tests matching this pytest -k expression")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hf-conformance-") as workdir:
        outcome = run_selection(Selection.load(), Path(workdir), args.workers, args.keyword)
    print(outcome.summary())
    return 0 if outcome.rate >= REQUIRED_PASS_RATE else 1


if __name__ == "__main__":
    sys.exit(main())
