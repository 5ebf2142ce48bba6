"""Compare fine-tunes across base models and settings from `dvc exp show --json`: for each run, the base
model's score, the tuned model's score and the paired tuned - base delta, each with its bootstrap CI, a flag
where the delta is within noise, the best run per base model, training speed and memory. Runs that differ
only in `base.seed` are one row, reported as mean ± std over the seeds.

Not a DVC stage: it reads the experiments DVC recorded. Run as:
    python -m medtune.tools.compare --out reports/compare      # runs `dvc exp show --json --param-deps` itself
    dvc exp show --json --param-deps -A > exps.json && python -m medtune.tools.compare --exps exps.json --out reports/compare
Only the params sections that dvc.yaml's stages depend on are compared (not `check:`, `ui:`, ...).
`--reference NAME` also compares every run with one named run (e.g. a plain baseline) on the same test
questions: the paired difference of the tuned models' scores, with its bootstrap CI (params `evaluate`).
Reads params `compare`, `evaluate`. Writes compare.md, compare.csv and deltas.png (the deltas with their CIs) to --out.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Literal

import click
import numpy as np

from medtune.common import (
    MedtuneError,
    atomic_dir,
    cli_errors,
    load_params,
    log_params,
    setup_logging,
    write_text_atomic,
)

log = logging.getLogger("medtune.compare")
GROUP_KEYS = ("model.base", "model.revision")  # one base model = one group; the table's first columns
SEED_KEY = "base.seed"
COLUMNS = ["base_model", "revision", "run", "changed_params", "seeds", "n_test", "base", "base_ci_low", "base_ci_high",
           "base_std", "tuned", "tuned_ci_low", "tuned_ci_high", "tuned_std", "delta", "delta_ci_low", "delta_ci_high",
           "delta_std", "within_noise", "best", "tied_with_best", "vs_reference", "vs_reference_ci_low",
           "vs_reference_ci_high", "tokens_per_s", "peak_memory_mb"]


@dataclasses.dataclass(frozen=True)
class CompareParams:
    metric: Literal["rouge1", "rouge2", "rougeL", "token_f1"]  # the score compared and used to pick the best run
    seed_noise_sigmas: float  # with several seeds, a delta within this many seed std devs of 0 is noise

    def problems(self) -> list[str]:
        return ["seed_noise_sigmas: must be positive"] if self.seed_noise_sigmas <= 0 else []


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def stage_sections(pipeline: Path) -> set[str]:
    """The params.yaml sections some stage depends on: only these are compared (not `check:`, `ui:`, ...)."""
    import yaml

    try:
        stages = (yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedtuneError(f"{pipeline}: cannot read the stages ({e})") from None
    out = set()
    for stage in stages.values():
        for item in stage.get("params") or []:
            keys = [item] if isinstance(item, str) else [k for v in item.values() for k in v or []]
            out |= {k.split(".")[0] for k in keys}
    return out


def runs_from_show(shown, source: str, files: dict[str, str], sections: set[str]) -> tuple[list[dict], dict[str, int]]:
    """One dict per finished run (baseline commits and their experiments) with its flattened params (the
    `sections` only) and the metrics files named in `files`; returns (runs, skipped counts by reason)."""
    if not isinstance(shown, list):
        raise MedtuneError(f"{source}: expected the list that `dvc exp show --json` prints")
    entries = []
    for commit in shown:
        if not isinstance(commit, dict) or "rev" not in commit:
            raise MedtuneError(f"{source}: an entry without 'rev': not `dvc exp show --json` output")
        entries.append((commit["rev"], commit.get("name"), commit))
        for group in commit.get("experiments") or []:
            for exp in group.get("revs") or []:
                entries.append((exp.get("rev", "?"), exp.get("name") or group.get("name"), exp))
    runs, skipped = [], {}
    for rev, name, entry in entries:
        name = "workspace" if rev == "workspace" else name or rev[:7]
        data = entry.get("data") or {}
        metrics = {path: ((data.get("metrics") or {}).get(path) or {}).get("data") for path in files.values()}
        missing = [p for p, m in metrics.items() if not m]
        if entry.get("error") or missing:
            reason = "failed" if entry.get("error") else f"no {missing[0]}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if not params:
            raise MedtuneError(f"{source}: run {name}: no params.yaml params recorded")
        run = {"name": name, "rev": rev, "params": flatten({k: v for k, v in params.items() if k in sections}),
               "paths": files, **{key: full_metrics(rev, path, name) for key, path in files.items()}}
        run["base_only"] = not own_tuned_evaluation(run)
        runs.append(run)
    # the workspace usually repeats HEAD's run: keep it only when it differs from every commit and experiment
    runs = [r for r in runs if r["rev"] != "workspace" or not any(same_run(r, o) for o in runs if o["rev"] != "workspace")]
    return runs, skipped


def own_tuned_evaluation(run: dict) -> bool:
    """Whether the run's tuned metrics were paired with its own base evaluation: tuned - delta is the base score
    it was paired with (both are means over the same questions). An experiment that ran only `evaluate_base`
    (the base model in another prompt layout, say) carries the tuned metrics of the commit it started from."""
    tuned, base = run["eval_tuned"], run["eval_base"]
    if "delta_rougeL" not in tuned:
        return False
    return abs(tuned["rougeL"] - tuned["delta_rougeL"] - base["rougeL"]) <= 3e-4  # three values rounded to 4 decimals


def same_run(a: dict, b: dict) -> bool:
    return a["params"] == b["params"] and a["eval_tuned"] == b["eval_tuned"]


def full_metrics(rev: str, path: str, name: str) -> dict:
    """The whole metrics file of a run. `dvc exp show --json` drops list values such as the CIs, so read the
    file itself: from the workspace, or from the run's git commit (DVC commits uncached metrics with the run)."""
    text = run_text(rev, path, name)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MedtuneError(f"{path} of run {name} ({rev[:7]}):{e.lineno}: malformed JSON ({e.msg})") from None


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


