"""CI gate on pulled artifacts, without retraining: after `git clone` + `dvc pull`, check that

1. every output, metric and dependency dvc.lock records has the hash it records, each file hashed anew (not
   `dvc status`, which trusts the hashes DVC cached by file size and time); a folder through its manifest;
2. the metrics meet the thresholds given as options (tuned - base delta and its CI, test size,
   runaway and empty answers, merge check passed), and the two evaluations agree with each other;
3. the lineage matches: the base model and chat template the adapter was trained with are the ones the
   params name now (metrics/lineage.json);
4. the adapter loads on its base model and answers the first test questions: only when the hashes hold, so that
   nothing unverified is loaded.

Every failure is listed at once in one line naming the file and the metric or output; exit 1.
Not a DVC stage. Run from the repository root:  medtune check
Reads params `model` (the thresholds are options).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Literal

import click

from medtune import params
from medtune.console import MedtuneError, cli_errors, setup_logging
from medtune.generation import greedy
from medtune.integrity import lock_problems
from medtune.io import read_jsonl
from medtune.models import (
    lineage,
    load_adapter,
    load_model,
    load_tokenizer,
    resolve_base,
)
from medtune.params import ModelParams

log = logging.getLogger("medtune.check")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What the pulled run must reach (the command's options)."""
    metric: Literal["rouge1", "rouge2", "rougeL", "token_f1", "entity_f1"]  # the score the thresholds apply to
    min_delta: float  # tuned - base, paired mean over the test questions
    require_ci_above_zero: bool  # the delta's CI lower bound must be > 0
    min_test_questions: int
    max_runaway_rate: float
    max_empty_rate: float
    require_merge_passed: bool
    questions: int  # test prompts the adapter must answer
    max_new_tokens: int


