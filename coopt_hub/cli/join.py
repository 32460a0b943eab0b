"""`coopt-hub join`: save this directory's participant config (the repo and the prior)."""

from __future__ import annotations

import click

from coopt_hub.cli.options import json_option, prior_options, repo_argument, token_option

EXAMPLES = """
\b
Examples:
  coopt-hub join org/digits-coopt --model ViT-B-32 --pretrained openai --name alice
  coopt-hub join org/digits-coopt --model RN50 --checkpoint ./rn50-finetuned.pt
  coopt-hub optimize --shard 3 --push        # then, in the same directory
"""


@click.command(epilog=EXAMPLES)
@repo_argument(from_config=False)
@prior_options
@click.option("--name", default=None, help="Your name or organisation, recorded in your shards' reports.")
@token_option
@json_option
def join(repo, model, pretrained, checkpoint, image_size, name, token, out):
    """Join the collaboration REPO with a prior: writes ./coopt-hub.json for the later commands.

    Checks that REPO holds a plan and lists the shards nobody has pushed yet.
    """
    from coopt_hub.core.layout import shard_branch
    from coopt_hub.errors import ConfigError
    from coopt_hub.hub.client import Hub
    from coopt_hub.hub.repo import load_plan
    from coopt_hub.participant.config import ParticipantConfig, save_config
    from coopt_hub.priors import PriorSpec

    if not model:
        raise ConfigError("join needs the prior's --model.",
                          hint="e.g. `coopt-hub join REPO --model ViT-B-32 --pretrained openai`.")
    hub = Hub(token=token)
    plan = load_plan(hub, repo)
    branches, _ = hub.refs(repo)
    free = [k for k in range(plan.num_shards) if shard_branch(k) not in branches]
    config = ParticipantConfig(
        repo=repo,
        prior=PriorSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size),
        name=name,
    )
    path = save_config(config)
    out.result(
        f"Joined {repo} ({plan.num_shards} shards; not pushed yet: {free or 'none'}). Saved {path}.\n"
        f"Next: coopt-hub optimize --shard {free[0] if free else 'K'} --push",
        repo=repo, config=str(path), prior=config.prior.to_dict(), name=name, num_shards=plan.num_shards,
        free_shards=free,
    )
