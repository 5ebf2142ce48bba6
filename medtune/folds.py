"""Leave-one-collection-out folds: one configuration run once per held-out `source` (split.test_sources set to
that one collection; the rest train and validate, with repeats of test questions dropped as split does), each a
DVC experiment named <config>-fold-<source>; and the statistics that compare configurations across them.

    fold_name("recipe", "1_CancerGov_QA")            -> "recipe-fold-1-cancergov-qa"
    cross_fold({fold: per-question deltas}, ev, seed) -> mean over folds, its two-level bootstrap CI, per-fold CIs

Folds weigh equally: the mean is the mean of the per-fold means. Its CI resamples folds with replacement and then
the questions within each resampled fold, so it is wide when the folds disagree, however many questions each has.
A configuration wins on a fold when that fold's paired CI lies above 0 (loses: below), and wins overall only
when the CI of its mean over folds lies above 0.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from medtune.console import MedtuneError
from medtune.experiments import Run, finished_runs
from medtune.io import parse_jsonl
from medtune.metrics import bootstrap_ci
from medtune.params import EvaluateParams, FetchParams

log = logging.getLogger("medtune.folds")
FOLD = "-fold-"
NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slug(text: str) -> str:
    """Lower case, runs of anything but a-z and 0-9 as one hyphen: a valid DVC experiment name piece."""
    return NOT_SLUG.sub("-", str(text).lower()).strip("-")


def fold_name(config: str, source: str) -> str:
    """The experiment name of `config`'s fold holding out `source`."""
    c = slug(config)
    if not c or FOLD in f"-{c}-" or not slug(source):
        raise MedtuneError(f"cannot name a fold of {config!r} holding out {source!r}: the configuration name needs "
                           f"a letter or digit and must not contain {FOLD.strip('-')!r} between hyphens")
    return f"{c}{FOLD}{slug(source)}"


def parse_fold(name: str) -> tuple[str, str] | None:
    """(config, fold) of an experiment named <config>-fold-<fold>; None for other names."""
    config, sep, fold = name.rpartition(FOLD)
    return (config, fold) if sep and config and fold else None


def source_values(p: FetchParams) -> list[str]:
    """The distinct `source` values of the configured fetch source (not its `mix`), sorted."""
    from medtune.sources import load_rows

    column = p.columns.get("source")
    if column is None:
        raise MedtuneError(f"fetch.columns maps no `source` column for {p.source}: name the held-out sources with --sources")
    values = {str(r[column]) for r in load_rows(p) if r.get(column) not in (None, "")}
    if not values:
        raise MedtuneError(f"{p.source}: no row has a {column!r} value: name the held-out sources with --sources")
    return sorted(values)


def check_fold_names(config: str, sources: list[str]) -> dict[str, str]:
    """source -> experiment name; two sources with one name are refused."""
    names = {s: fold_name(config, s) for s in sources}
    clash = [s for s in sources if list(names.values()).count(names[s]) > 1]
    if clash:
        raise MedtuneError(f"sources {', '.join(map(repr, clash))} give the same fold name {names[clash[0]]!r}")
    return names


def held_out_sources(fetch: dict, repo: Path, given: list[str]) -> list[str]:
    """The sources given (checked against the data where it can be read), else every source of the data
    (`fetch`: params.yaml's fetch section, its path relative to `repo`)."""
    fetch = dict(fetch)
    if not fetch["source"].startswith("hf:") and not Path(fetch["source"]).is_absolute():
        fetch["source"] = str(repo / fetch["source"])
    try:
        found = source_values(FetchParams(**fetch))
    except MedtuneError as e:
        if not given:
            raise
        log.warning("the held-out sources are not checked against the data: %s", e)
        return given
    if unknown := [s for s in given if s not in found]:
        raise MedtuneError(f"--sources {', '.join(unknown)}: not a source of {fetch['source']} (has {', '.join(found)})")
    return given or found


# ---------------------------------------------------------------- the statistics


def paired(scores: dict[str, float | None], ref: dict[str, float | None]) -> np.ndarray | None:
    """score - reference score per question id (sorted ids), over the ids both score (not None); None when the
    two answered other questions."""
    if set(scores) != set(ref):
        return None
    ids = sorted(k for k in scores if scores[k] is not None and ref[k] is not None)
    return np.array([scores[k] - ref[k] for k in ids], dtype=float)


