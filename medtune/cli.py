"""`medtune`: the one command a user types. Each subcommand lives in its own module and is imported only when
it runs, so `medtune --help` is quick and `medtune validate` needs no model libraries.

The pipeline's stages run through DVC (`dvc repro`, `dvc exp run`), which calls `python -m medtune.stages.<stage>`.
"""

from __future__ import annotations

import importlib

import click

COMMANDS = {  # name -> (module, one-line help)
    "chat": ("medtune.commands.chat", "Ask the fine-tuned model a question in the terminal, streamed."),
    "serve": ("medtune.commands.serve", "Serve the fine-tuned model over an OpenAI-compatible HTTP API."),
    "ui": ("medtune.commands.ui", "Chat with the fine-tuned model in the browser (Gradio)."),
    "summary": ("medtune.tools.summary", "The run in the workspace in one table: scores, checks, wall times, the model."),
    "compare": ("medtune.tools.compare", "Compare experiments: base, tuned and paired delta with CIs, and a plot."),
    "folds": ("medtune.tools.folds", "Leave-one-collection-out experiments: queue, list, compare across folds."),
    "check": ("medtune.tools.check", "CI gate on pulled artifacts: hashes, thresholds, lineage, answers."),
    "card": ("medtune.tools.card", "Print or write the model card of an adapter or merged model."),
    "push": ("medtune.tools.push", "Upload the adapter or merged model to the Hugging Face hub (or --dry-run)."),
    "recipe": ("medtune.tools.recipe", "Print a recipe file as `-S` flags for `dvc exp run`."),
    "validate": ("medtune.tools.validate", "Check every section of params.yaml at once."),
}
EXTRAS = {"serve": ("fastapi", "uvicorn"), "ui": ("gradio",)}  # the extra a command needs: pip install -e ".[serve]"


class LazyGroup(click.Group):
    """Lists the commands from COMMANDS and imports a command's module only when it is run or asked for help."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, short_help = COMMANDS[name]
        missing = [m for m in EXTRAS.get(name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise click.ClickException(f"`medtune {name}` needs {', '.join(missing)}: "
                                       f"pip install -e \".[{name}]\" (or pip install \"medtune[{name}]\")")
        command = importlib.import_module(module).main
        command.short_help = short_help
        return command

    def format_commands(self, ctx, formatter):  # the help list without importing every module
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup)
@click.version_option(package_name="medtune")
def main() -> None:
    """medtune: data-versioned LoRA fine-tuning for medical question answering.

    Run the pipeline with `dvc repro` (or `dvc exp run`); these commands use, compare and check its results."""


if __name__ == "__main__":
    main()
