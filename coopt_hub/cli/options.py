"""The options several commands share, declared once (in the spirit of `hf`'s RepoIdArg, TokenOpt, ...).

REPO is positional, as in `hf` (`coopt-hub optimize [REPO] --shard 3 --push`); `--repo` stays
accepted for the scripts written before. Commands that work on a joined collaboration read a
missing REPO from COOPT_HUB_REPO, then from ./coopt-hub.json (`coopt-hub join`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import click

from coopt_hub.cli.output import Output


@dataclass
class Settings:
    """What holds for the whole command line, whichever command runs: set while parsing, read by the runner."""

    debug: bool = False


def _remember_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    # Only ever switch it on: the group's --debug must survive the command's own, unset, --debug.
    if value:
        ctx.ensure_object(Settings).debug = True


DEBUG_OPTION = click.Option(
    ["--debug"], is_flag=True, is_eager=True, expose_value=False, callback=_remember_debug,
    help="Show full tracebacks on errors (also COOPT_HUB_DEBUG=1).",
)


def accept_debug(command: click.Command) -> None:
    """Let --debug follow the command (`coopt-hub status X --debug`) as well as precede it."""
    if DEBUG_OPTION not in command.params:
        command.params.append(DEBUG_OPTION)
    for subcommand in getattr(command, "commands", {}).values():
        accept_debug(subcommand)


def _output(ctx: click.Context, param: click.Parameter, as_json: bool) -> Output:
    return Output(as_json)


json_option = click.option(
    "--json", "out", is_flag=True, callback=_output,
    help="Print one machine-readable JSON document on stdout; no progress bars.",
)
token_option = click.option(
    "--token", envvar="HF_TOKEN", default=None, help="Hub token (default: HF_TOKEN or the saved `hf auth login` token)."
)


def repo_argument(*, from_config: bool = True):
    """REPO (positional) or its alias --repo, passed on as `repo`.

    With `from_config`, a missing REPO comes from COOPT_HUB_REPO or the joined participant config;
    without, one of the two must be given.
    """
    alias_help = "The same as REPO, for scripts written before it was positional."
    if from_config:
        alias_help += " Without either: COOPT_HUB_REPO, else the repo of ./coopt-hub.json (`coopt-hub join`)."

    def decorate(command):
        @functools.wraps(command)
        def run(*args, repo_alias: str | None, **kwargs):
            kwargs["repo"] = _chosen_repo(kwargs["repo"], repo_alias, from_config)
            return command(*args, **kwargs)

        run = click.option("--repo", "repo_alias", default=None, metavar="REPO", help=alias_help)(run)
        return click.argument("repo", required=False, metavar="[REPO]" if from_config else "REPO")(run)

    return decorate


def _chosen_repo(positional: str | None, alias: str | None, from_config: bool) -> str:
    if positional and alias and positional != alias:
        raise click.UsageError(
            f"REPO ({positional}) and --repo ({alias}) name different repos; give the repo once.",
            ctx=click.get_current_context(silent=True),
        )
    given = positional or alias
    # A REPO on the command line wins, and then a broken config file is no reason to fail (nor
    # reading it, which imports torch, a reason to wait).
    if given:
        return given
    if not from_config:
        raise click.UsageError("Missing argument 'REPO'.", ctx=click.get_current_context(silent=True))
    from coopt_hub.participant.config import load_config, resolve_repo

    return resolve_repo(None, load_config())


def shard_option(help: str, *, multiple: bool = False):
    """--shard K: one required shard, or with `multiple` any number of them, passed on as `shards`."""
    if multiple:
        return click.option("--shard", "shards", type=click.IntRange(min=0), multiple=True, help=help)
    return click.option("--shard", type=click.IntRange(min=0), required=True, help=help)


def workdir_option(help: str):
    return click.option(
        "--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("coopt-hub-work"),
        show_default=True, envvar="COOPT_HUB_WORKDIR", help=help,
    )


batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass."
)
precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="auto", show_default=True,
    help="Precision the prior runs in. auto: bf16 on a GPU that has it and on a CPU with native bf16 "
         "(avx512_bf16, AMX), else fp32. Below fp32 each shard records its distance from fp32 on the anchors.",
)
compile_option = click.option(
    "--compile", "compile_prior", is_flag=True,
    help="Run the prior through torch.compile (compiled once per machine and cached; a model that cannot "
         "compile runs uncompiled, with a note).",
)


def device_option(default: str | None = None):
    """--device; without a `default`, the process's accelerator (see `coopt-hub optimize`) or the cpu."""
    fallback = default or "this process's accelerator, else cpu"
    return click.option("--device", default=default, help=f"Device the prior runs on: cpu, cuda, cuda:N, ... "
                                                          f"(default: {fallback}).")


def _use_weights_endpoint(ctx: click.Context, param: click.Parameter, endpoint: str | None) -> None:
    # The priors read it where they download (coopt_hub.priors.weights), in this process and in those
    # it starts; HF_ENDPOINT, the collaboration's hub, stays as it is.
    if endpoint:
        from coopt_hub.priors.weights import use_weights_endpoint

        use_weights_endpoint(endpoint)


weights_endpoint_option = click.option(
    "--weights-endpoint", envvar="COOPT_HUB_WEIGHTS_ENDPOINT", metavar="URL", expose_value=False,
    callback=_use_weights_endpoint,
    help="Hub to download the prior's published weights from (a mirror, or a `coopt-hub hub serve` holding "
         "them: `coopt-hub hub import-model`). Default: huggingface.co, whatever HF_ENDPOINT says.",
)

_PRIOR_OPTIONS = (
    click.option("--model", default=None,
                 help="The prior: an open_clip name (ViT-B-32, hf-hub:ORG/NAME) or BACKEND:NAME of another "
                      "backend (timm:NAME)."),
    click.option("--pretrained", default=None,
                 help="Pretrained weights tag of the model, e.g. openai or laion2b_s34b_b79k for open_clip."),
    click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="A local weights file for the model instead of a pretrained tag."),
    click.option("--image-size", type=click.IntRange(min=8), default=None,
                 help="Override the model's input size (px)."),
    weights_endpoint_option,
)


def prior_options(command):
    """--model, --pretrained, --checkpoint, --image-size: the options that choose a prior; and
    --weights-endpoint, where its published weights come from (set for the process, not passed on)."""
    for option in reversed(_PRIOR_OPTIONS):
        command = option(command)
    return command
