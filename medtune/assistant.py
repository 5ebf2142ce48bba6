"""A trained model ready to answer questions one at a time: the `chat`, `ui` and `serve` commands load it from a
folder (the workspace's, or an experiment's), prompt it exactly as training did (prompts.question_prompt), and
stream its answer within limits, stopping at the tokens every stage stops at (models.stop_token_ids)."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, PositiveInt, model_validator

from medtune.console import MedtuneError
from medtune.models import (
    load_adapter,
    load_model,
    load_tokenizer,
    resolve_base,
    stop_token_ids,
)
from medtune.params import (
    STRICT,
    FormatParams,
    ModelParams,
    problems_of,
    section_problems,
)
from medtune.params import read as read_params
from medtune.prompts import question_prompt

log = logging.getLogger("medtune.assistant")
DISCLAIMER = ("Not medical advice: answers come from a small research model and can be wrong or outdated. "
              "Consult a qualified clinician about any health question.")


class Limits(BaseModel):
    """Generation settings of the commands (their options, not params.yaml: they change no pipeline output)."""
    model_config = STRICT
    max_new_tokens: PositiveInt  # answer length when a request names none
    max_new_tokens_cap: PositiveInt  # requests for more are refused
    max_prompt_tokens: PositiveInt  # longer prompts are refused before generation
    temperature: float  # 0: greedy; > 0 samples
    top_p: float  # nucleus mass when sampling

    @model_validator(mode="after")
    def _check(self):
        found = []
        if self.max_new_tokens > self.max_new_tokens_cap:
            found.append("max_new_tokens: must be <= max_new_tokens_cap")
        if not 0 <= self.temperature <= 2:
            found.append("temperature: must be in [0, 2] (0 is greedy)")
        if not 0 < self.top_p <= 1:
            found.append("top_p: must be in (0, 1]")
        problems_of(found)
        return self


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


def section(raw: dict, name: str, cls: type, where: str):
    obj, problems = section_problems(raw.get(name), name, cls, {}, where)
    if problems:
        raise MedtuneError("; ".join(problems))
    return obj


def load_tuned(path: Path, adapter: bool, exp: str | None = None, trust_remote_code: bool = False) -> tuple[ChatModel, ModelParams]:
    """The fine-tuned model: a merged folder, or base + adapter merged in memory (faster generation). A model
    folder is input from wherever it came from: it names its base model and template, but whether Python code
    shipped with a model may run is the user's own choice (`trust_remote_code`, their command line), never the
    folder's."""
    if exp is None:
        local, params, where = path, read_params()[0], f"{path} (workspace)"
    else:
        from medtune.experiments import from_revision

        local, params, sha = from_revision(path, exp)
        where = f"{path} @ {exp} ({sha[:7]})"
    rc_file = local / "run_config.json"
    if not rc_file.exists():
        raise MedtuneError(f"{path}: no run_config.json (a folder written by the train or merge stage is expected)")
    rc = json.loads(rc_file.read_text())
    m = section(rc.get("params", {}), "model", ModelParams, str(rc_file))
    if m.trust_remote_code and not trust_remote_code:
        log.warning("%s asks to run the model's own Python code (trust_remote_code); refused: pass --trust-remote-code "
                    "to allow it for a model you trust", rc_file)
    m = m.model_copy(update={"trust_remote_code": trust_remote_code})
    if trust_remote_code:
        log.warning("--trust-remote-code: Python code shipped with %s or its base model may run", path)
    fmt = section(params, "format", FormatParams, f"params.yaml of {where}")
    if adapter:
        if not (local / "adapter_model.safetensors").exists():
            raise MedtuneError(f"{path}: no adapter_model.safetensors (run the train stage)")
        base_path, _ = resolve_base(m)
        model = load_adapter(load_model(base_path, m), local, m)
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