def run_text(rev: str, path: str, name: str) -> str:
    if rev == "workspace":
        if Path(path).exists():
            return Path(path).read_text(encoding="utf-8")
    else:
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return proc.stdout
    raise MedtuneError(f"run {name} ({rev[:7]}): cannot read {path} (compare in the repository the experiments ran in)")


def question_scores(run: dict, path: str, metric: str) -> dict[str, float]:
    """id -> the tuned model's score on that test question, from the run's predictions file."""
    out = {}
    for i, line in enumerate(run_text(run["rev"], path, run["name"]).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
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
    from medtune.stages.evaluate import bootstrap_ci

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
        f"{p.metric} F1 of the base model and the tuned model (base + LoRA adapter) on the same test questions, "
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

    labels = [f"{short(r['base_model'])} · {r['run']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.45 * len(rows)))
    for y, r in enumerate(rows):
        lo, hi = interval(r, "delta", 1.0)
        color = "tab:gray" if r["within_noise"] else "tab:blue"
        ax.errorbar(r["delta"], y, xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color=color, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{p.metric}: tuned - base")
    ax.set_title("bars: the delta's CI (one seed) or ± 1 std (several seeds); gray: within noise", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(p: CompareParams, shown, source: str, files: dict[str, str], sections: set[str], out_dir: Path,
        reference: str | None = None, predictions: str = "eval/tuned/predictions.jsonl", ev=None, seed: int = 0,
        reference_predictions: str | None = None) -> dict:
    runs, skipped = runs_from_show(shown, source, files, sections)
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


def exp_show_json() -> list:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--param-deps"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MedtuneError(f"`dvc exp show --json --param-deps` failed: {last}")
    return json.loads(proc.stdout)


@click.command()
@click.option("--exps", "exps_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="saved `dvc exp show --json --param-deps` output; default: run it in the current repository")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--pipeline", default="dvc.yaml", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the params sections its stages depend on are compared")
@click.option("--eval-base", default="metrics/eval_base.json", show_default=True, help="metrics file as named in dvc.yaml")
@click.option("--eval-tuned", default="metrics/eval_tuned.json", show_default=True, help="metrics file as named in dvc.yaml")
@click.option("--train", "train_metrics", default="metrics/train.json", show_default=True, help="metrics file as named in dvc.yaml")
@click.option("--reference", help="a run's name: every run is also compared with it, question by question")
@click.option("--predictions", default="eval/tuned/predictions.jsonl", show_default=True,
              help="the tuned answers' per-question scores, as named in dvc.yaml (for --reference)")
@click.option("--reference-predictions",
              help="the reference run's file to compare with, e.g. eval/base/predictions.jsonl for its base model's "
                   "answers (an experiment that ran only evaluate_base in another prompt layout); default: --predictions")
def main(exps_file: Path | None, out_dir: Path, pipeline: Path, eval_base: str, eval_tuned: str, train_metrics: str,
         reference: str | None, predictions: str, reference_predictions: str | None) -> None:
    from medtune.common import BaseParams
    from medtune.stages.evaluate import EvaluateParams

    setup_logging()
    with cli_errors():
        p, ev, base = load_params(("compare", CompareParams), ("evaluate", EvaluateParams), ("base", BaseParams))
        log_params("compare", p)
        if exps_file is None:
            source, shown = "dvc exp show --json --param-deps", exp_show_json()
        else:
            source = str(exps_file)
            try:
                shown = json.loads(exps_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise MedtuneError(f"{exps_file}:{e.lineno}: malformed JSON ({e.msg})") from None
        files = {"eval_base": eval_base, "eval_tuned": eval_tuned, "train": train_metrics}
        summary = run(p, shown, source, files, stage_sections(pipeline), out_dir, reference, predictions, ev, base.seed,
                      reference_predictions)
    log.info("compared %d runs in %d rows (skipped: %s); best: %s; wrote %s", summary["runs"], summary["rows"],
             summary["skipped"] or "none", summary["best"], out_dir)


if __name__ == "__main__":
    main()
