"""Crash on purpose at a named point, so the reliability tests can prove that a rerun recovers.

COOPT_HUB_FAULT=STAGE:N makes the process kill itself with SIGKILL the N-th time it reaches STAGE
(N defaults to 1): no cleanup handler, `finally` block or buffered write runs, exactly as when a
machine loses power or the OOM killer strikes. Without the variable a call costs one lookup in
os.environ, so the points stay in production code.

The points sit where an interruption could leave work half done:
  encode       labeling: a batch went through the prior, its chunk is not stored yet
  chunk-data   labeling: a chunk's data file is written, its completion marker is not
  commit       hub: a commit's operations are built, nothing has been sent yet
  merge-shard  merge: a shard was downloaded, verified and aligned into the scratch targets file
  merge-tag    merge: main holds the merge commit, its version tag is not created yet
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections import Counter

ENV = "COOPT_HUB_FAULT"
STAGES = ("encode", "chunk-data", "commit", "merge-shard", "merge-tag")
_SETTING = re.compile(r"(?P<stage>[a-z-]+)(?::(?P<nth>[1-9][0-9]*))?")

_reached: Counter[str] = Counter()
_lock = threading.Lock()  # chunk writes reach their point from a writer thread


def reach(stage: str) -> None:
    """Count one arrival at `stage`; die here if COOPT_HUB_FAULT names this arrival."""
    setting = os.environ.get(ENV)
    if not setting:
        return
    match = _SETTING.fullmatch(setting.strip())
    if match is None or match["stage"] not in STAGES:
        # A typo would silently never fire and the test using it would prove nothing.
        raise ValueError(f"{ENV}={setting!r}: expected STAGE or STAGE:N with STAGE one of {', '.join(STAGES)}.")
    if match["stage"] != stage:
        return
    with _lock:
        _reached[stage] += 1
        arrivals = _reached[stage]
    if arrivals == int(match["nth"] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
