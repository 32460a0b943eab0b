"""The command lines the project tells people to run, collected from where they are written, and
checked with the parsers of the programs that will read them.

Collected: every `coopt-hub ...`, `hf ...` and `accelerate launch ...` in backticks in a string
literal of the package (hints, errors, help; docstrings are for developers and left out), at the
start of a line of one (examples, "Next: coopt-hub ..."), and in README.md's code blocks and inline
code. An f-string's fields are read as the placeholder K.

Checked: a command line is parsed by its program's own parser without being run: click's
make_context for coopt-hub and for huggingface_hub's `hf` (a click application), accelerate's
argparse parser for `accelerate launch` (and what it starts with `-m coopt_hub`). A mention that
stops at the command's name (`coopt-hub init`, `hf auth login`) only has to name a command; anything
after the name must parse as a whole. Placeholders (REPO, ORG/NAME, K, DIR, ...) stand for values;
those that must be numbers or existing paths for the parser to accept them are given such values.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import click

FIELD = "K"  # what an f-string's {field} reads as
PROGRAMS = ("coopt-hub", "hf", "accelerate launch")
_BACKTICKED = re.compile(r"`((?:coopt-hub|hf|accelerate launch) [^`]*)`")
# At the start of a line, or after a label ("Next: coopt-hub ..."); a word right after the program
# (not "coopt-hub init: 3 shards", a commit message).
_LINE = re.compile(r"(?:^|:\s+)((?:coopt-hub|hf) [a-z][\w-]*(?:\s.*)?|accelerate launch\s.*)$")
NUMBERS = {"K": "3", "N": "2", "A": "8"}  # shard numbers, counts, anchors
FILES = {"PATH", "F", "FILE"}
DIRECTORIES = {"DIR"}


@dataclass(frozen=True)
class Mention:
    where: str  # file:line
    line: str  # the command line as written (fields read as K)


# Collecting ---------------------------------------------------------------------------------------


def commands_in(text: str) -> list[str]:
    """The command lines written in `text`: in backticks, or starting a line (continued with a backslash)."""
    found = _BACKTICKED.findall(text)
    for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
        match = _LINE.search(line.strip())
        if match:
            found.append(match.group(1))
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, owners) and node.body and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)}


def _string_literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, text) of each string literal, an f-string as one text with its fields read as FIELD."""
    inside_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    skipped = _docstrings(tree) | inside_fstrings
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and id(node) not in inside_fstrings:
            yield node.lineno, "".join(part.value if isinstance(part, ast.Constant) else FIELD for part in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            yield node.lineno, node.value


def package_mentions(package: Path) -> list[Mention]:
    mentions = []
    for path in sorted(package.rglob("*.py")):
        for lineno, text in _string_literals(ast.parse(path.read_text(encoding="utf-8"))):
            mentions += [Mention(f"{path.relative_to(package.parent)}:{lineno}", line) for line in commands_in(text)]
    return mentions


def readme_mentions(readme: Path) -> list[Mention]:
    """README's code lines (indented blocks; fenced blocks are Python) and its inline code."""
    text = readme.read_text(encoding="utf-8")
    mentions = [Mention(f"{readme.name} (inline)", line) for line in _BACKTICKED.findall(text)]
    fenced = False
    code = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    "):
            code.append((number, line))
    joined: list[tuple[int, str]] = []
    for number, line in code:
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + line.strip())
        else:
            joined.append((number, line.strip()))
    mentions += [Mention(f"{readme.name}:{number}", line) for number, line in joined if line and line[0] != "#"]
    return mentions


# Parsing ------------------------------------------------------------------------------------------


def invocations(line: str) -> list[list[str]]:
    """The program runs of a shell line (split at |, &&, >, ...) that start one of PROGRAMS, as argv."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    runs: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set("();<>|&"):
            runs.append([])
        else:
            runs[-1].append(token)
    found = []
    for run in runs:
        if run and os.path.basename(run[0]) in ("coopt-hub", "hf"):
            found.append([os.path.basename(run[0]), *run[1:]])
        elif run[:2] == ["accelerate", "launch"]:
            found.append(run)
    return found


def with_values(args: list[str], scratch: Path) -> list[str]:
    """`args` with synopsis brackets and "..." dropped, and placeholders given values a parser accepts.

    Paths a parser checks for existence (PATH, DIR, ./weights.pt) are made in `scratch`, the
    directory the line is parsed in: a line is judged on its syntax, not on this machine's files.
    """
    given = []
    for arg in args:
        arg = arg.strip("[]")
        if arg in ("...", ""):
            continue
        if arg in FILES or (arg.startswith("./") and Path(arg).suffix):
            (scratch / arg).parent.mkdir(parents=True, exist_ok=True)
            (scratch / arg).touch()
        elif arg in DIRECTORIES or arg.startswith("./"):
            (scratch / arg).mkdir(parents=True, exist_ok=True)
        given.append(NUMBERS.get(arg, arg))
    return given


def check_click(group: click.Group, prog: str, args: list[str]) -> None:
    """Raise click's UsageError unless `args` names a command of `group` and, if more follows, parses whole.

    Parsing runs option callbacks, and --weights-endpoint's sets an environment variable for the
    process: the environment is put back afterwards so a parsed line never reaches other tests."""
    with mock.patch.dict(os.environ):
        _parse_click(group, prog, args)


def _parse_click(group: click.Group, prog: str, args: list[str]) -> None:
    command, name, parent = group, prog, None
    while True:
        ctx = command.make_context(name, list(args), parent=parent)
        if not isinstance(command, click.Group):
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return  # the group named on its own
        if command.get_command(ctx, rest[0]) is None:
            # Asked to resolve an unknown name, hf's top level looks for (and may install) an extension of that name.
            raise click.exceptions.NoSuchCommand(rest[0], ctx=ctx)
        name, command, args = command.resolve_command(ctx, rest)
        if not args and not isinstance(command, click.Group):
            return  # the command named on its own
        parent = ctx


def check_accelerate(args: list[str]) -> list[str] | None:
    """Parse `accelerate launch ARGS` as accelerate does (AssertionError with its message if it cannot);
    returns the coopt-hub arguments when it starts `-m coopt_hub`."""
    from accelerate.commands.launch import launch_command_parser

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            parsed = launch_command_parser().parse_args(args)
        except SystemExit:
            raise AssertionError(errors.getvalue().strip().splitlines()[-1]) from None
    if parsed.module and parsed.training_script == "coopt_hub":
        return list(parsed.training_script_args)
    return None


def check_line(line: str, scratch: Path) -> None:
    """Parse every run of PROGRAMS in `line`, from `scratch`; click.UsageError or AssertionError says why not."""
    from huggingface_hub.cli.hf import app as hf

    from coopt_hub.cli import cli as coopt_hub

    for argv in invocations(line):
        args = with_values(argv[1:], scratch)
        if argv[0] == "accelerate":
            args = check_accelerate(args[1:])
            if args is None:
                continue
            argv = ["coopt-hub"]
        group = coopt_hub if argv[0] == "coopt-hub" else hf
        with contextlib.chdir(scratch), contextlib.redirect_stdout(io.StringIO()):
            try:
                check_click(group, argv[0], args)
            except click.exceptions.Exit:
                pass  # --help: shown, and a fine thing to tell people
