"""A participant's job: label a shard with a prior, align it, push it."""
