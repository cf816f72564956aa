"""The documentation matches the code: every shown ``wildreid`` command parses, every relative link resolves.

Each Markdown file (README.md and docs/*.md) is one test case. A command line is any line of a fenced code
block that invokes ``wildreid`` (directly, or as ``python -m wildreid`` / ``torchrun ... -m wildreid``),
joined with the lines it continues with a trailing backslash. It is checked in-process: ``--help`` of its
command must exit 0, and every ``--option`` the line uses must appear in that help text, so a documented
option that does not exist fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from wildreid.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "<", "&"}
OPTION = re.compile(r"^--[A-Za-z0-9][A-Za-z0-9-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
INVOKES = re.compile(r"(?:^|[\s/])wildreid(?:\s|$)")


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks, each continued line (trailing backslash) joined to the next."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if FENCE.match(raw):
            inside = not inside
            pending = ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def wildreid_args(line: str) -> list[str] | None:
    """The arguments after ``wildreid`` of a command line, up to a pipe, redirection or comment; None when
    the line does not invoke wildreid."""
    if not INVOKES.search(line):  # other lines (python, JSON, other tools) need not be shell words
        return None
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:  # an unbalanced quote: fine in code of another language, not in a command
        if line.startswith(("wildreid", ".venv/bin/wildreid")) or "-m wildreid" in line:
            raise AssertionError(f"cannot split documented line {line!r}: {exc}") from None
        return None
    for i, token in enumerate(tokens):
        direct = i == 0 and (token == "wildreid" or token.endswith("/wildreid"))
        module = token == "wildreid" and i > 0 and tokens[i - 1] == "-m"
        if direct or module:
            args = []
            for arg in tokens[i + 1 :]:
                if arg in SHELL_ENDS or arg.startswith((">", "2>")):
                    break
                args.append(arg)
            return args
    return None


def documented_commands(path: Path) -> list[list[str]]:
    return [args for line in code_lines(path.read_text(encoding="utf-8")) if (args := wildreid_args(line)) is not None]


def command_path(args: list[str]) -> list[str]:
    """The command (and subcommands) that ``args`` name: the leading words that are click commands."""
    group = typer.main.get_command(app)
    names = []
    for arg in args:
        commands = getattr(group, "commands", None)  # a group (typer's own class in recent typer)
        if not isinstance(commands, dict) or arg not in commands:
            break
        names.append(arg)
        group = commands[arg]
    return names


def used_options(args: list[str]) -> list[str]:
    return [m.group(0) for arg in args if (m := OPTION.match(arg.split("=", 1)[0]))]


RUNNER = CliRunner()
HELP: dict[tuple[str, ...], str] = {}


def help_text(names: list[str]) -> str:
    key = tuple(names)
    if key not in HELP:
        result = RUNNER.invoke(app, [*names, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
        assert result.exit_code == 0, f"wildreid {' '.join(names)} --help exited {result.exit_code}: {result.output}"
        HELP[key] = result.output
    return HELP[key]


def problems(args: list[str]) -> list[str]:
    """What is wrong with one documented command line: no such command, or options its help does not list."""
    names = command_path(args)
    if not names and args and not args[0].startswith("-"):
        return [f"{args[0]!r} is no wildreid command"]
    text = help_text(names)
    return [
        f"{option} is not in 'wildreid {' '.join(names)} --help'"
        for option in used_options(args)
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
    ]


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_documented_commands_parse(doc: Path):
    wrong = [f"wildreid {' '.join(args)}: {p}" for args in documented_commands(doc) for p in problems(args)]
    assert not wrong, f"{_id(doc)}:\n" + "\n".join(wrong)


def relative_links(text: str) -> list[str]:
    """Link targets of ``[text](path)`` and ``![alt](path)`` outside code, without http(s), mail and anchors."""
    prose, inside = [], False
    for raw in text.splitlines():
        if FENCE.match(raw):
            inside = not inside
            continue
        if not inside:
            prose.append(INLINE_CODE.sub("", raw))
    targets = []
    for target in LINK.findall("\n".join(prose)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path = target.split("#", 1)[0]
        if path:
            targets.append(path)
    return targets


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_resolve(doc: Path):
    missing = [t for t in relative_links(doc.read_text(encoding="utf-8")) if not (doc.parent / t).exists()]
    assert not missing, f"{_id(doc)}: links to missing files: {missing}"


def test_the_parser_sees_what_the_docs_show():
    """The extraction itself: continued lines, python -m / torchrun, pipes and comments, non-wildreid lines."""
    text = (
        "```bash\n"
        "wildreid train --shards s --store r \\\n"
        "    --set a.b=1 --json  # a comment\n"
        "torchrun --nnodes 2 -m wildreid train --shards s --store r\n"
        "wildreid search --gallery g --query q --json > out.jsonl\n"
        "python scripts/bench_mine.py --n 10\n"
        "```\n"
        "wildreid mine --store outside-a-block\n"
    )
    commands = [a for line in code_lines(text) if (a := wildreid_args(line)) is not None]
    assert commands == [
        ["train", "--shards", "s", "--store", "r", "--set", "a.b=1", "--json"],
        ["train", "--shards", "s", "--store", "r"],
        ["search", "--gallery", "g", "--query", "q", "--json"],
    ]
    assert used_options(commands[0]) == ["--shards", "--store", "--set", "--json"]
    assert command_path(commands[0]) == ["train"]
    assert problems(commands[0]) == []
    assert problems(["train", "--no-such-option", "1"]) == ["--no-such-option is not in 'wildreid train --help'"]
    assert problems(["search", "--device-budget", "1"]) != []  # an option of train, and longer than --device
    assert problems(["frobnicate", "--json"]) == ["'frobnicate' is no wildreid command"]
    assert documented_commands(ROOT / "README.md"), "README.md shows no wildreid command: the extraction broke"
    assert relative_links("[a](docs/x.md#y) ![b](p.png) [c](https://e.org) [d](#z) `[e](f.md)`") == [
        "docs/x.md",
        "p.png",
    ]
