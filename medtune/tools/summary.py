"""`medtune summary`: the run in the workspace in one short table (medtune/summary.py): base vs tuned ROUGE-L with
the paired delta and its CI, runaway answers, the merge check, each stage's wall time, where the model is. The
merge stage prints it when a run ends.

    medtune summary
"""

from __future__ import annotations

from pathlib import Path

import click

from medtune.summary import table


@click.command()
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def main(repo: Path) -> None:
    """The run in the workspace: scores, checks, wall times, where the model is."""
    click.echo(table(repo))


if __name__ == "__main__":
    main()
