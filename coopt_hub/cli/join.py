"""`coopt-hub join`: save this directory's participant config (the repo and the prior)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import click

from coopt_hub.cli.options import json_option, prior_options, repo_argument, token_option

if TYPE_CHECKING:
    from coopt_hub.priors import PriorSpec

EXAMPLES = """
\b
Examples:
  coopt-hub join org/digits-coopt --model ViT-B-32 --pretrained openai --name alice
  coopt-hub join org/digits-coopt --model RN50 --checkpoint ./rn50-finetuned.pt
  coopt-hub join org/digits-coopt --model timm:resnet50 --pretrained a1_in1k --force   # replace the saved one
  coopt-hub optimize --shard 3 --push        # then, in the same directory
"""


@click.command(epilog=EXAMPLES)
@repo_argument(from_config=False)
@prior_options
@click.option("--name", default=None, help="Your name or organisation, recorded in your shards' reports.")
@click.option("--force", is_flag=True, help="Replace another participant config saved in this directory.")
@token_option
@json_option
def join(repo, model, pretrained, checkpoint, image_size, name, force, token, out):
    """Join the collaboration REPO with a prior: writes ./coopt-hub.json for the later commands.

    Checks that the prior's model and pretrained tag exist (nothing is downloaded) and that REPO
    holds a plan, and lists the shards nobody has pushed yet. Joining again with the same choices
    changes nothing; other choices replace the saved ones only with --force.
    """
    from coopt_hub.core.layout import shard_branch
    from coopt_hub.errors import ConfigError
    from coopt_hub.hub.client import Hub
    from coopt_hub.hub.repo import load_plan
    from coopt_hub.participant.config import ParticipantConfig, config_path, save_joined_config
    from coopt_hub.priors import PriorSpec

    if not model:
        raise ConfigError("join needs the prior's --model.",
                          hint="e.g. `coopt-hub join REPO --model ViT-B-32 --pretrained openai`.")
    spec = PriorSpec(model=model, pretrained=pretrained, checkpoint=checkpoint, image_size=image_size)
    validate_prior(spec)
    hub = Hub(token=token)
    plan = load_plan(hub, repo)
    branches, _ = hub.refs(repo)
    free = [k for k in range(plan.num_shards) if shard_branch(k) not in branches]
    config = ParticipantConfig(repo=repo, prior=spec, name=name)
    saved = save_joined_config(config, force=force)
    path = config_path()
    outcome = f"Saved {path}." if saved else f"{path} already holds this config; nothing changed."
    out.result(
        f"Joined {repo} ({plan.num_shards} shards; not pushed yet: {free or 'none'}). {outcome}\n"
        f"Next: coopt-hub optimize --shard {free[0] if free else 'K'} --push",
        repo=repo, config=str(path), saved=saved, prior=config.prior.to_dict(), name=name,
        num_shards=plan.num_shards, free_shards=free,
    )


def validate_prior(spec: PriorSpec) -> None:
    """Refuse a prior whose backend, model or pretrained tag does not exist, without building it.

    The backend's own rules come first (registry.check_spec). The built-in backends' checks do not
    look names up yet (open_clip does when it builds the model, timm when it loads it), so that part
    is done here; `hf-hub:` models exist only on a hub and are checked when they are loaded.
    """
    from coopt_hub.priors import check_spec
    from coopt_hub.priors.spec import split_model

    check_spec(spec)
    backend, name = split_model(spec.model)
    if backend == "open_clip" and ":" not in name:
        _check_open_clip_name(name, spec.pretrained)
    elif backend == "timm" and ":" not in name:
        from coopt_hub.priors.timm import _check_known, _timm_name

        _check_known(*_timm_name(spec))


def _check_open_clip_name(name: str, pretrained: str | None) -> None:
    import open_clip

    from coopt_hub.errors import PriorError
    from coopt_hub.priors.open_clip import LIST_MODELS

    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise PriorError(f"Unknown open_clip model {name!r}." + (f" Did you mean {', '.join(close)}?" if close else ""),
                         hint=f"List the valid names with: {LIST_MODELS}")
    if pretrained and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PriorError(f"{name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}.",
                         hint="Pick one of the tags, or pass your own weights with --checkpoint PATH.")
