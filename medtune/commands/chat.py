"""Ask the fine-tuned model a question from the terminal, streamed token by token; `--compare` also streams
the base model's answer to the same prompt. The `ui` and `serve` commands load and generate through the
functions here, so all three prompt the model exactly as training did.

    python -m medtune.commands.chat --model models/merged "What are the symptoms of glaucoma ?"
    python -m medtune.commands.chat --adapter models/adapter --compare "How is high blood pressure treated ?"
    python -m medtune.commands.chat --adapter models/adapter --exp my-exp      # no question: one per line from stdin

The model is a merged model folder (`--model`, from the merge stage) or base + LoRA adapter (`--adapter`,
from the train stage). `--exp` takes that folder from a DVC experiment (a name from `dvc exp show`) or any
git revision instead of the workspace: its files come from the DVC cache, nothing is checked out.
The prompt is built by the format stage's renderer with the chat template recorded in the folder's
run_config.json and the `format` params of the same revision. Reads params `chat` (generation knobs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from medtune.common import (
    MedtuneError,
    cli_errors,
    load_params,
    parse_section,
    read_params_file,
    setup_logging,
)
from medtune.stages.format import FormatParams, render
from medtune.modeling import (
    ModelParams,
    cache_dir,
    load_model,
    load_tokenizer,
    resolve_base,
    stop_token_ids,
)

log = logging.getLogger("medtune.chat")
DISCLAIMER = ("Not medical advice: answers come from a small research model and can be wrong or outdated. "
              "Consult a qualified clinician about any health question.")


@dataclasses.dataclass(frozen=True)
class ChatParams:
    max_new_tokens: int  # answer length when a request names none
    max_new_tokens_cap: int  # requests for more are refused
    max_prompt_tokens: int  # longer prompts are refused before generation
    temperature: float  # 0: greedy; > 0 samples
    top_p: float  # nucleus mass when sampling

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.max_new_tokens <= self.max_new_tokens_cap:
            out.append("max_new_tokens: must be >= 1 and <= max_new_tokens_cap")
        if self.max_prompt_tokens < 1:
            out.append("max_prompt_tokens: must be >= 1")
        if self.temperature < 0:
            out.append("temperature: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            out.append("top_p: must be in (0, 1]")
        return out


@dataclasses.dataclass(frozen=True)
class ServeParams:
    """params.yaml `serve:` (used by medtune/commands/serve.py). Kept here, beside ChatParams, so that checking params
    (`medtune.tools.validate`) needs no web framework."""

    max_request_bytes: int  # larger request bodies are refused with 413

    def problems(self) -> list[str]:
        return ["max_request_bytes: must be >= 1024"] if self.max_request_bytes < 1024 else []


class RequestError(MedtuneError):
    """A bad question or generation setting from the user (HTTP 400 in `serve`)."""


@dataclasses.dataclass
class ChatModel:
    label: str  # what users see: which model, which folder, which revision
    model: Any
    tok: Any
    fmt: FormatParams
    stops: list[int]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one generation at a time


# ---------------------------------------------------------------- loading


def from_revision(path: Path, rev: str, repo_dir: Path = Path(".")) -> tuple[Path, dict, str]:
    """A local copy of DVC-tracked `path` as of experiment or git revision `rev`, with that revision's
    params.yaml and commit sha. Files come from the DVC cache through dvc.api; copies are kept under
    $MEDTUNE_CACHE/revs/<sha>/ and reused."""
    import yaml
    from dvc.api import DVCFileSystem
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import resolve_name

    try:
        repo = Repo(str(repo_dir))
    except Exception as e:
        raise MedtuneError(f"--exp {rev}: {repo_dir.resolve()} is not a DVC repository ({type(e).__name__})") from None
    try:
        ref = resolve_name(repo.scm, [rev]).get(rev)
        sha = repo.scm.get_ref(str(ref)) if ref else repo.scm.resolve_rev(rev)
    except Exception as e:
        raise MedtuneError(f"--exp {rev}: not an experiment (see `dvc exp show`) or a git revision ({type(e).__name__}: {e})") from None
    fs = DVCFileSystem(str(repo_dir), rev=sha)
    key = path.as_posix().strip("/")
    if not fs.isdir(key):
        raise MedtuneError(f"--exp {rev} ({sha[:7]}): no folder {key} in that revision")
    params = yaml.safe_load(fs.read_text("params.yaml"))
    dest = cache_dir() / "revs" / sha / key
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            fs.get(key, str(tmp / "d"), recursive=True)
            os.replace(tmp / "d", dest)
        except FileNotFoundError as e:
            raise MedtuneError(f"--exp {rev} ({sha[:7]}): {key} is not in the DVC cache ({e}); `dvc pull` it first") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, params, sha


def section(raw: dict, name: str, cls: type, where: str):
    obj, problems = parse_section(raw.get(name), name, cls)
    if problems:
        raise MedtuneError(f"{where}: " + "; ".join(problems))
    return obj


def load_tuned(path: Path, adapter: bool, exp: str | None = None) -> tuple[ChatModel, ModelParams]:
    """The fine-tuned model: a merged folder, or base + adapter merged in memory (faster generation)."""
    if exp is None:
        local, params, where = path, read_params_file(), f"{path} (workspace)"
    else:
        local, params, sha = from_revision(path, exp)
        where = f"{path} @ {exp} ({sha[:7]})"
    rc_file = local / "run_config.json"
    if not rc_file.exists():
        raise MedtuneError(f"{path}: no run_config.json (a folder written by the train or merge stage is expected)")
    rc = json.loads(rc_file.read_text())
    m = section(rc.get("params", {}), "model", ModelParams, str(rc_file))
    fmt = section(params, "format", FormatParams, f"params.yaml of {where}")
    if adapter:
        from peft import PeftModel

        if not (local / "adapter_model.safetensors").exists():
            raise MedtuneError(f"{path}: no adapter_model.safetensors (run the train stage)")
        base_path, _ = resolve_base(m)
        try:
            model = PeftModel.from_pretrained(load_model(base_path, m), local).merge_and_unload()
        except Exception as e:
            raise MedtuneError(f"{path}: could not load the adapter on {m.base} ({type(e).__name__}: {e})") from None
        tok = load_tokenizer(base_path, m)
    else:
        if not (local / "config.json").exists():
            raise MedtuneError(f"{path}: no config.json (a merged model folder from the merge stage is expected)")
        model, tok = load_model(local, m), load_tokenizer(local, m)
    base_name = rc.get("base_model", {}).get("base", m.base)
    label = f"fine-tuned {base_name}: {'adapter' if adapter else 'merged model'} {where}"
    return ChatModel(label, model.eval(), tok, fmt, stop_token_ids(tok, model)), m


def load_base(m: ModelParams, fmt: FormatParams) -> ChatModel:
    """The base model the adapter was trained on, prompted with the same template, for comparisons."""
    base_path, identity = resolve_base(m)
    model, tok = load_model(base_path, m).eval(), load_tokenizer(base_path, m)
    return ChatModel(f"base {identity.get('base', m.base)} (not fine-tuned)", model, tok, fmt, stop_token_ids(tok, model))


# ---------------------------------------------------------------- generation


def prompt_for(cm: ChatModel, question: str) -> str:
    """The training prompt for one question: the format stage's renderer (its template, system prompt and
    chat template), up to where the answer starts."""
    return render(cm.tok, cm.fmt, {"id": "question", "question": question})[0]


class Answer:
    """A streamed answer. Checks the request when created (RequestError), generates in a thread when
    iterated (yielding text pieces), then holds `finish_reason` ("stop" or "length") and token counts."""

    def __init__(self, cm: ChatModel, question: str, cp: ChatParams, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None):
        if not question.strip():
            raise RequestError("the question is empty")
        self.max_new_tokens = cp.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= self.max_new_tokens <= cp.max_new_tokens_cap:
            raise RequestError(f"max_tokens must be between 1 and {cp.max_new_tokens_cap} (chat.max_new_tokens_cap), "
                               f"got {self.max_new_tokens}")
        self.temperature = cp.temperature if temperature is None else temperature
        self.top_p = cp.top_p if top_p is None else top_p
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise RequestError(f"temperature must be in [0, 2] and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        self.cm = cm
        self.enc = cm.tok(prompt_for(cm, question), return_tensors="pt")
        self.prompt_tokens = int(self.enc["input_ids"].shape[1])
        if self.prompt_tokens > cp.max_prompt_tokens:
            raise RequestError(f"the question is {self.prompt_tokens:,} prompt tokens, over chat.max_prompt_tokens "
                               f"({cp.max_prompt_tokens:,})")
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()  # set by cancel() or when the reader stops early: generation stops

    def cancel(self) -> None:
        """Stop generating at the next token (e.g. the HTTP client went away); safe from any thread."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import (
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        class Cancelled(StoppingCriteria):
            def __init__(self, event: threading.Event):
                self.event = event

            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

        cm = self.cm
        streamer = TextIteratorStreamer(cm.tok, skip_prompt=True, skip_special_tokens=True)
        kw = dict(**self.enc.to(cm.model.device), max_new_tokens=self.max_new_tokens, streamer=streamer,
                  eos_token_id=cm.stops, pad_token_id=cm.tok.pad_token_id, do_sample=self.temperature > 0)
        if self.temperature > 0:
            kw |= {"temperature": self.temperature, "top_p": self.top_p}
        kw["stopping_criteria"] = StoppingCriteriaList([Cancelled(self.cancelled)])
        result: dict = {}

        def work():
            try:
                result["ids"] = cm.model.generate(**kw)
            except BaseException as e:  # shown to the reader of the stream, not lost in the thread
                result["error"] = e
                streamer.end()

        with cm.lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                self.cancelled.set()
                thread.join()
        if "error" in result:
            raise MedtuneError(f"generation failed: {type(result['error']).__name__}: {result['error']}")
        new = result["ids"][0, self.prompt_tokens:].tolist()
        self.completion_tokens = len(new)
        self.finish_reason = "stop" if new and new[-1] in cm.stops else "length"


