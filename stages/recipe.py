"""Print a recipe file (a partial params.yaml) as `-S section.key=value` flags for `dvc exp run`, after
checking every key against params.yaml's schema.

Run as:  dvc exp run $(python -m stages.recipe recipes/gpu.yaml)
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.common import MedtuneError, cli_errors, read_params_file
from stages.validate import check_all


def overrides(recipe: Path, params_file: Path = Path("params.yaml")) -> list[str]:
    data = read_params_file(recipe)
    merged = read_params_file(params_file)
    flags = []
    for section, keys in data.items():
        if not isinstance(keys, dict) or section not in merged:
            raise MedtuneError(f"{recipe}: {section}: not a params.yaml section")
        for key, value in keys.items():
            merged[section][key] = value
            flags += ["-S", f"{section}.{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    problems = check_all(merged)
    if problems:
        raise MedtuneError(f"{recipe}: " + "; ".join(problems))
    return flags


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(recipe: Path) -> None:
    with cli_errors():
        click.echo(" ".join(overrides(recipe)))


if __name__ == "__main__":
    main()
