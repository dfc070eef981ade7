"""The structure rules of docs/ARCHITECTURE.md, held as tests: import direction, one owner for every
artefact name, and a tree that ruff (lint + format) accepts."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", _modules("tunegate") + _modules("demo"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_neither_stages_nor_flows(path):
    upward = {m for m in _imports(path) if _top(m) in ("stages", "flows")}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}: the library sits below stages and flows"


# What the demo may use of the library (docs/ARCHITECTURE.md, "Imports run downward only").
DEMO_MAY_IMPORT = {
    "tunegate.text",
    "tunegate.config",
    "tunegate.errors",
    "tunegate.io",
    "tunegate.paths",
    "tunegate.runtime",
    "tunegate.cli",
}


@pytest.mark.parametrize("path", _modules("tunegate"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_demo(path):
    upward = {m for m in _imports(path) if _top(m) == "demo"}
    assert not upward, f"{path.relative_to(ROOT)} imports {sorted(upward)}: the demo joins the CLI by entry point"


def test_the_demo_imports_only_what_the_architecture_allows():
    used = {m for path in _modules("demo") for m in _imports(path) if _top(m) == "tunegate"}
    assert used <= DEMO_MAY_IMPORT, f"the demo imports {sorted(used - DEMO_MAY_IMPORT)}: add to docs/ARCHITECTURE.md"
    text = (ROOT / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("demo ───►"))
    named = {
        f"tunegate{part.strip()}" if part.strip().startswith(".") else part.strip()
        for part in line.split("►")[1].split("(")[0].split(",")
    }
    assert named == DEMO_MAY_IMPORT, f"docs/ARCHITECTURE.md names {sorted(named)}"


@pytest.mark.parametrize("path", _modules("stages"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_stage_imports_another_stage(path):
    sideways = {m for m in _imports(path) if _top(m) in ("stages", "flows")}
    assert not sideways, f"{path.relative_to(ROOT)} imports {sorted(sideways)}: shared code belongs in tunegate/"


def test_flows_import_no_stage():
    for path in _modules("flows"):
        assert not {m for m in _imports(path) if _top(m) == "stages"}, path


def _artefact_names() -> set[str]:
    import tunegate.paths as paths

    names = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)}
    return names | {str(v) for k, v in vars(paths).items() if k.isupper() and isinstance(v, Path)}


# Names other tools own inside their folders (a DVC repo, a venv's bin/): not tunegate's to rename.
THIRD_PARTY = {".dvc", "cache", "dvc"}
OWNERS = [p for folder in ("stages", "flows") for p in _modules(folder)] + [
    ROOT / "tunegate/registry.py",
    ROOT / "tunegate/evaluation.py",
]


@pytest.mark.parametrize("path", OWNERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_artefact_names_are_spelled_only_in_tunegate_paths(path):
    """A file name inside a `paths:` folder is spelled once, in tunegate/paths.py: no stage, flow or the
    registry joins a path with a literal name (`folder / "verdict.json"`) or repeats one of its names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = _artefact_names()
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            literal = node.right.value if isinstance(node.right, ast.Constant) else None
            if isinstance(node.right, ast.JoinedStr) or (isinstance(literal, str) and literal not in THIRD_PARTY):
                problems.append(f"line {node.lineno}: path joined with a literal name")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value and node.value in names:
            problems.append(f"line {node.lineno}: {node.value!r} (use tunegate.paths)")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def _tag_names() -> set[str]:
    import tunegate.provenance as provenance

    return {v for k, v in vars(provenance).items() if k.isupper() and isinstance(v, str) and k != "PACKAGES"}


def _is_tags(node: ast.AST) -> bool:
    """`tags`, `t` (a version's tags in a loop), `x.tags`: what a provenance tag is read from."""
    return (isinstance(node, ast.Name) and node.id in ("tags", "t")) or (
        isinstance(node, ast.Attribute) and node.attr == "tags"
    )


TAG_WRITERS = {"set_tag", "set_tags", "set_model_version_tag", "delete_model_version_tag"}
TAG_USERS = [p for folder in ("stages", "flows", "tunegate") for p in _modules(folder) if p.name != "provenance.py"]