def read_metrics(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        problems.append(f"{path}: not found (run `dvc pull`)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return data


def metric_problems(p: Thresholds, eval_base: Path, eval_tuned: Path, merge: Path) -> tuple[list[str], dict]:
    problems: list[str] = []
    base, tuned, merged = (read_metrics(f, problems) for f in (eval_base, eval_tuned, merge))
    m, d = p.metric, f"delta_{p.metric}"

    def get(data: dict, path: Path, key: str, kind: type | tuple = (int, float)):
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind != bool:
            problems.append(f"{path}: {key}: missing or not a {getattr(kind, '__name__', 'number')} (got {value!r})")
            return None
        return value

    summary: dict = {}
    if tuned is not None:
        delta, ci, n = get(tuned, eval_tuned, d), get(tuned, eval_tuned, f"{d}_ci", list), get(tuned, eval_tuned, "n", int)
        runaway, empty = get(tuned, eval_tuned, "runaway_rate"), get(tuned, eval_tuned, "empty_rate")
        summary |= {d: delta, f"{d}_ci": ci, "n": n}
        if delta is not None and delta < p.min_delta:
            problems.append(f"{eval_tuned}: {d} {delta:+.4f} is below --min-delta {p.min_delta:+.4f}")
        if ci is not None and p.require_ci_above_zero and not (len(ci) == 2 and isinstance(ci[0], (int, float)) and ci[0] > 0):
            problems.append(f"{eval_tuned}: {d}_ci {ci} does not lie above 0 (within noise; --require-ci-above-zero)")
        if n is not None and n < p.min_test_questions:
            problems.append(f"{eval_tuned}: n {n} test questions is below --min-test-questions {p.min_test_questions}")
        if runaway is not None and runaway > p.max_runaway_rate:
            problems.append(f"{eval_tuned}: runaway_rate {runaway} is above --max-runaway-rate {p.max_runaway_rate}")
        if empty is not None and empty > p.max_empty_rate:
            problems.append(f"{eval_tuned}: empty_rate {empty} is above --max-empty-rate {p.max_empty_rate}")
        if base is not None and None not in (delta, n):
            # the paired delta is the difference of the two means over the same questions (each rounded to 1e-4)
            b, t, nb = get(base, eval_base, m), get(tuned, eval_tuned, m), get(base, eval_base, "n", int)
            if None not in (b, t) and abs((t - b) - delta) > 2.5e-4:
                problems.append(f"{eval_tuned}: {m} {t} - {eval_base}: {m} {b} = {t - b:+.4f} disagrees with {d} {delta:+.4f}")
            if nb is not None and nb != n:
                problems.append(f"{eval_tuned}: n {n} differs from {eval_base}: n {nb} (not the same test questions)")
    if merged is not None and p.require_merge_passed and merged.get("passed") is not True:
        problems.append(f"{merge}: passed is {merged.get('passed')!r}, not true (--require-merge-passed)")
    return problems, summary


def lineage_problems(m: ModelParams, identity: dict, tok, lineage_file: Path) -> list[str]:
    """The base model and rendered chat template recorded at training time must be the ones used now."""
    recorded = read_metrics(lineage_file, problems := [])
    if recorded is None:
        return problems
    now = lineage(m, identity, tok)
    for key in ("base", "revision", "weights_sha256", "chat_template_sha256"):
        if recorded.get(key) != now.get(key):
            problems.append(f"{lineage_file}: {key} {recorded.get(key)!r} was trained with; params and base model give {now.get(key)!r}")
    return problems


def answer_problems(p: Thresholds, m: ModelParams, base_path: Path, tok, adapter: Path, data_dir: Path) -> tuple[list[str], list[str]]:
    """Load base + adapter and answer the first `p.questions` test prompts greedily; every answer must be non-empty."""
    if not (adapter / "adapter_model.safetensors").exists():
        return [f"{adapter}/adapter_model.safetensors: not found (run `dvc pull`)"], []
    test = data_dir / "test.jsonl"
    try:
        rows = sorted(read_jsonl(test), key=lambda r: str(r["id"]))[: p.questions]
    except MedtuneError as e:
        return [f"{e} (run `dvc pull`)"], []
    if not rows:
        return [f"{test}: no test questions to answer"], []
    try:
        model = load_adapter(load_model(base_path, m), adapter, m).eval()
    except MedtuneError as e:
        return [str(e)], []
    problems, answers = [], []
    for r, g in zip(rows, greedy(model, tok, [r["prompt"] for r in rows], p.max_new_tokens, len(rows), desc="check answers")):
        answers.append(g["answer"])
        log.info("Q %s: %s\nA: %s", r["id"], r["question"], g["answer"])
        if not g["answer"]:
            problems.append(f"{adapter}: empty answer to test question {r['id']} ({test})")
    return problems, answers


def run(p: Thresholds, m: ModelParams, repo: Path, adapter: Path, data_dir: Path, eval_base: Path, eval_tuned: Path,
        merge: Path, lineage_file: Path) -> dict:
    hashes = lock_problems(repo)
    found, summary = metric_problems(p, eval_base, eval_tuned, merge)
    problems = hashes + found
    answers: list[str] = []
    if hashes:  # hashes first: nothing unverified is loaded or run
        raise MedtuneError(f"check failed ({len(problems)}): " + "; ".join(problems))
    try:
        base_path, identity = resolve_base(m)
        tok = load_tokenizer(base_path, m)
    except MedtuneError as e:  # the base model is not installed or not in the cache: nothing to load the adapter on
        problems.append(str(e))
    else:
        problems += lineage_problems(m, identity, tok, lineage_file)
        found, answers = answer_problems(p, m, base_path, tok, adapter, data_dir)
        problems += found
    if problems:
        raise MedtuneError(f"check failed ({len(problems)}): " + "; ".join(problems))
    return summary | {"answers": answers}


@click.command()
@click.option("--adapter", default="models/adapter", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", "data_dir", default="data/formatted", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--eval-base", default="eval/base/metrics.json", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--eval-tuned", default="eval/tuned/metrics.json", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--merge", default="metrics/merge.json", show_default=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--lineage", "lineage_file", default="metrics/lineage.json", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--metric", type=click.Choice(["rouge1", "rouge2", "rougeL", "token_f1", "entity_f1"]), default="rougeL", show_default=True,
              help="the score the thresholds apply to")
@click.option("--min-delta", type=float, default=0.05, show_default=True, help="tuned - base (paired mean) must reach this")
@click.option("--require-ci-above-zero/--allow-ci-with-zero", default=True, show_default=True,
              help="the delta's confidence interval must lie above 0")
@click.option("--min-test-questions", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--max-runaway-rate", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="tuned answers that hit the token limit without stopping")
@click.option("--max-empty-rate", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--require-merge-passed/--ignore-merge-check", default=True, show_default=True)
@click.option("--questions", type=click.IntRange(min=1), default=2, show_default=True,
              help="first N test prompts the adapter, loaded on its base, must answer (non-empty)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
def main(adapter: Path, data_dir: Path, eval_base: Path, eval_tuned: Path, merge: Path, lineage_file: Path, **thresholds) -> None:
    """CI gate on a pulled run: hashes, thresholds, lineage, answers. The paths default to dvc.yaml's outputs."""
    setup_logging()
    p = Thresholds(**thresholds)
    with cli_errors(kept=False):
        (m,) = params.load("model")
        s = run(p, m, Path("."), adapter, data_dir, eval_base, eval_tuned, merge, lineage_file)
    d = f"delta_{p.metric}"
    click.echo(f"check passed: every file matches dvc.lock; {d} {s[d]:+.4f} {s[f'{d}_ci']} (n={s['n']}); "
               f"adapter answered {len(s['answers'])} test question(s)")


if __name__ == "__main__":
    main()