def two_level_ci(deltas: list[np.ndarray], ev: EvaluateParams, seed: int) -> list[float]:
    """CI of the mean over folds of the per-fold mean delta: each resample draws the folds with replacement,
    then the questions of each drawn fold with replacement."""
    folds = [d for d in deltas if len(d)]
    if not folds:
        raise MedtuneError("no fold has a question to compare")
    rng = np.random.default_rng(seed)
    stats = np.empty(ev.bootstrap_samples)
    for b in range(ev.bootstrap_samples):
        picks = rng.integers(0, len(folds), size=len(folds))
        stats[b] = np.mean([folds[f][rng.integers(0, len(folds[f]), size=len(folds[f]))].mean() for f in picks])
    a = (1 - ev.confidence) / 2
    return [round(float(np.quantile(stats, a)), 4), round(float(np.quantile(stats, 1 - a)), 4)]


def verdict(ci: list[float]) -> str:
    return "wins" if ci[0] > 0 else "loses" if ci[1] < 0 else "within noise"


def cross_fold(deltas: dict[str, np.ndarray], ev: EvaluateParams, seed: int) -> dict:
    """Per fold: n, mean delta, its paired bootstrap CI and won/lost/within noise; over folds: the mean of the
    fold means, its two-level CI, the verdict ("wins" only when that CI lies above 0) and the folds won and lost."""
    per_fold = {}
    for fold, d in sorted(deltas.items()):
        if len(d):
            ci = bootstrap_ci(d, ev, seed)
            per_fold[fold] = {"n": len(d), "delta": round(float(d.mean()), 4), "ci": ci,
                              "result": {"wins": "won", "loses": "lost"}.get(verdict(ci), "within noise")}
    if not per_fold:
        return {"folds": {}, "delta": None, "ci": [None, None], "verdict": "no questions", "won": [], "lost": []}
    ci = two_level_ci([deltas[f] for f in per_fold], ev, seed)
    return {"folds": per_fold, "delta": round(float(np.mean([deltas[f].mean() for f in per_fold])), 4), "ci": ci,
            "verdict": verdict(ci), "won": [f for f, r in per_fold.items() if r["result"] == "won"],
            "lost": [f for f, r in per_fold.items() if r["result"] == "lost"]}


# ---------------------------------------------------------------- the runs


def fold_runs(repo: Path, needs: list[str]) -> tuple[dict[str, dict[str, Run]], dict[str, int]]:
    """config -> fold -> the finished run of that name (`dvc exp show`'s experiments named <config>-fold-<fold>)."""
    runs, skipped = finished_runs(repo, needs)
    out: dict[str, dict[str, Run]] = {}
    for r in runs:
        parsed = parse_fold(r.name)
        if parsed is None:
            skipped["not a fold"] = skipped.get("not a fold", 0) + 1
        elif parsed[1] in out.setdefault(parsed[0], {}):
            raise MedtuneError(f"two finished runs named {r.name} ({out[parsed[0]][parsed[1]].rev[:7]}, {r.rev[:7]}): "
                               "remove one (`dvc exp remove`)")
        else:
            out[parsed[0]][parsed[1]] = r
    return out, skipped


def held_out(run: Run) -> str:
    """The source a fold's run held out, from its params (split.test_sources)."""
    value = run.params.get("split.test_sources")
    sources = json.loads(value) if isinstance(value, str) else value or []
    return ", ".join(map(str, sources)) or "?"


def question_rows(run: Run, path: str) -> dict[str, dict]:
    """id -> the row of a run's predictions file (question, reference, prediction, stopped, scores)."""
    out = {}
    for n, row in parse_jsonl(run.text(path).splitlines(), f"{path} of run {run.name}"):
        if "id" not in row:
            raise MedtuneError(f"{path} of run {run.name} line {n}: no 'id'")
        out[str(row["id"])] = row
    return out


def metric_of(rows: dict[str, dict], metric: str, source: str) -> dict[str, float]:
    try:
        return {k: float(r[metric]) for k, r in rows.items()}
    except (KeyError, TypeError, ValueError):
        raise MedtuneError(f"{source}: a row has no number {metric!r}") from None


def runaway_rate(rows: dict[str, dict]) -> float | None:
    """Share of answers that did not stop (predictions' `stopped`); None when the rows do not say."""
    stopped = [r.get("stopped") for r in rows.values()]
    if not stopped or any(s is None for s in stopped):
        return None
    return round(float(np.mean([not s for s in stopped])), 4)
