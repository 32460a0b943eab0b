"""The scenario tables RELIABILITY.md counts: the faults tests/test_faults.py injects and the fuzzing
budgets of tests/test_server_fuzz.py.

They live here, not in those test modules, so that test_bad_inputs.py's check of the page reads
them without importing another test module.
"""

from __future__ import annotations

from dataclasses import dataclass

from network_faults import Strike

# The routes a fault strikes on, as the hub sees them.
LFS_UPLOAD = r"/info/lfs/objects/[0-9a-f]{64}\?"
COMMIT = r"^/api/datasets/[^/]+/[^/]+/commit/"
PREUPLOAD = r"^/api/datasets/[^/]+/[^/]+/preupload/"
REPORT_DOWNLOAD = r"/resolve/[^/]+/shards/\d+/report\.json$"


@dataclass(frozen=True)
class Fault:
    """One fault: a process's own COOPT_HUB_FAULT, or the proxy striking when the traffic reaches a point
    (with an action: kill the participant, kill the hub, or just cut the connection)."""

    name: str
    fault: str | None = None
    strike: Strike | None = None


# One participant, killed again and again: each run of the same command resumes from what the
# previous killed run left, and only the last one is allowed to finish.
OPTIMIZE_KILLS = [
    Fault("encoding: a batch encoded, its chunk not stored yet", fault="encode:3"),
    Fault("writing chunks: a chunk's data written, not its marker", fault="chunk-data:2"),
    Fault("upload: half of a shard file sent to the hub", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("commit: built, nothing sent yet", fault="commit:1"),
    Fault("commit: the hub committed, the participant never heard", strike=Strike("POST", COMMIT, "answered")),
]

# The hub process dies with SIGKILL while the participant pushes, and comes back on the same root
# after a second; the participant is never restarted: its retries carry the push through.
SERVER_KILLS = [
    Fault("hub killed while half of a shard file is uploaded", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("hub killed with the whole commit request in hand", strike=Strike("POST", COMMIT, "sent")),
]

# Calls made while the hub is down (connection refused) and comes back a second later.
OUTAGE_CALLS = ("commit", "read a file", "read a branch head")

NETWORK_CUTS = [
    Fault("preupload request sent, connection cut before the answer", strike=Strike("POST", PREUPLOAD, "sent")),
    Fault("connection cut halfway through a shard file upload", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("connection cut halfway through the commit request", strike=Strike("POST", COMMIT, "mid-body")),
    Fault("the hub committed, the answer was lost", strike=Strike("POST", COMMIT, "answered")),
    Fault("the branch's report downloaded, the answer was lost", strike=Strike("GET", REPORT_DOWNLOAD, "answered")),
]

# One collaboration, merged by a process that is killed again and again; main must not move until
# the merge commit, which lands whole; the last rerun finishes the job.
MERGE_KILLS = [
    Fault("after one shard was verified and aligned", fault="merge-shard:1"),
    Fault("upload: half of a merged file sent", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("commit: built, nothing sent yet", fault="commit:1"),
    Fault("between the merge commit and its tag", fault="merge-tag:1"),
]

RACERS = 3  # participants pushing while a merge runs

# Examples hypothesis draws per fuzzed property of the server.
FUZZ_EXAMPLES = {"structured requests": 400, "raw request bytes": 150, "commit payloads": 150}
