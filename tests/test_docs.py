"""The README and docs/ stay usable: every relative link (and its #anchor) resolves, every `tunegate`
command shown in a shell block names a command and options that exist, every `make` target and
`python -m` module exists, and the README stays one read long."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "infra/README.md"]
README_MAX_LINES = 300
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(?:bash|sh|shell|console|text)?\n(.*?)```", re.S)
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+ )*(tunegate|make|python3? -m) [\w.-]")  # a diagram's arrows are not


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # `# comment` lines in code
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def shell_lines(page: Path) -> list[str]:
    """Commands (tunegate, make, python -m) of the code blocks, continuation lines joined, comments and
    prompts dropped, and of inline code spans."""
    text = page.read_text(encoding="utf-8")
    out = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if COMMAND.match(line):
                out.append(line)
    prose = FENCE.sub("", text)
    out += [span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span)]
    return out


def test_the_readme_is_one_read_and_links_every_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    linked = {target.split("#")[0] for target in LINK.findall("\n".join(lines))}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("gate-")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def _cli():
    from typer.main import get_command

    from tunegate.cli import load_plugins

    return get_command(load_plugins())  # with the demo's commands, added through their entry point


def _check_tunegate(words: list[str]) -> str | None:
    """None if `tunegate <words>` names a command and options the CLI has, else what is wrong."""
    command, args = _cli(), list(words)
    while hasattr(command, "commands") and args and not args[0].startswith("-"):  # a group: its subcommand
        name = args.pop(0)
        if name not in command.commands:
            return f"no command {name!r}"
        command = command.commands[name]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    options |= {"--help"}
    unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in options]
    return f"unknown options {unknown}" if unknown else None


def test_every_command_shown_in_the_docs_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    wrong, checked = [], 0
    for page in PAGES:
        for line in shell_lines(page):
            for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                try:
                    words = shlex.split(part)
                except ValueError:
                    continue
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the command
                    words.pop(0)
                if not words:
                    continue
                if words[0] == "tunegate":
                    problem = _check_tunegate(words[1:])
                elif words[0] == "make" and len(words) > 1 and "=" not in words[1]:
                    problem = None if words[1] in targets else f"no make target {words[1]!r}"
                elif words[0] in ("python", "python3") and len(words) > 2 and words[1] == "-m":
                    found = importlib.util.find_spec(words[2].split(".")[0]) and importlib.util.find_spec(words[2])
                    problem = None if found else f"no module {words[2]!r}"
                else:
                    continue
                checked += 1
                if problem:
                    wrong.append(f"{page.relative_to(ROOT)}: `{part}`: {problem}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 40, f"only {checked} commands found in the docs' shell blocks"
