"""A web chat with the fine-tuned model (Gradio): streamed answers, the model and revision shown, a medical
disclaimer, example questions, and a side-by-side mode that streams the base model's answer beside it.

    medtune ui --adapter models/adapter            # then open http://127.0.0.1:7860
    medtune ui --model models/merged --exp my-exp --port 7861

Loads models like `medtune chat` (same options, same prompt template as training); the base
model for the side-by-side mode is loaded too unless --no-compare. Each question is answered on its own,
as in training: earlier turns stay on screen but are not sent to the model. Runs offline: no analytics, no share link, system fonts.
"""

from __future__ import annotations

import logging
import os
from itertools import zip_longest
from pathlib import Path

import click

from medtune.assistant import (
    DISCLAIMER,
    Answer,
    ChatModel,
    Limits,
    RequestError,
    limit_options,
    load_base,
    load_tuned,
    model_folder,
    trust_option,
)
from medtune.console import cli_errors, setup_logging

log = logging.getLogger("medtune.ui")


EXAMPLES = ("What are the symptoms of glaucoma ?", "How is high blood pressure treated ?", "Is cystic fibrosis inherited ?")


def build(tuned: ChatModel, base: ChatModel | None, cp: Limits, examples: list[str]):
    import gradio as gr

    def respond(question: str, hist_tuned: list, hist_base: list, side_by_side: bool):
        try:
            answers = [Answer(tuned, question, cp)] + ([Answer(base, question, cp)] if base and side_by_side else [])
        except RequestError as e:
            raise gr.Error(str(e)) from None
        hists = [hist_tuned, hist_base]
        for h in hists[: len(answers)]:
            h += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield "", hist_tuned, hist_base
        for pieces in zip_longest(*answers):  # both streams advance together
            for h, piece in zip(hists, pieces):
                if piece:
                    h[-1]["content"] += piece
            yield "", hist_tuned, hist_base
        for h, a in zip(hists, answers):
            if a.finish_reason == "length":
                h[-1]["content"] += f" … [stopped at {a.max_new_tokens} tokens]"
        yield "", hist_tuned, hist_base

    with gr.Blocks(title="medtune chat") as demo:
        gr.Markdown(f"# medtune chat\n**Model:** {tuned.label}" + (f"  \n**Side by side with:** {base.label}" if base else ""))
        gr.Markdown(f"⚠️ **Medical disclaimer.** {DISCLAIMER}", elem_id="disclaimer")
        side = gr.Checkbox(label="Side by side with the base model", value=False, visible=base is not None, elem_id="side-by-side")
        with gr.Row():
            tuned_box = gr.Chatbot(label="Fine-tuned", elem_id="tuned", height=380, buttons=["copy"])
            base_box = gr.Chatbot(label="Base model", elem_id="base", height=380, visible=False, buttons=["copy"])
        with gr.Row():
            question = gr.Textbox(label="Question", placeholder="Ask a medical question", elem_id="question", scale=5)
            ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
        gr.Examples([[q] for q in examples], inputs=question, label="Example questions")
        gr.Markdown("Each question is answered on its own with the prompt format used in training; earlier turns are "
                    "shown but not sent.")
        side.change(lambda on: gr.update(visible=on), side, base_box)
        for trigger in (ask.click, question.submit):
            trigger(respond, [question, tuned_box, base_box, side], [question, tuned_box, base_box])
    return demo


def theme():
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web-font download: the UI must work offline
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), help="a merged model folder")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="a LoRA adapter folder")
@click.option("--exp", help="take the folder from this DVC experiment or git revision instead of the workspace")
@click.option("--no-compare", is_flag=True, help="do not load the base model (no side-by-side mode)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--example", "examples", multiple=True, default=EXAMPLES, show_default=True,
              help="an example question shown under the chat box (repeat the option for several)")
@limit_options
@trust_option
def main(model_dir: Path | None, adapter: Path | None, exp: str | None, no_compare: bool, host: str, port: int,
         examples: tuple[str, ...], limits: Limits, trust_remote_code: bool) -> None:
    """Chat with the fine-tuned model in the browser."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    setup_logging()
    path = model_folder(model_dir, adapter, exp)
    with cli_errors(kept=False):
        tuned, m = load_tuned(path, adapter is not None, exp, trust_remote_code)
        base = None if no_compare else load_base(m, tuned.fmt)
    log.info("web UI on http://%s:%d (%s)", host, port, tuned.label)
    build(tuned, base, limits, list(examples)).queue().launch(server_name=host, server_port=port, share=False, show_error=True,
                                              theme=theme(), quiet=True)


if __name__ == "__main__":
    main()