# ---------------------------------------------------------------- CLI


def ask(cm: ChatModel, question: str, cp: ChatParams, header: str | None) -> None:
    answer = Answer(cm, question, cp)
    if header:
        click.echo(header)
    for piece in answer:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if answer.finish_reason == "length":
        click.echo(f"[stopped at {answer.max_new_tokens} tokens (chat.max_new_tokens)]", err=True)


def model_folder(model_dir: Path | None, adapter: Path | None, exp: str | None) -> Path:
    """The one folder the --model / --adapter options name (the chat, ui and serve commands share them)."""
    if (model_dir is None) == (adapter is None):
        raise click.UsageError("give exactly one of --model (merged folder) or --adapter (adapter folder)")
    path = model_dir or adapter
    if exp is None and not path.is_dir():
        raise click.BadParameter(f"{path}: no such folder", param_hint="--model" if model_dir else "--adapter")
    return path


@click.command()
@click.argument("question", required=False)
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="a merged model folder (merge stage output), e.g. models/merged")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path),
              help="a LoRA adapter folder (train stage output), e.g. models/adapter; loaded on its base model")
@click.option("--exp", help="take the folder from this DVC experiment or git revision instead of the workspace")
@click.option("--compare", is_flag=True, help="also stream the base model's answer to the same prompt")
def main(question: str | None, model_dir: Path | None, adapter: Path | None, exp: str | None, compare: bool) -> None:
    """Answer QUESTION (or each line of stdin) with the fine-tuned model, streamed."""
    setup_logging()
    path = model_folder(model_dir, adapter, exp)
    with cli_errors():
        (cp,) = load_params(("chat", ChatParams))
        tuned, m = load_tuned(path, adapter is not None, exp)
        base = load_base(m, tuned.fmt) if compare else None
        click.echo(DISCLAIMER, err=True)
        for q in [question] if question is not None else (line.strip() for line in sys.stdin):
            if not q:
                continue
            ask(tuned, q, cp, f"── {tuned.label}" if base else None)
            if base:
                ask(base, q, cp, f"── {base.label}")


if __name__ == "__main__":
    main()
