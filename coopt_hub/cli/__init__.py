"""The `coopt-hub` command line: one thin module per command, loaded on first use."""

from __future__ import annotations

import importlib

import click

from coopt_hub import __version__
from coopt_hub.cli.options import DEBUG_OPTION, accept_debug
from coopt_hub.cli.runner import run_with_error_table

# command name -> "module:attribute"; modules are imported only when their command runs,
# so `coopt-hub --help` stays fast and a heavy dependency (torch) loads only where needed.
COMMANDS = {
    "demo": ("coopt_hub.cli.demo:demo", "Run the whole collaboration end to end on an embedded hub."),
    "hub": ("coopt_hub.cli.hub:hub", "Run the embedded Hub-compatible server."),
    "init": ("coopt_hub.cli.init:init", "Publish the plan: pinned source, shards, anchors."),
    "join": ("coopt_hub.cli.join:join", "Save this directory's participant config (repo, prior)."),
    "optimize": ("coopt_hub.cli.optimize:optimize", "Label a shard with a prior, align it, optionally push."),
    "prepare-source": ("coopt_hub.cli.prepare_source:prepare_source", "Republish a source sized for shards."),
    "push": ("coopt_hub.cli.push:push", "Push a finished local shard result to its branch."),
    "status": ("coopt_hub.cli.status:status", "Show every shard's state at a glance."),
    "merge": ("coopt_hub.cli.merge:merge", "Merge the shard branches into a versioned dataset on main."),
    "verify": ("coopt_hub.cli.verify:verify", "Re-encode a sample of a shard and check its targets."),
    "evaluate": ("coopt_hub.cli.evaluate:evaluate", "Measure a merged version's target quality without training."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[name][0].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        accept_debug(command)
        return command

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as err:
            # click draws its "Did you mean" from the commands a group holds, and ours are only named until used.
            raise click.exceptions.NoSuchCommand(err.command_name, possibilities=self.list_commands(ctx),
                                                 ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, params=[DEBUG_OPTION], context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coopt-hub")
def cli() -> None:
    """Collaborative data optimization on the Hugging Face Hub.

    A platform splits an unlabeled image dataset into shards (`init`); participants label their
    shard with their own prior model and push aligned targets (`optimize`); the platform merges
    the shards into a versioned dataset (`merge`) that any architecture trains on (recipes/).
    """


def main(argv: list[str] | None = None) -> None:
    run_with_error_table(cli, argv)
