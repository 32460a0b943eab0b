"""`coopt-hub merge`: check every shard, align all targets to the best prior, publish vN on main."""

from coopt_hub.platform.merge.commit import MergeResult
from coopt_hub.platform.merge.run import merge

__all__ = ["MergeResult", "merge"]
