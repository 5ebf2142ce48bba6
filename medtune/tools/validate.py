"""Check every section of params.yaml at once, before any stage does work.

Run as:  python -m medtune.tools.validate      (exit 0 and "params.yaml: ok", or exit 1 listing every problem)
"""

from __future__ import annotations

from pathlib import Path

import click

from medtune.common import BaseParams, cli_errors, parse_section, read_params_file, MedtuneError


def sections() -> dict:
    from medtune.tools import card
    from medtune.commands import chat
    from medtune.tools import check
    from medtune.stages import clean
    from medtune.tools import compare
    from medtune.stages import evaluate
    from medtune.stages import fetch
    from medtune.stages import format
    from medtune.stages import merge
    from medtune.stages import report
    from medtune.stages import split
    from medtune.stages import train
    from medtune.commands import ui
    from medtune.modeling import ModelParams

    return {"base": BaseParams, "model": ModelParams, "fetch": fetch.FetchParams, "clean": clean.CleanParams,
            "split": split.SplitParams, "format": format.FormatParams, "train": train.TrainParams,
            "evaluate": evaluate.EvaluateParams, "merge": merge.MergeParams, "card": card.CardParams,
            "chat": chat.ChatParams, "serve": chat.ServeParams, "ui": ui.UIParams,
            "report": report.ReportParams, "compare": compare.CompareParams, "check": check.CheckParams}


def check_all(data: dict) -> list[str]:
    known = sections()
    problems = [f"{name}: unknown section (known: {', '.join(known)})" for name in data if name not in known]
    for name, cls in known.items():
        if name not in data:
            problems.append(f"{name}: missing section")
        else:
            problems += parse_section(data[name], name, cls)[1]
    return problems


@click.command()
@click.option("--params", "params_file", default="params.yaml", type=click.Path(dir_okay=False, path_type=Path))
def main(params_file: Path) -> None:
    with cli_errors():
        problems = check_all(read_params_file(params_file))
        if problems:
            raise MedtuneError(f"{params_file}: " + "; ".join(problems))
    click.echo(f"{params_file}: ok")


if __name__ == "__main__":
    main()