class Answer:
    """A streamed answer. Checks the request when created (RequestError). `generate` (alone when the answer is
    iterated; batched with others by `serve`) queues its text pieces in `pieces`, then None, and leaves
    `finish_reason` ("stop", "length", or the reason given to cancel()), the token counts, and `error` if it failed."""

    def __init__(self, cm: ChatModel, question: str, cp: Limits, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None):
        if not question.strip():
            raise RequestError("the question is empty")
        self.max_new_tokens = cp.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 1 <= self.max_new_tokens <= cp.max_new_tokens_cap:
            raise RequestError(f"max_tokens must be between 1 and {cp.max_new_tokens_cap} (--max-new-tokens-cap), "
                               f"got {self.max_new_tokens}")
        self.temperature = cp.temperature if temperature is None else temperature
        self.top_p = cp.top_p if top_p is None else top_p
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise RequestError(f"temperature must be in [0, 2] and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        self.cm = cm
        self.enc = cm.tok(question_prompt(cm.tok, cm.fmt, question), return_tensors="pt")
        self.prompt_tokens = int(self.enc["input_ids"].shape[1])
        if self.prompt_tokens > cp.max_prompt_tokens:
            raise RequestError(f"the question is {self.prompt_tokens:,} prompt tokens, over --max-prompt-tokens "
                               f"({cp.max_prompt_tokens:,})")
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()  # text pieces, then None: filled by the generating thread
        self.on_piece = lambda: None  # called after each put (serve wakes its event loop with it)
        self.cancelled = threading.Event()  # set by cancel() or when the reader stops early: generation stops
        self.cancel_reason = "cancelled"

    @property
    def batch_key(self) -> tuple:
        """Answers with equal keys can be generated in one batch: same model, same sampling."""
        return id(self.cm), self.temperature, self.top_p if self.temperature > 0 else None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating at the next token (e.g. the HTTP client went away); safe from any thread."""
        if not self.cancelled.is_set():
            self.cancel_reason = reason
        self.cancelled.set()

    def put(self, piece: str | None) -> None:
        self.pieces.put(piece)
        self.on_piece()

    def __iter__(self) -> Iterator[str]:
        thread = threading.Thread(target=generate, args=([self],), daemon=True)
        thread.start()
        try:
            while (piece := self.pieces.get()) is not None:
                yield piece
        finally:
            self.cancelled.set()
            thread.join()
        if self.error is not None:
            raise MedtuneError(f"generation failed: {type(self.error).__name__}: {self.error}")


def generate(answers: list[Answer]) -> None:
    """Generate answers with one batch_key together, prompts padded on the left as generation.greedy pads them: each
    answer gets its own pieces and ends at its own stop token, max_new_tokens or cancel(); greedy answers are the
    ones each would get alone. Returns when all have ended; a failed generation is each answer's `error`."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
    from transformers.generation.streamers import BaseStreamer

    cm, first, n = answers[0].cm, answers[0], len(answers)
    if any(a.batch_key != first.batch_key for a in answers):
        raise ValueError("generate: the answers differ in model or sampling settings")
    pad = cm.tok.pad_token_id if cm.tok.pad_token_id is not None else cm.stops[0]
    width = max(a.prompt_tokens for a in answers)

    class Text(TextStreamer):  # one answer's tokens to text pieces, word by word as TextIteratorStreamer does
        def __init__(self, answer: Answer):
            super().__init__(cm.tok, skip_special_tokens=True)
            self.answer = answer

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                self.answer.put(text)

    class Rows(BaseStreamer, StoppingCriteria):
        """The batch's streamer and stopping criterion. Which one transformers calls first for a token differs
        between versions, so the criterion records the step at which a row ends and the streamer sends a row's
        tokens up to that step."""

        def __init__(self):
            self.text = [Text(a) for a in answers]
            self.ends: list[int | None] = [None] * n
            self.closed = [False] * n
            self.step = 0  # decoding steps streamed so far: one token per row each

        def __call__(self, input_ids, scores, **kw):
            made = input_ids.shape[1] - width
            for i, a in enumerate(answers):
                if self.ends[i] is None:
                    reason = ("stop" if int(input_ids[i, -1]) in cm.stops else "length" if made >= a.max_new_tokens
                              else a.cancel_reason if a.cancelled.is_set() else None)
                    if reason:
                        self.ends[i], a.finish_reason = made, reason
            return torch.tensor([e is not None for e in self.ends], device=input_ids.device)

        def put(self, value):
            if value.dim() > 1:  # the prompts
                return
            self.step += 1
            for i, token in enumerate(value.tolist()):
                end = self.ends[i]
                if self.closed[i]:
                    continue
                if end is None or self.step <= end:
                    answers[i].completion_tokens += 1
                    self.text[i].put(torch.tensor([token]))
                if end is not None and self.step >= end:
                    self.close(i)

        def close(self, i: int):
            if not self.closed[i]:
                self.closed[i] = True
                self.text[i].end()
                answers[i].finish_reason = answers[i].finish_reason or "length"
                answers[i].put(None)  # the reader may go on now, while the batch's other rows still generate

        def end(self):
            for i in range(n):
                self.close(i)

    rows = Rows()
    try:
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, a in enumerate(answers):
            ids[i, width - a.prompt_tokens:] = a.enc["input_ids"][0]
            mask[i, width - a.prompt_tokens:] = 1
        kw = dict(input_ids=ids.to(cm.model.device), attention_mask=mask.to(cm.model.device), streamer=rows,
                  max_new_tokens=max(a.max_new_tokens for a in answers), stopping_criteria=StoppingCriteriaList([rows]),
                  eos_token_id=cm.stops, pad_token_id=pad, do_sample=first.temperature > 0)
        if first.temperature > 0:
            kw |= {"temperature": first.temperature, "top_p": first.top_p}
        with cm.lock:
            cm.model.generate(**kw)
    except Exception as e:  # shown to each reader, not lost in the thread
        for i, a in enumerate(answers):
            if not rows.closed[i]:
                a.error = e
    finally:
        rows.end()


def model_folder(model_dir: Path | None, adapter: Path | None, exp: str | None) -> Path:
    """The one folder the --model / --adapter options name (the chat, ui and serve commands share them)."""
    if (model_dir is None) == (adapter is None):
        raise click.UsageError("give exactly one of --model (merged folder) or --adapter (adapter folder)")
    path = model_dir or adapter
    if exp is None and not path.is_dir():
        raise click.BadParameter(f"{path}: no such folder", param_hint="--model" if model_dir else "--adapter")
    return path


def trust_option(command):
    """--trust-remote-code: the only way chat, ui and serve run Python code shipped with a model."""
    return click.option("--trust-remote-code", is_flag=True,
                        help="run Python code shipped with the model folder or its base model (only for a model you "
                             "trust; never taken from the folder itself)")(command)


def limit_options(command):
    """The generation options that chat, ui and serve share; the command gets them as one `limits` argument."""
    import functools

    from pydantic import ValidationError

    @functools.wraps(command)
    def wrapper(*args, **kw):
        values = {k: kw.pop(k) for k in Limits.model_fields}
        try:
            kw["limits"] = Limits(**values)
        except ValidationError as e:
            raise click.UsageError("; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
                                             if err["loc"] else str(err["ctx"]["error"]).replace("_", "-")
                                             for err in e.errors())) from None
        return command(*args, **kw)

    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True, help="answer length when a request names none"),
        click.option("--max-new-tokens-cap", type=int, default=1024, show_default=True,
                     help="requests for more are refused: bounds how long one answer holds the machine"),
        click.option("--max-prompt-tokens", type=int, default=1024, show_default=True,
                     help="longer questions are refused before any generation"),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy, as in evaluation"),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="nucleus sampling mass when temperature > 0"),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
