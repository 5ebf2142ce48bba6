"""Recipe files (a partial params.yaml) as `-S section.key=value` flags for `dvc exp run`, checked against
params.yaml's schema first. A recipe value replaces the whole params.yaml value, mappings too (`fetch.columns`,
`format.disclaimer`: a mapping is removed and set again, `~key +key={...}`). `medtune recipe` prints them;
`medtune folds queue` queues them once per held-out source.

A recipe applies to the committed params.yaml (git's HEAD), not to whatever the workspace holds: a failed
`dvc exp run` leaves its `-S` values in params.yaml, and the next recipe run would silently inherit them. Keys
where the workspace differs from HEAD get flags that set them back (logged), unless the recipe sets them.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import yaml

from medtune import params
from medtune.console import MedtuneError

log = logging.getLogger("medtune.recipe")
PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")  # strings DVC's override grammar (Hydra's) reads as themselves


def override_value(value) -> str:
    """A value in the grammar of `dvc exp run -S` (Hydra overrides): strings quoted where they would be read
    as something else (a comma is a sweep, `null` is None, `1e-4` a number), lists as [..], mappings as {..}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if PLAIN.fullmatch(value) and isinstance(yaml.safe_load(value), str):
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    raise MedtuneError(f"cannot express {value!r} as a `dvc exp run -S` value")


def apply_recipe(recipe: Path, merged: dict) -> list[str]:
    """Sets the recipe's values in `merged` (params.yaml's sections, changed in place) and returns them as
    `-S` flags; nothing is checked yet."""
    data, _ = params.read(recipe)
    flags = []
    for section, keys in data.items():
        if not isinstance(keys, dict) or section not in merged:
            raise MedtuneError(f"{recipe}: {section}: not a params.yaml section")
        for key, value in keys.items():
            merged[section][key] = value
            if isinstance(value, dict):  # replace, not merge: keys the recipe leaves out must go
                flags += ["-S", f"~{section}.{key}", "-S", f"+{section}.{key}={override_value(value)}"]
            else:
                flags += ["-S", f"{section}.{key}={override_value(value)}"]
    return flags


def committed_params(params_file: Path = Path("params.yaml")) -> tuple[dict, list[str]]:
    """params_file as committed at git's HEAD, and the `-S` flags that turn the workspace's params back into it
    (none when they are the same, or outside a git repository or before the first commit: then the workspace's)."""
    work, _ = params.read(params_file)
    path = params_file.resolve()
    show = subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent, capture_output=True, text=True)
    if show.returncode != 0:
        return work, []
    try:
        head = yaml.safe_load(show.stdout)
    except yaml.YAMLError:
        return work, []
    if not isinstance(head, dict):
        return work, []
    flags, changed = [], []
    for section in head.keys() & work.keys():
        old, new = head[section], work[section]
        if not (isinstance(old, dict) and isinstance(new, dict)):
            continue
        for key in sorted(old.keys() | new.keys()):
            if key in old and key in new and old[key] == new[key]:
                continue
            changed.append(f"{section}.{key}")
            if key not in old:
                flags += ["-S", f"~{section}.{key}"]
            elif key not in new or isinstance(old[key], dict):
                flags += (["-S", f"~{section}.{key}"] if key in new else []) + ["-S", f"+{section}.{key}={override_value(old[key])}"]
            else:
                flags += ["-S", f"{section}.{key}={override_value(old[key])}"]
    head |= {section: work[section] for section in work.keys() - head.keys()}  # a section not committed yet
    if changed:
        log.warning("%s differs from the last commit in %s (a failed `dvc exp run` leaves its -S values there): "
                    "the recipe starts from the committed values", params_file, ", ".join(sorted(changed)))
    return head, flags


def recipe_flags(recipe: Path | None, params_file: Path = Path("params.yaml")) -> tuple[dict, list[str]]:
    """(the committed params with the recipe applied, the `-S` flags that make the workspace's params that):
    workspace keys the recipe does not set go back to their committed values."""
    merged, reset = committed_params(params_file)
    flags = apply_recipe(recipe, merged) if recipe is not None else []
    recipe_keys = {f.split("=", 1)[0].lstrip("~+") for f in flags[1::2]}
    kept = [f for pair in zip(reset[::2], reset[1::2]) if pair[1].split("=", 1)[0].lstrip("~+") not in recipe_keys
            for f in pair]
    return merged, kept + flags


def overrides(recipe: Path, params_file: Path = Path("params.yaml")) -> list[str]:
    """The recipe as `-S` flags on top of the committed params.yaml, after checking the result."""
    merged, flags = recipe_flags(recipe, params_file)
    problems = params.check_all(merged, source=f"{params_file} + {recipe}")
    if problems:
        raise MedtuneError("; ".join(problems))
    return flags


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def apply_set(merged: dict, assignment: str) -> list[str]:
    """Sets `section.key=value` (the value read as YAML, a number as dvc reads it) in `merged`; its `-S` flags."""
    key, sep, value = assignment.partition("=")
    path = key.split(".")
    if not sep or len(path) < 2 or path[0] not in merged:
        raise MedtuneError(f"--set {assignment}: expected section.key=value with a params.yaml section")
    node = merged
    for part in path[:-1]:
        node = node.setdefault(part, {})
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and NUMBER.fullmatch(parsed):  # 1e-4: a number to dvc (Hydra), a string to YAML 1.1
        parsed = float(parsed)
    node[path[-1]] = parsed
    return ["-S", assignment]
