"""`medtune compare`: compare fine-tunes across base models and settings, from the experiments DVC recorded
(dvc.api): for each run, the base model's score, the tuned model's score and the paired tuned - base delta, each
with its bootstrap CI, a flag where the delta is within noise, the best run per base model, training speed and
memory. Runs that differ only in `base.seed` are one row, reported as mean ± std over the seeds.

    medtune compare --out reports/compare                          # the experiments of the commit checked out
    medtune compare --out reports/holdout --reference holdout-baseline

Only the params sections that dvc.yaml's stages depend on are compared. `--reference NAME` also compares every
run with one named run (e.g. a plain baseline) on the same test questions: the paired difference of the tuned
models' scores, with its bootstrap CI (params `evaluate`). Writes compare.md, compare.csv and deltas.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Literal

import click
import numpy as np

from medtune import params
from medtune.console import MedtuneError, cli_errors, setup_logging
from medtune.experiments import finished_runs
from medtune.io import atomic_dir, write_text_atomic
from medtune.metrics import bootstrap_ci
from medtune.params import EvaluateParams

log = logging.getLogger("medtune.compare")
GROUP_KEYS = ("model.base", "model.revision")  # one base model = one group; the table's first columns
SEED_KEY = "base.seed"
COLUMNS = ["base_model", "revision", "run", "changed_params", "seeds", "n_test", "base", "base_ci_low", "base_ci_high",
           "base_std", "tuned", "tuned_ci_low", "tuned_ci_high", "tuned_std", "delta", "delta_ci_low", "delta_ci_high",
           "delta_std", "within_noise", "best", "tied_with_best", "vs_reference", "vs_reference_ci_low",
           "vs_reference_ci_high", "tokens_per_s", "peak_memory_mb"]


@dataclasses.dataclass(frozen=True)
class CompareParams:
    """The command's options."""
    metric: Literal["rouge1", "rouge2", "rougeL", "token_f1", "entity_f1"]  # the score compared and used to pick the best run
    seed_noise_sigmas: float  # with several seeds, a delta within this many seed std devs of 0 is noise


def collect(repo: Path, files: dict[str, str]) -> tuple[list[dict], dict[str, int]]:
    """One dict per finished run with its params and the whole metrics files named in `files` (dvc exp show
    leaves out list values such as the CIs, so each file is read from the run's commit)."""
    found, skipped = finished_runs(repo, list(files.values()))
    runs = []
    for r in found:
        run = {"name": r.name, "rev": r.rev, "params": r.params, "paths": files, "_run": r,
               **{key: r.json_or_yaml(path) for key, path in files.items()}}
        run["base_only"] = not own_tuned_evaluation(run)
        runs.append(run)
    return runs, skipped


def own_tuned_evaluation(run: dict) -> bool:
    """Whether the run's tuned metrics were paired with its own base evaluation: tuned - delta is the base score
    it was paired with (both are means over the same questions). An experiment that ran only `evaluate_base`
    (the base model in another prompt layout, say) carries the tuned metrics of the commit it started from."""
    tuned, base = run["eval_tuned"], run["eval_base"]
    if "delta_rougeL" not in tuned:
        return False
    return abs(tuned["rougeL"] - tuned["delta_rougeL"] - base["rougeL"]) <= 3e-4  # three values rounded to 4 decimals


def metric_value(run: dict, file_key: str, key: str, source: str):
    if key not in run[file_key]:
        raise MedtuneError(f"{source}: run {run['name']}: {run['paths'][file_key]} has no {key!r}")
    return run[file_key][key]


