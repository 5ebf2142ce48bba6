"""Print a recipe file (a partial params.yaml) as `-S section.key=value` flags for `dvc exp run`, after
checking every key against params.yaml's schema. A recipe value replaces the whole params.yaml value,
mappings too (`fetch.columns`, `format.disclaimer`: a mapping is removed and set again, `~key +key={...}`).

Run as:  dvc exp run $(medtune recipe recipes/gpu.yaml)
  or, when a value holds spaces (the flags are then shell-quoted):
         eval "dvc exp run --queue $(medtune recipe recipes/medquad_llama32_1b.yaml)"
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import yaml

from medtune import params
from medtune.console import MedtuneError, cli_errors

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


def overrides(recipe: Path, params_file: Path = Path("params.yaml")) -> list[str]:
    data, _ = params.read(recipe)
    merged, _ = params.read(params_file)
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
    problems = params.check_all(merged, source=f"{params_file} + {recipe}")
    if problems:
        raise MedtuneError("; ".join(problems))
    return flags


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(recipe: Path) -> None:
    """Print RECIPE (a partial params.yaml) as `-S` flags for `dvc exp run`, after checking it."""
    with cli_errors(kept=False):
        click.echo(" ".join(shlex.quote(f) for f in overrides(recipe)))


if __name__ == "__main__":
    main()
