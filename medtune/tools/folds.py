"""`medtune folds`: leave-one-collection-out experiments. `queue` queues one DVC experiment per held-out source
(named <config>-fold-<source>), `list` shows them, and `compare` compares configurations across the folds:
per fold the paired delta against a reference configuration on the same test questions, the mean over folds with
a CI over folds and questions (medtune/folds.py), the folds each wins and loses, runaway answers, and entity F1
beside ROUGE (medtune/entities.py). Writes cross_fold.md, cross_fold.csv and per_fold_deltas.png.

    medtune folds queue baseline --recipe recipes/holdout_baseline.yaml --test-questions 300
    medtune folds queue recipe --recipe recipes/holdout_baseline.yaml --set format.max_answer_tokens=192 --test-questions 300
    dvc exp run --run-all
    medtune folds compare --out reports/folds --reference baseline
    medtune folds compare --out reports/folds-vs-base --reference baseline --reference-predictions eval/base/predictions.jsonl
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import click
import numpy as np

from medtune import params
from medtune.console import MedtuneError, cli_errors, setup_logging
from medtune.entities import LEXICON, load_lexicon, score_rows
from medtune.folds import (
    check_fold_names,
    cross_fold,
    fold_runs,
    held_out,
    held_out_sources,
    metric_of,
    paired,
    parse_fold,
    question_rows,
    runaway_rate,
)
from medtune.io import atomic_dir, write_text_atomic
from medtune.recipes import apply_set, override_value, recipe_flags

log = logging.getLogger("medtune.folds")
PINNED = ("split.test_sources", "evaluate.max_examples")  # what each fold sets itself
METRICS = ["rouge1", "rouge2", "rougeL", "token_f1"]


@click.group()
def main() -> None:
    """Leave-one-collection-out folds: queue them as DVC experiments, list them, compare configurations across them."""


@main.command()
@click.argument("config")
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="a recipe file, as for `medtune recipe`")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="a params value for every fold (repeatable)")
@click.option("--sources", multiple=True, help="the sources to hold out, one fold each (repeatable); default: every "
              "`source` value of fetch.source")
@click.option("--test-questions", type=click.IntRange(min=0),
              help="evaluate.max_examples of every fold: its test is the first N questions of the held-out source by "
                   "id (0: all); default: params.yaml's (with the recipe)")
@click.option("--target", default="evaluate_tuned", show_default=True,
              help="the dvc.yaml stage each fold runs, with the stages before it (the comparison needs no merged "
                   "model); '' runs the whole pipeline")
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="print the `dvc exp run --queue` commands, queue nothing")
def queue(config: str, recipe: Path | None, sets: tuple[str, ...], sources: tuple[str, ...], test_questions: int | None,
          target: str, repo: Path, dry_run: bool) -> None:
    """Queue CONFIG once per held-out source: experiments CONFIG-fold-<source>, each testing on that source alone."""
    setup_logging()
    with cli_errors(kept=False):
        merged, flags = recipe_flags(recipe, repo / "params.yaml")
        flags = [f for pair in zip(flags[::2], flags[1::2]) if not pair[1].lstrip("~+").startswith(PINNED) for f in pair]
        for s in sets:
            if s.partition("=")[0] in PINNED:
                raise MedtuneError(f"--set {s}: each fold sets {s.partition('=')[0]} itself (--sources, --test-questions)")
            flags += apply_set(merged, s)
        sources = held_out_sources(merged["fetch"], repo, list(sources))
        n = merged["evaluate"]["max_examples"] if test_questions is None else test_questions
        names = check_fold_names(config, list(sources))
        commands = []
        for source, name in names.items():
            fold = copy.deepcopy(merged)
            fold["split"]["test_sources"], fold["evaluate"]["max_examples"] = [source], n
            if problems := params.check_all(fold, source=f"{repo / 'params.yaml'} + fold {name}"):
                raise MedtuneError("; ".join(problems))
            commands.append((name, source, ["dvc", "exp", "run", "--queue", "-n", name, *flags, "-S",
                                            f"split.test_sources={override_value([source])}", "-S", f"evaluate.max_examples={n}",
                                            *([target] if target else [])]))
        for name, source, cmd in commands:
            if dry_run:
                click.echo(shlex.join(cmd))
                continue
            proc = subprocess.run([sys.executable, "-m", *cmd], cwd=repo, capture_output=True, text=True)
            if proc.returncode != 0:
                raise MedtuneError(f"{shlex.join(cmd)} failed ({(proc.stderr or proc.stdout).strip()[-400:]})")
            click.echo(f"queued {name}: holds out {source}, first {n or 'all'} test questions by id")


@main.command("list")
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def list_folds(repo: Path) -> None:
    """The fold experiments of the commit checked out, by configuration, with their state."""
    from medtune.experiments import exp_rows

    with cli_errors(kept=False):
        by_config: dict[str, list[str]] = {}
        for row in exp_rows(repo):
            if (parsed := parse_fold(str(row.get("Experiment") or ""))) is not None:
                by_config.setdefault(parsed[0], []).append(f"{parsed[1]} ({row.get('State') or 'Success'})")
    for config, folds in sorted(by_config.items()):
        click.echo(f"{config}: {len(folds)} folds: {', '.join(sorted(folds))}")
    if not by_config:
        click.echo("no fold experiments (named <config>-fold-<source>); queue some with `medtune folds queue`")


# ---------------------------------------------------------------- compare


def collect(repo: Path, reference: str, metric: str, predictions: str, reference_predictions: str | None,
            lexicon: Path, ev, seed: int) -> list[dict]:
    """One summary per configuration: per-fold and cross-fold deltas of `metric` and entity F1 against the
    reference configuration's answers on the same fold and questions."""
    needs = [predictions] + ([reference_predictions] if reference_predictions else [])
    runs, skipped = fold_runs(repo, needs)
    log.info("fold runs: %s (skipped: %s)", {c: len(f) for c, f in runs.items()} or "none", skipped or "none")
    if reference not in runs:
        raise MedtuneError(f"--reference {reference}: no finished fold runs named {reference}-fold-* "
                           f"(configurations: {', '.join(sorted(runs)) or 'none'})")
    lex = load_lexicon(lexicon)

    def scores(run, path):
        rows = question_rows(run, path)
        ent = dict(zip(rows, score_rows(list(rows.values()), lex)))
        return (metric_of(rows, metric, f"{path} of run {run.name}"), {k: e["entity_f1"] for k, e in ent.items()},
                runaway_rate(rows))

    refs = {fold: scores(run, reference_predictions or predictions) for fold, run in runs[reference].items()}
    out = []
    for config, folds in sorted(runs.items(), key=lambda kv: (kv[0] != reference, kv[0])):
        d_metric, d_entity, per_fold = {}, {}, {}
        for fold, run in sorted(folds.items()):
            if fold not in refs:
                log.warning("%s: the reference %s has no finished fold %s: left out", run.name, reference, fold)
                continue
            tuned, ent, runaway = scores(run, predictions)
            dm, de = paired(tuned, refs[fold][0]), paired(ent, refs[fold][1])
            if dm is None:
                log.warning("%s answered other test questions than %s-fold-%s: left out", run.name, reference, fold)
                continue
            d_metric[fold], d_entity[fold] = dm, de
            scored = [v for v in ent.values() if v is not None]
            per_fold[fold] = {"source": held_out(run), "run": run.name, "tuned": round(float(np.mean(list(tuned.values()))), 4),
                              "entity_f1": round(float(np.mean(scored)), 4) if scored else None, "entity_n": len(scored),
                              "runaway": runaway}
        missing = sorted(set(refs) - set(per_fold))
        out.append({"config": config, "folds": per_fold, "missing": missing, "tuned": mean_of(per_fold, "tuned"),
                    "entity_f1": mean_of(per_fold, "entity_f1"),
                    "metric": cross_fold(d_metric, ev, seed), "entity": cross_fold(d_entity, ev, seed),
                    "is_reference": config == reference and not reference_predictions})
    return out


