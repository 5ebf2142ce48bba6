"""The Ollama Modelfile beside an exported GGUF (medtune/llamacpp.py): FROM the file, a TEMPLATE that renders a question
exactly as format renders it for training (the same bytes; Ollama adds BOS itself, as the GGUF's add_bos_token says),
SYSTEM (the trained system prompt, if any), the stop tokens, greedy decoding as evaluated, and the license and the
medical disclaimer. The template is the rendered prompt around the question, in the Go-template subset
`{{ if .System }}...{{ else }}...{{ end }}`, `{{ .System }}` and `{{ .Prompt }}`: single-turn, as the model was trained.
"""

from __future__ import annotations

from medtune.console import MedtuneError

QUESTION, SYSTEM = "MEDTUNE-QUESTION-MARKER", "MEDTUNE-SYSTEM-MARKER"


def modelfile(tok, fmt, stops: list[int], gguf_name: str, card: dict) -> str:
    """The Modelfile text for `gguf_name`, prompting as `fmt` renders a question with `tok`'s chat template."""
    from medtune.cards import DISCLAIMER
    from medtune.prompts import question_prompt

    def around(system: str) -> tuple[str, str]:
        parts = question_prompt(tok, fmt.model_copy(update={"system_prompt": system}), QUESTION).split(QUESTION)
        if len(parts) != 2:
            raise MedtuneError(f"Modelfile: the {fmt.template} layout does not render a question once")
        return parts[0], parts[1]

    plain, after = around("")
    with_system, after_system = around(SYSTEM)
    if after_system != after or with_system.count(SYSTEM) != 1:
        raise MedtuneError(f"Modelfile: the {fmt.template} layout puts the system prompt after the question")
    text = with_system + plain + after + fmt.system_prompt + "".join(tok.convert_ids_to_tokens(stops))
    if "{{" in text or '"""' in text or '"' in "".join(tok.convert_ids_to_tokens(stops)):
        raise MedtuneError('Modelfile: the prompt layout or a stop token holds {{ or a quote, which Ollama would parse')
    template = ("{{ if .System }}" + with_system.replace(SYSTEM, "{{ .System }}") + "{{ else }}" + plain
                + "{{ end }}{{ .Prompt }}" + after)
    lines = [f"# {card['name']}: Ollama Modelfile written by medtune's export stage (docs/export.md).",
             f"# Medical disclaimer: {DISCLAIMER}",
             f"# Single-turn: TEMPLATE renders one question exactly as training did ({fmt.template} layout).",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'SYSTEM """{fmt.system_prompt}"""'] if fmt.system_prompt else []
    lines += [f'PARAMETER stop "{t}"' for t in tok.convert_ids_to_tokens(stops)]
    lines += ["PARAMETER temperature 0", f'LICENSE """{card["license"]}: the base model\'s license, which these weights '
              f'inherit ({card.get("base_model") or "base model"}). {DISCLAIMER}"""']
    return "\n".join(lines) + "\n"