def summarise_group(runs: list[dict], p: CompareParams, source: str) -> dict:
    """One configuration, one or several seeds: values (and CIs for one seed, std for several)."""
    m = p.metric
    out: dict = {"seeds": [r["params"].get(SEED_KEY) for r in runs], "run": ", ".join(r["name"] for r in runs)}
    for col, file_key, key in (("base", "eval_base", m), ("tuned", "eval_tuned", m), ("delta", "eval_tuned", f"delta_{m}")):
        vals = np.array([metric_value(r, file_key, key, source) for r in runs], dtype=float)
        cis = [metric_value(r, file_key, f"{key}_ci", source) for r in runs]
        for r, ci in zip(runs, cis):
            if not (isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)):
                raise MedtuneError(f"{source}: run {r['name']}: {r['paths'][file_key]}: {key}_ci: expected [low, high], got {ci!r}")
        out[col] = round(float(vals.mean()), 4)
        out[f"{col}_std"] = round(float(vals.std(ddof=1)), 4) if len(runs) > 1 else None
        out[f"{col}_ci_low"], out[f"{col}_ci_high"] = cis[0] if len(runs) == 1 else (None, None)
        out[f"_{col}_cis"] = cis
    ci_spans_zero = any(lo <= 0 <= hi for lo, hi in out["_delta_cis"])
    seed_noise = len(runs) > 1 and abs(out["delta"]) <= p.seed_noise_sigmas * out["delta_std"]
    out["within_noise"] = ci_spans_zero or seed_noise
    out["n_test"] = int(metric_value(runs[0], "eval_tuned", "n", source))
    out["tokens_per_s"] = round(float(np.mean([metric_value(r, "train", "tokens_per_s", source) for r in runs])), 1)
    out["peak_memory_mb"] = round(float(np.mean([metric_value(r, "train", "peak_memory_mb", source) for r in runs])), 1)
    return out


def interval(row: dict, col: str, sigmas: float) -> tuple[float, float]:
    """The row's uncertainty interval for `col`: its CI (one seed) or mean ± sigmas·std (several)."""
    if row[f"{col}_std"] is None:
        return row[f"{col}_ci_low"], row[f"{col}_ci_high"]
    return row[col] - sigmas * row[f"{col}_std"], row[col] + sigmas * row[f"{col}_std"]


def compare(runs: list[dict], p: CompareParams, source: str) -> list[dict]:
    if not runs:
        raise MedtuneError(f"{source}: no finished run with evaluation metrics (run `dvc exp run` or `dvc repro` first)")
    keys = sorted({k for r in runs for k in r["params"]})
    changed = [k for k in keys if k not in (*GROUP_KEYS, SEED_KEY) and len({json.dumps(r["params"].get(k)) for r in runs}) > 1]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:  # same params except the seed = the same configuration
        key = tuple(json.dumps(r["params"].get(k)) for k in keys if k != SEED_KEY)
        groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        first = members[0]["params"]
        row = {"base_model": first.get("model.base"), "revision": first.get("model.revision"),
               "changed_params": " ".join(f"{k}={first.get(k)}" for k in changed)}
        rows.append(row | summarise_group(members, p, source))
    for model in {(r["base_model"], r["revision"]) for r in rows}:
        same = [r for r in rows if (r["base_model"], r["revision"]) == model]
        best = max(same, key=lambda r: r["tuned"])
        best_lo, best_hi = interval(best, "tuned", p.seed_noise_sigmas)
        for r in same:
            lo, hi = interval(r, "tuned", p.seed_noise_sigmas)
            r["best"] = r is best
            r["tied_with_best"] = r is not best and lo <= best_hi and best_lo <= hi
    rows.sort(key=lambda r: (str(r["base_model"]), str(r["revision"]), -r["tuned"]))
    return rows