def mean_of(per_fold: dict[str, dict], key: str) -> float | None:
    """The mean over folds of a per-fold value (folds weigh equally)."""
    values = [x[key] for x in per_fold.values() if x[key] is not None]
    return round(float(np.mean(values)), 4) if values else None


def named_folds(row: dict, folds: list[str]) -> str:
    """`2: 1_CancerGov_QA, 6_NINDS_QA`: how many folds, by the source each held out."""
    return f"{len(folds)}: " + ", ".join(row["folds"][f]["source"] for f in folds) if folds else "0"


def share(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def ci_text(value, ci) -> str:
    return "-" if value is None else f"{value:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def num(value) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], metric: str, reference: str, reference_predictions: str | None, ev) -> str:
    theirs = f"the answers in its {reference_predictions}" if reference_predictions else "its tuned answers"
    lines = [
        f"# Configurations across held-out sources, by {metric}\n",
        (f"Each fold tests on one collection the training never saw (`split.test_sources`). Δ: the paired difference "
          f"from configuration `{reference}` ({theirs}) on the same fold and the same test questions. The mean over "
         f"folds weighs every fold equally; its {ev.confidence:.0%} CI resamples folds, then questions within each "
         f"({ev.bootstrap_samples} resamples). A configuration *wins* only when that CI lies above 0; a fold is won "
         "(lost) when its own paired CI lies above (below) 0. Entity F1: the reference's medical entities (diseases, "
         "drugs, genes; not the question's) that the answer names, scored only where the reference names one "
         "(docs/evaluation.md); runaway: answers that hit the token limit.\n"),
        (f"| config | folds | Δ {metric} [CI] | verdict | folds won | folds lost | {metric} | Δ entity F1 [CI] | "
         "entity F1 | runaway per fold |"),
        "| --- | ---: | --- | --- | --- | --- | ---: | --- | ---: | --- |"]
    for r in rows:
        m = r["metric"]
        cells = [r["config"] + (" (reference)" if r["is_reference"] else ""),
                 f"{len(r['folds'])}" + (f" (missing {', '.join(r['missing'])})" if r["missing"] else ""),
                 ci_text(m["delta"], m["ci"]), "reference" if r["is_reference"] else m["verdict"],
                 named_folds(r, m["won"]), named_folds(r, m["lost"]), num(r["tuned"]),
                 ci_text(r["entity"]["delta"], r["entity"]["ci"]), num(r["entity_f1"]),
                 ", ".join(f"{x['source']} {share(x['runaway'])}" for x in r["folds"].values()) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["\n## Per fold\n", (f"| config | held out | n | Δ {metric} [CI] | result | {metric} | Δ entity F1 [CI] | "
                                   "entity F1 (n) | runaway |"), "| --- | --- | ---: | --- | --- | ---: | --- | --- | ---: |"]
    for r in rows:
        for fold, x in r["folds"].items():
            m, e = r["metric"]["folds"].get(fold), r["entity"]["folds"].get(fold)
            cells = [r["config"], x["source"], str(m["n"] if m else 0), ci_text(m and m["delta"], m and m["ci"]),
                     m["result"] if m else "-", num(x["tuned"]), ci_text(e and e["delta"], e and e["ci"]),
                     f"{num(x['entity_f1'])} ({x['entity_n']})", share(x["runaway"])]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["config", "fold", "held_out", "run", "n", "delta", "delta_ci_low", "delta_ci_high", "result", "tuned",
               "entity_delta", "entity_delta_ci_low", "entity_delta_ci_high", "entity_f1", "entity_n", "runaway_rate",
               "folds_won", "folds_lost"]


def csv_text(rows: list[dict]) -> str:
    """One line per configuration and fold, then one per configuration with fold `mean` (the cross-fold values)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        m, e = r["metric"], r["entity"]
        for fold, x in r["folds"].items():
            mf, ef = m["folds"].get(fold, {}), e["folds"].get(fold, {})
            w.writerow({"config": r["config"], "fold": fold, "held_out": x["source"], "run": x["run"], "n": mf.get("n", 0),
                        "delta": mf.get("delta"), "delta_ci_low": (mf.get("ci") or [None])[0],
                        "delta_ci_high": (mf.get("ci") or [None, None])[1], "result": mf.get("result"), "tuned": x["tuned"],
                        "entity_delta": ef.get("delta"), "entity_delta_ci_low": (ef.get("ci") or [None])[0],
                        "entity_delta_ci_high": (ef.get("ci") or [None, None])[1], "entity_f1": x["entity_f1"],
                        "entity_n": x["entity_n"], "runaway_rate": x["runaway"]})
        w.writerow({"config": r["config"], "fold": "mean", "n": sum(f["n"] for f in m["folds"].values()),
                    "delta": m["delta"], "delta_ci_low": m["ci"][0], "delta_ci_high": m["ci"][1],
                    "result": "reference" if r["is_reference"] else m["verdict"], "tuned": r["tuned"],
                    "entity_delta": e["delta"], "entity_delta_ci_low": e["ci"][0], "entity_delta_ci_high": e["ci"][1],
                    "entity_f1": r["entity_f1"], "folds_won": " ".join(m["won"]), "folds_lost": " ".join(m["lost"])})
    return buf.getvalue()


def plot(rows: list[dict], metric: str, reference: str, png: Path) -> None:
    """Per-fold deltas with their CIs, one marker per configuration, the folds along the x axis and the mean
    over folds last; ROUGE above, entity F1 below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = sorted({f for r in rows for f in r["folds"]})
    labels = {f: next(r["folds"][f]["source"] for r in rows if f in r["folds"]) for f in folds}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * (len(folds) + 1) + 2), 8), sharex=True)
    markers = "osD^vP*Xh<>"
    for ax, key, title in ((axes[0], "metric", metric), (axes[1], "entity", "entity F1")):
        for k, r in enumerate(rows):
            off = (k - (len(rows) - 1) / 2) * 0.8 / max(len(rows), 1)
            pts = [(i, r[key]["folds"][f]) for i, f in enumerate(folds) if f in r[key]["folds"]]
            if r[key]["delta"] is not None:
                pts.append((len(folds), {"delta": r[key]["delta"], "ci": r[key]["ci"]}))
            if not pts:
                continue
            x = [i + off for i, _ in pts]
            y = [p["delta"] for _, p in pts]
            err = [[p["delta"] - p["ci"][0] for _, p in pts], [p["ci"][1] - p["delta"] for _, p in pts]]
            ax.errorbar(x, y, yerr=err, fmt=markers[k % len(markers)], capsize=3, label=r["config"])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axvline(len(folds) - 0.5, color="gray", linewidth=0.6, linestyle=":")
        ax.set_xticks(range(len(folds) + 1), [labels[f] for f in folds] + ["mean over folds"], rotation=30, ha="right",
                      fontsize=8)
        ax.set_ylabel(f"Δ {title} vs {reference}")
        ax.set_title(f"{title}: per-fold paired Δ with CI", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@main.command("compare")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reference", required=True, help="the configuration every other is compared with (its runs: NAME-fold-*)")
@click.option("--reference-predictions", help="the reference runs' file to compare with, e.g. eval/base/predictions.jsonl "
              "for the untuned base model's answers; default: --predictions")
@click.option("--metric", type=click.Choice(METRICS), default="rougeL", show_default=True)
@click.option("--predictions", default="eval/tuned/predictions.jsonl", show_default=True,
              help="the per-question answers and scores, as named in dvc.yaml")
@click.option("--lexicon", type=click.Path(dir_okay=False, path_type=Path), help=f"entity lexicon [default: REPO/{LEXICON}]")
@click.option("--repo", default=".", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def compare(out_dir: Path, reference: str, reference_predictions: str | None, metric: str, predictions: str,
            lexicon: Path | None, repo: Path) -> None:
    """Cross-fold table and plot: each configuration's paired delta against REFERENCE per fold and over folds."""
    setup_logging()
    with cli_errors(kept=False):
        ev, base = params.load("evaluate", "base", path=repo / "params.yaml")
        rows = collect(repo, reference, metric, predictions, reference_predictions, lexicon or repo / LEXICON, ev, base.seed)
        with atomic_dir(out_dir) as tmp:
            write_text_atomic(tmp / "cross_fold.md", markdown(rows, metric, reference, reference_predictions, ev))
            write_text_atomic(tmp / "cross_fold.csv", csv_text(rows))
            plot(rows, metric, reference, tmp / "per_fold_deltas.png")
    for r in rows:
        log.info("%s: %d folds, Δ %s %s, %s (won %s; lost %s)", r["config"], len(r["folds"]), metric,
                 ci_text(r["metric"]["delta"], r["metric"]["ci"]), "reference" if r["is_reference"] else r["metric"]["verdict"],
                 ", ".join(r["metric"]["won"]) or "none", ", ".join(r["metric"]["lost"]) or "none")
    log.info("wrote %s", out_dir)


if __name__ == "__main__":
    main()
