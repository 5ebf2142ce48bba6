"""The layout the architecture depends on: dvc.yaml's deps cover every package module a stage imports (and the
templates it reads), a stage imports no stage, commands and tools import no stage, and no module grows past the
size where it stops being one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PKG = REPO / "medtune"
TEMPLATES = "medtune/templates"


def module_file(name: str) -> Path | None:
    """medtune.a.b -> medtune/a/b.py (or the package's __init__.py); None outside the package."""
    if name != "medtune" and not name.startswith("medtune."):
        return None
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py" if path.is_dir() else None


def imports_of(path: Path) -> set[Path]:
    """The package modules a file imports anywhere in it (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from medtune import params`
        else:
            continue
        out |= {f for n in names if (f := module_file(n)) is not None and f.exists()}
    return out


def closure(path: Path) -> set[Path]:
    seen, todo = set(), [path]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += imports_of(f)
    return seen


def reads_templates(path: Path) -> bool:
    """Whether a module reads the chat templates (builds the path to medtune/templates)."""
    return '"templates"' in path.read_text()


def needed_deps(stage_module: Path) -> set[str]:
    files = {f for f in closure(stage_module) if f.name != "__init__.py"}
    deps = {f.relative_to(REPO).as_posix() for f in files}
    return deps | ({TEMPLATES} if any(reads_templates(f) for f in files) else set())


def stage_module(cmd: str) -> Path:
    module = next(w for w in cmd.split() if w.startswith("medtune.stages."))
    return module_file(module)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_deps_cover_every_module_and_template_a_stage_uses(name):
    stage = STAGES[name]
    missing = needed_deps(stage_module(stage["cmd"])) - set(stage["deps"])
    assert not missing, f"dvc.yaml stage {name} lacks deps {sorted(missing)}"


def test_the_deps_check_fails_when_a_template_dependency_is_removed():
    stage = STAGES["format"]
    assert TEMPLATES in needed_deps(stage_module(stage["cmd"]))
    assert needed_deps(stage_module(stage["cmd"])) - (set(stage["deps"]) - {TEMPLATES}) == {TEMPLATES}


def test_stages_commands_and_tools_import_no_stage():
    for folder in ("stages", "commands", "tools"):
        for f in (PKG / folder).glob("*.py"):
            stages = {i for i in imports_of(f) if i.parent.name == "stages" and i.name != "__init__.py"}
            assert not stages - {f}, f"{f.relative_to(REPO)} imports {sorted(s.name for s in stages)}"


LONGER = {  # module -> (limit, why)
    "params.py": (400, "one declarative pydantic model per params.yaml section: the whole schema reads best in one place"),
}


def test_modules_stay_small():
    """Stages about 200 lines at most, every other module about 300 (a little slack for a docstring)."""
    for f in PKG.rglob("*.py"):
        limit = 220 if f.parent.name == "stages" else LONGER.get(f.name, (330,))[0]
        n = len(f.read_text().splitlines())
        assert n <= limit, f"{f.relative_to(REPO)}: {n} lines (limit {limit}): split it by concern"