def question_scores(run: dict, path: str, metric: str) -> dict[str, float]:
    """id -> the tuned model's score on that test question, from the run's predictions file."""
    out = {}
    for i, line in enumerate(run["_run"].text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                if row[metric] is not None:  # entity F1: None where the reference names no entity to check
                    out[str(row["id"])] = float(row[metric])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise MedtuneError(f"{path} of run {run['name']} line {i}: expected a JSON object with 'id' and "
                                   f"{metric!r}") from None
    return out


def against_reference(rows: list[dict], runs: list[dict], reference: str, predictions: str, p: CompareParams,
                      ev, seed: int, reference_predictions: str | None = None) -> None:
    """Adds to each row the paired difference of its tuned scores and the reference run's (same questions),
    mean over its seeds, with the bootstrap CI when it has one seed. A run with other test questions (a split
    with another seed) is not comparable: left out, and a row of only such runs gets no value. The reference's
    scores come from `reference_predictions` (e.g. its base model's answers), else from the same file."""
    ref = [r for r in runs if r["name"] == reference]
    if not ref:
        raise MedtuneError(f"--reference {reference}: no finished run of that name (runs: {', '.join(r['name'] for r in runs)})")
    ref_scores = question_scores(ref[0], reference_predictions or predictions, p.metric)
    by_name = {r["name"]: r for r in runs}
    for row in rows:
        diffs = []
        for name in row["run"].split(", "):
            scores = question_scores(by_name[name], predictions, p.metric)
            if set(scores) != set(ref_scores):
                log.warning("run %s answered other test questions than %s: not compared with it", name, reference)
                continue
            diffs.append(np.array([scores[k] - ref_scores[k] for k in sorted(scores)]))
        row["vs_reference"] = round(float(np.mean([d.mean() for d in diffs])), 4) if diffs else None
        row["vs_reference_ci_low"], row["vs_reference_ci_high"] = (bootstrap_ci(diffs[0], ev, seed) if len(diffs) == 1
                                                                   else (None, None))


def fmt(row: dict, col: str, signed: bool = False) -> str:
    f = "{:+.4f}" if signed else "{:.4f}"
    if row[f"{col}_std"] is not None:
        return f"{f.format(row[col])} ± {row[f'{col}_std']:.4f}"
    return f"{f.format(row[col])} [{f.format(row[f'{col}_ci_low'])}, {f.format(row[f'{col}_ci_high'])}]"


def markdown(rows: list[dict], p: CompareParams, reference: str | None = None, reference_predictions: str | None = None) -> str:
    lines = [
        f"# Fine-tunes compared by {p.metric}\n",
        f"{p.metric} of the base model and the tuned model (base + LoRA adapter) on the same test questions, "
        "with the bootstrap confidence interval of each run, and the paired delta (tuned - base). Runs that differ "
        f"only in the seed are one row: mean ± std over the seeds. *Within noise*: the delta's CI includes 0 (for "
        f"any seed), or with several seeds |mean delta| <= {p.seed_noise_sigmas:g} std. ★ is the best tuned "
        "score per base model; *tied* marks a run whose interval overlaps the best one's.\n",
        "| base model | revision | run | changed params | seeds | n | base | tuned | delta | within noise | tok/s | peak MB |",
        "| --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: |",
    ]
    if reference:
        theirs = f"the scores in its {reference_predictions}" if reference_predictions else "its tuned scores"
        lines[1] += (f"*vs {reference}*: the paired difference of the tuned scores from run {reference}'s ({theirs}) "
                     "on the same questions, with its bootstrap CI (one seed) or the mean over seeds.\n")
        lines[2] = lines[2].replace(" | within noise |", f" | within noise | vs {reference} |")
        lines[3] = lines[3].replace(" | --- | ---: | ---: |", " | --- | --- | ---: | ---: |")
    for r in rows:
        name = r["run"] + (" ★" if r["best"] else " (tied)" if r["tied_with_best"] else "")
        cells = [f"`{r['base_model']}`", str(r["revision"] or "-"), name, r["changed_params"] or "-",
                 ", ".join(map(str, r["seeds"])), str(r["n_test"]), fmt(r, "base"), fmt(r, "tuned"),
                 fmt(r, "delta", signed=True), "yes" if r["within_noise"] else "no", f"{r['tokens_per_s']:,.1f}",
                 f"{r['peak_memory_mb']:,.0f}"]
        if reference:
            ci = (f" [{r['vs_reference_ci_low']:+.4f}, {r['vs_reference_ci_high']:+.4f}]"
                  if r["vs_reference_ci_low"] is not None else "")
            cells.insert(10, "other questions" if r["vs_reference"] is None else f"{r['vs_reference']:+.4f}{ci}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r | {"seeds": " ".join(map(str, r["seeds"]))})
    return buf.getvalue()


def plot(rows: list[dict], p: CompareParams, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def short(base: str) -> str:  # a local folder by its name; hub ids and pypi: names as they are
        return Path(base).name if str(base).startswith(("/", ".")) else str(base)

    def label(r: dict) -> str:  # what changed (learning_rate=0.0001), then the run's name; ★ the best per base model
        changed = " ".join(kv.split(".", 1)[-1] for kv in r["changed_params"].split()) or "-"
        return f"{'★ ' if r['best'] else ''}{short(r['base_model'])} · {changed} · {r['run']}"

    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.45 * len(rows)))
    for y, r in enumerate(rows):
        lo, hi = interval(r, "delta", 1.0)
        color = "tab:gray" if r["within_noise"] else "tab:orange" if r["best"] else "tab:blue"
        ax.errorbar(r["delta"], y, xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color=color, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{p.metric}: tuned - base")
    ax.set_title("bars: the delta's CI (one seed) or ± 1 std (several seeds); ★ best per base model; gray: within noise",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(p: CompareParams, repo: Path, files: dict[str, str], out_dir: Path, reference: str | None = None,
        predictions: str = "eval/tuned/predictions.jsonl", ev: EvaluateParams | None = None, seed: int = 0,
        reference_predictions: str | None = None) -> dict:
    runs, skipped = collect(repo, files)
    source = f"experiments of {repo.resolve()}"
    base_only = [r["name"] for r in runs if r["base_only"]]
    if base_only:  # not a fine-tune to compare, but its base answers can be the reference
        log.info("runs without a tuned evaluation of their own (left out of the table): %s", ", ".join(base_only))
        skipped["base model only"] = len(base_only)
    rows = compare([r for r in runs if not r["base_only"]], p, source)
    if reference:
        against_reference(rows, runs, reference, predictions, p, ev, seed, reference_predictions)
    with atomic_dir(out_dir) as tmp:
        write_text_atomic(tmp / "compare.md", markdown(rows, p, reference, reference_predictions))
        write_text_atomic(tmp / "compare.csv", csv_text(rows))
        plot(rows, p, tmp / "deltas.png")
    return {"runs": len(runs), "rows": len(rows), "skipped": skipped,
            "best": {f"{r['base_model']}": r["run"] for r in rows if r["best"]}}


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the DVC repository whose experiments are compared")
@click.option("--metric", type=click.Choice(["rouge1", "rouge2", "rougeL", "token_f1", "entity_f1"]), default="rougeL", show_default=True,
              help="the score compared; picks the best run")
@click.option("--seed-noise-sigmas", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="with several seeds, a mean delta within this many seed std devs of 0 is noise")
@click.option("--eval-base", default="eval/base/metrics.json", show_default=True, help="the base evaluation's figures, as dvc.yaml writes them")
@click.option("--eval-tuned", default="eval/tuned/metrics.json", show_default=True, help="the tuned evaluation's figures, as dvc.yaml writes them")
@click.option("--train", "train_metrics", default="metrics/train.json", show_default=True, help="metrics file as named in dvc.yaml")
@click.option("--reference", help="a run's name: every run is also compared with it, question by question")
@click.option("--predictions", default="eval/tuned/predictions.jsonl", show_default=True,
              help="the tuned answers' per-question scores, as named in dvc.yaml (for --reference)")
@click.option("--reference-predictions",
              help="the reference run's file to compare with, e.g. eval/base/predictions.jsonl for its base model's "
                   "answers (an experiment that ran only evaluate_base in another prompt layout); default: --predictions")
def main(out_dir: Path, repo: Path, metric: str, seed_noise_sigmas: float, eval_base: str, eval_tuned: str,
         train_metrics: str, reference: str | None, predictions: str, reference_predictions: str | None) -> None:
    """Table and plot of the experiments: base, tuned and paired delta with CIs, best run per base model."""
    setup_logging()
    p = CompareParams(metric, seed_noise_sigmas)
    with cli_errors(kept=False):
        ev, base = params.load("evaluate", "base", path=repo / "params.yaml")
        files = {"eval_base": eval_base, "eval_tuned": eval_tuned, "train": train_metrics}
        summary = run(p, repo, files, out_dir, reference, predictions, ev, base.seed, reference_predictions)
    log.info("compared %d runs in %d rows (skipped: %s); best: %s; wrote %s", summary["runs"], summary["rows"],
             summary["skipped"] or "none", summary["best"], out_dir)


if __name__ == "__main__":
    main()
