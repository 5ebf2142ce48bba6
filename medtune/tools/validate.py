"""`medtune validate`: check every section of params.yaml at once, before any stage does work.

    medtune validate      (exit 0 and "params.yaml: ok", or exit 1 listing every problem with its line)
"""

from __future__ import annotations

from pathlib import Path

import click

from medtune import params
from medtune.console import MedtuneError, cli_errors


def problems(path: Path) -> list[str]:
    """Every problem of a params file: the sections' own, and a chat template that does not exist."""
    from medtune.models import template_problem

    data, lines = params.read(path)
    found = params.check_all(data, lines, str(path))
    base = str((data.get("model") or {}).get("base", ""))
    if any("model.revision" in x for x in found) and Path(base).is_dir():  # the hash that pins a local folder
        from medtune.models import local_revision

        found.append(f"{path}: model.base {base!r}: pin it with model.revision: {local_revision(Path(base))}")
    if not found:
        from medtune.sources import location_problem

        m, f = params.load("model", "fetch", path=path)
        if (why := template_problem(m)) is not None:
            found.append(f"{path}:{lines.get(('model', 'chat_template'), '?')}: {why}")
        found += [f"{path}:{lines.get(('fetch', 'source'), '?')}: {why}" for s in [f, *f.mix] if (why := location_problem(s.source))]
    return found


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
def main(params_file: Path) -> None:
    """Check every section of params.yaml at once and list every problem."""
    with cli_errors(kept=False):
        found = problems(params_file)
        if found:
            raise MedtuneError("; ".join(found))
    click.echo(f"{params_file}: ok")


if __name__ == "__main__":
    main()
