"""Print a recipe file (a partial params.yaml) as `-S section.key=value` flags for `dvc exp run`, after
checking every key against params.yaml's schema (medtune/recipes.py: a recipe value replaces the whole
params.yaml value, mappings too). The recipe applies to the committed params.yaml: keys a failed experiment left
changed in the workspace are set back to their committed values by extra flags (a warning names them).

Run as:  dvc exp run $(medtune recipe recipes/gpu.yaml)
  or, when a value holds spaces (the flags are then shell-quoted):
         eval "dvc exp run --queue $(medtune recipe recipes/medquad_llama32_1b.yaml)"
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from medtune.console import cli_errors, setup_logging
from medtune.recipes import overrides


@click.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(recipe: Path) -> None:
    """Print RECIPE (a partial params.yaml) as `-S` flags for `dvc exp run`, after checking it."""
    setup_logging()
    with cli_errors(kept=False):
        click.echo(" ".join(shlex.quote(f) for f in overrides(recipe)))


if __name__ == "__main__":
    main()
