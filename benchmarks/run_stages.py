"""Run the stages of dvc.yaml in order with their exact commands, without DVC, after applying params
overrides to params.yaml. For machines where DVC cannot be installed (the lent GPU machine has no network).

Run as:  python benchmarks/run_stages.py [--recipe recipes/gpu.yaml] [--set train.quantization=4bit ...] [--only train,merge]
Each stage's wall time goes to stderr and to --times (JSON).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@click.command()
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, help="section.key=value (YAML value)")
@click.option("--only", default="", help="comma-separated stage names; default: all")
@click.option("--times", type=click.Path(dir_okay=False, path_type=Path))
def main(recipe: Path | None, sets: tuple[str, ...], only: str, times: Path | None) -> None:
    from medtune.params import check_all

    params = yaml.safe_load(Path("params.yaml").read_text())
    if recipe:
        for section, keys in yaml.safe_load(recipe.read_text()).items():
            params[section].update(keys)
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        params[section][name] = yaml.safe_load(value)
    problems = check_all(params)
    if problems:
        raise click.ClickException("; ".join(problems))
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    wanted = [s for s in only.split(",") if s] or list(stages)
    result = {}
    for name in wanted:
        t0 = time.perf_counter()
        click.echo(f"== stage {name}: {stages[name]['cmd']}", err=True)
        subprocess.run(stages[name]["cmd"], shell=True, check=True)
        result[name] = round(time.perf_counter() - t0, 1)
        click.echo(f"== stage {name}: {result[name]} s", err=True)
    if times:
        times.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
