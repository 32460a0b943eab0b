"""huggingface_hub's own tests, taken from its sdist, against the embedded hub (issue 12).

The slow test fetches the sdist of the installed huggingface_hub (the package registry must be
reachable, or COOPT_HUB_HF_SDIST name a local copy), starts its own hub on a temp dir, and runs the
fixed list of tests/hf_conformance/selection.txt; tests/hf_conformance/harness.py says how.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from hf_conformance.harness import REQUIRED_PASS_RATE, Selection, run_selection

# The seven test files of huggingface_hub whose server-facing tests the list covers.
FILES = ("test_hf_api.py", "test_file_download.py", "test_snapshot_download.py", "test_hf_file_system.py",
         "test_repocard.py", "test_commit_scheduler.py", "test_cache_layout.py")


def test_the_selection_is_for_the_installed_client_and_every_exclusion_has_a_reason():
    selection = Selection.load()
    assert selection.version == version("huggingface_hub")
    listed = selection.run + list(selection.excluded)
    assert len(listed) == len(set(listed)), "a test is listed twice"
    assert all(node.split("::")[0] in FILES for node in listed)
    assert {node.split("::")[0] for node in selection.run} == set(FILES)
    assert all(len(reason) > 20 for reason in selection.excluded.values())
    assert all(re.fullmatch(r"test_\w+\.py(::\w+)+(\[.*\])?", node) for node in listed)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_huggingface_hub_own_tests_pass_against_the_embedded_hub(tmp_path):
    outcome = run_selection(Selection.load(), tmp_path, workers=2)
    print(outcome.summary())
    assert outcome.total == len(Selection.load().run)
    assert outcome.rate >= REQUIRED_PASS_RATE, outcome.summary()