@pytest.mark.parametrize("path", TAG_USERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_provenance_tag_names_are_spelled_only_in_tunegate_provenance(path):
    """A version's tag is read and written through tunegate/provenance.py's constants: no `tags["gate_passed"]`,
    `v.tags.get("base_revision")`, `set_model_version_tag(..., "champion_check", ...)` or `tags={"registration": ...}`
    elsewhere."""
    names, problems = _tag_names(), []

    def literal(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        spelled: list[str | None] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in TAG_WRITERS:
                spelled += [literal(a) for a in node.args]
            elif node.func.attr == "get" and _is_tags(node.func.value) and node.args:
                spelled.append(literal(node.args[0]))
            for kw in node.keywords:
                if kw.arg == "tags" and isinstance(kw.value, ast.Dict):
                    spelled += [literal(k) for k in kw.value.keys if k is not None]
        elif isinstance(node, ast.Subscript) and _is_tags(node.value):
            spelled.append(literal(node.slice))
        problems += [f"line {node.lineno}: {name!r}" for name in spelled if name in names]
    assert not problems, f"{path.relative_to(ROOT)} spells tag names (use tunegate.provenance): " + "; ".join(problems)


def _ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("ruff is not installed (it is a dev dependency: `make setup` installs it)")
    return found


def test_ruff_lint_is_clean():
    proc = subprocess.run([_ruff(), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_format_is_clean():
    proc = subprocess.run([_ruff(), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_readme_layout_matches_the_tree():
    """Every folder the README's Layout section names exists, and every top-level source folder is named."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    named = {line.split()[0].rstrip("/") for line in block.splitlines() if line.strip() and "/" in line.split()[0]}
    assert named and all((ROOT / name).is_dir() for name in named), named
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"evals", "infra", "docs"}
    assert packages <= named, packages - named


def test_stage_modules_are_imported_from_this_checkout():
    """tests/ is a package, so `stages` is never shadowed by tests/stages nor taken from another checkout
    through an editable install shared by two clones."""
    import flows
    import stages
    import tunegate

    for package in (stages, flows, tunegate):
        assert Path(package.__file__).resolve().is_relative_to(ROOT), package.__file__
    from stages import train

    assert Path(train.__file__).resolve() == ROOT / "stages/train.py"


def test_architecture_names_every_library_module_and_only_those():
    """docs/ARCHITECTURE.md's module table matches tunegate/: a new module gets its row, a removed one loses it."""
    import re

    text = (ROOT / "docs/ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("### Library modules", 1)[1].split("\n## ", 1)[0]
    named = {
        m for row in table.splitlines() if row.startswith("| `") for m in re.findall(r"`(\w+\.py)`", row.split("|")[1])
    }
    present = {p.name for p in (ROOT / "tunegate").glob("*.py") if p.name != "__init__.py"}
    assert named == present, f"missing rows: {sorted(present - named)}; rows of no module: {sorted(named - present)}"


MAX_FUNCTION_LINES = 60
# Longer functions, each with the reason it reads better whole (a new entry needs a reason as good).
LONG_FUNCTIONS = {
    "tunegate/dedup_ray.py:near_duplicates_ray": "one Ray Data pipeline, its stages in the order they run",
    "demo/data.py:_domain_raw": "the demo's planted defects, one block per kind in the order of the DEFECTS ledger",
    "demo/model.py:build": "the demo base's recipe: tokenizer, config, pretraining loop, save, in that order",
}


def test_functions_fit_on_a_screen_or_say_why_not():
    """No function outside tests and benchmarks over 60 lines without a reason written in LONG_FUNCTIONS."""
    found = {}
    for folder in ("tunegate", "stages", "flows", "demo"):
        for path in _modules(folder):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    unexplained = {name: n for name, n in found.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, (
        f"functions over {MAX_FUNCTION_LINES} lines: {unexplained} (split, or say why in LONG_FUNCTIONS)"
    )
    stale = set(LONG_FUNCTIONS) - set(found)
    assert not stale, f"LONG_FUNCTIONS names functions that are short now (or gone): {sorted(stale)}"
