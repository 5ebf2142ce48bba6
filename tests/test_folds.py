"""Leave-one-collection-out folds: the fold names, the cross-fold statistics on synthetic per-question deltas,
entity F1 (the measure beyond ROUGE), `medtune folds queue`'s commands, and on the tiny model two folds of two
configurations queued, run with `dvc exp run --run-all` and compared across folds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from medtune import folds
from medtune.console import MedtuneError
from medtune.entities import (
    Lexicon,
    entity_scores,
    load_lexicon,
    parse_lexicon,
    summarise_entities,
)
from medtune.params import EvaluateParams
from medtune.tools import folds as folds_cli
from tests.conftest import REPO
from tests.helpers import dvc

EV = EvaluateParams(max_examples=0, max_new_tokens=8, batch_size=1, bootstrap_samples=1000, confidence=0.95,
                    bertscore_model=None, choice_max_examples=0)


# ---------------------------------------------------------------- names


def test_fold_names_are_valid_experiment_names_and_parse_back():
    assert folds.fold_name("recipe", "1_CancerGov_QA") == "recipe-fold-1-cancergov-qa"
    assert folds.fold_name("LR 2e-4", "8_NHLBI_QA_XML") == "lr-2e-4-fold-8-nhlbi-qa-xml"
    assert folds.parse_fold("lr-2e-4-fold-8-nhlbi-qa-xml") == ("lr-2e-4", "8-nhlbi-qa-xml")
    assert folds.parse_fold("holdout-baseline") is None
    with pytest.raises(MedtuneError, match="must not contain 'fold'"):
        folds.fold_name("a-fold-b", "x")
    with pytest.raises(MedtuneError, match="same fold name"):
        folds.check_fold_names("c", ["A_b", "a-B"])


# ---------------------------------------------------------------- statistics


def noisy(mean: float, n: int, seed: int, sd: float = 0.02) -> np.ndarray:
    return mean + np.random.default_rng(seed).normal(0, sd, n)


def test_better_on_every_question_of_every_fold_wins_everywhere():
    r = folds.cross_fold({f: np.full(30, 0.1) for f in ("a", "b", "c")}, EV, seed=0)
    assert r["verdict"] == "wins" and r["delta"] == 0.1 and r["ci"] == [0.1, 0.1]
    assert r["won"] == ["a", "b", "c"] and r["lost"] == []
    assert all(f["result"] == "won" and f["n"] == 30 for f in r["folds"].values())


def test_better_on_one_fold_worse_on_another_does_not_win():
    r = folds.cross_fold({"a": noisy(0.1, 40, 1), "b": noisy(-0.1, 40, 2)}, EV, seed=0)
    assert r["won"] == ["a"] and r["lost"] == ["b"]
    assert r["ci"][0] < 0 < r["ci"][1] and r["verdict"] == "within noise"


def test_folds_weigh_equally_and_disagreeing_folds_widen_the_ci():
    # 10 questions at +0.2 and 90 at 0: the mean over folds is 0.1, not the question mean 0.02
    r = folds.cross_fold({"small": np.full(10, 0.2), "large": np.zeros(90)}, EV, seed=0)
    assert r["delta"] == pytest.approx(0.1)
    # three folds that disagree, each certain on its own: a bootstrap over questions alone would give one point
    deltas = {"a": np.full(100, 0.3), "b": np.full(100, -0.1), "c": np.full(100, 0.05)}
    r = folds.cross_fold(deltas, EV, seed=0)
    assert r["delta"] == pytest.approx(0.0833, abs=1e-4) and r["ci"][0] < 0 < r["ci"][1] and r["verdict"] == "within noise"
    assert r["won"] == ["a", "c"] and r["lost"] == ["b"]
    assert r["ci"][0] <= r["delta"] <= r["ci"][1]
    assert folds.cross_fold(deltas, EV, seed=0) == r  # seeded
    worse = folds.cross_fold({f: -d for f, d in deltas.items() if f != "b"}, EV, seed=0)
    assert worse["verdict"] == "loses" and worse["lost"] == ["a", "c"]


def test_paired_needs_the_same_questions_and_skips_unscored_ones():
    assert folds.paired({"q1": 0.5, "q2": 0.2}, {"q1": 0.25, "q3": 0.1}) is None
    d = folds.paired({"q2": 0.5, "q1": None, "q3": 0.4}, {"q1": None, "q2": 0.25, "q3": 0.5})
    assert d.tolist() == pytest.approx([0.25, -0.1])
    assert folds.cross_fold({"a": np.array([])}, EV, 0)["verdict"] == "no questions"


def test_runaway_rate_from_the_stopped_flags():
    assert folds.runaway_rate({"a": {"stopped": True}, "b": {"stopped": False}}) == 0.5
    assert folds.runaway_rate({"a": {}}) is None


# ---------------------------------------------------------------- entity F1


LEX = Lexicon([("marfan syndrome", "mesh:marfan", "disease"), ("losartan", "drug:losartan", "drug"),
               ("cozaar", "drug:losartan", "drug"), ("FBN1", "gene:FBN1", "gene"), ("ATM", "gene:ATM", "gene"),
               ("ataxia telangiectasia", "mesh:at", "disease"), ("breast cancer", "mesh:bc", "disease"),
               ("cancer", "mesh:cancer", "disease"), ("aspirin", "drug:aspirin", "drug")])
QUESTION = "What causes Marfan syndrome ?"
REFERENCE = "Mutations in the FBN1 gene cause Marfan syndrome. Losartan can slow the widening of the aorta."


def test_entities_longest_match_synonyms_and_case_sensitive_genes():
    assert LEX.find("Breast cancer, not cancer; COZAAR is losartan") == ["mesh:bc", "mesh:cancer", "drug:losartan", "drug:losartan"]
    assert LEX.find("the ATM gene, not an atm machine; Marfan's syndrome") == ["gene:ATM", "mesh:marfan"]  # possessive dropped
    assert LEX.find("Marfan syndrome's cause") == ["mesh:marfan"]


def test_entity_f1_tells_a_fluent_wrong_answer_from_a_right_one():
    right = entity_scores("Marfan syndrome is caused by changes in FBN1; cozaar helps.", REFERENCE, QUESTION, LEX)
    assert (right["entity_recall"], right["entity_precision"], right["entity_f1"]) == (1.0, 1.0, 1.0)
    wrong = entity_scores("Marfan syndrome is caused by mutations in the ATM gene and treated with aspirin.", REFERENCE,
                          QUESTION, LEX)
    assert wrong["entity_f1"] == 0.0 and wrong["entity_precision"] == 0.0 and wrong["entity_answer"] == 2
    # naming only the question's disease scores nothing; naming nothing has no precision
    echo = entity_scores("Marfan syndrome is caused by Marfan syndrome.", REFERENCE, QUESTION, LEX)
    assert echo["entity_f1"] == 0.0 and echo["entity_precision"] is None and echo["entity_answer"] == 0
    half = entity_scores("FBN1 and aspirin.", REFERENCE, QUESTION, LEX)
    assert (half["entity_recall"], half["entity_precision"], half["entity_f1"]) == (0.5, 0.5, 0.5)
    # a reference that names nothing beyond the question is not scored
    none = entity_scores("anything", "Marfan syndrome is inherited in an autosomal dominant pattern.", QUESTION, LEX)
    assert none["entity_f1"] is None
    s = summarise_entities([right, wrong, none])
    assert s == {"entity_f1": 0.5, "entity_recall": 0.5, "entity_precision": 0.5, "entity_n": 2, "entity_coverage": 0.6667}


def test_the_bundled_lexicon_loads_and_finds_diseases_drugs_and_genes():
    lex = load_lexicon(REPO / "data/benchmarks/medical_terms.txt")
    assert len(lex) > 10_000
    found = lex.find("Mutations in the FBN1 gene cause Marfan syndrome; ibuprofen (Advil) and Crohn's disease; cancer")
    assert found[0] == "gene:FBN1" and found[2] == found[3] and len(found) == 5  # "cancer" alone is too generic: not a term
    with pytest.raises(MedtuneError, match="x.txt:2: expected"):
        parse_lexicon("# comment\nbad line\n", "x.txt")


# ---------------------------------------------------------------- queue


def test_queue_dry_run_prints_one_command_per_source(repo_copy, monkeypatch):
    monkeypatch.chdir(repo_copy)
    run = CliRunner().invoke(folds_cli.main, ["queue", "lr", "--set", "train.learning_rate=1e-2", "--dry-run"])
    assert run.exit_code == 0, run.output
    lines = run.output.strip().splitlines()
    assert [line.split()[5] for line in lines] == ["lr-fold-1-cancergov-qa", "lr-fold-2-gard-qa", "lr-fold-3-ghr-qa",
                                                   "lr-fold-6-ninds-qa"]  # every source of the data, sorted
    assert lines[1].endswith("-S train.learning_rate=1e-2 -S 'split.test_sources=[\"2_GARD_QA\"]' -S evaluate.max_examples=4 "
                             "evaluate_tuned")  # the comparison needs no merged model
    bad = CliRunner().invoke(folds_cli.main, ["queue", "lr", "--sources", "9_CDC_QA", "--dry-run"])
    assert bad.exit_code == 1 and "--sources 9_CDC_QA: not a source of" in bad.output
    bad = CliRunner().invoke(folds_cli.main, ["queue", "lr", "--set", "train.lora_r=0", "--dry-run"])
    assert bad.exit_code == 1 and "train.lora_r" in bad.output
    bad = CliRunner().invoke(folds_cli.main, ["queue", "lr", "--set", "evaluate.max_examples=9", "--dry-run"])
    assert bad.exit_code == 1 and "--test-questions" in bad.output
    recipe = repo_copy / "r.yaml"
    recipe.write_text(yaml.safe_dump({"split": {"test_sources": ["3_GHR_QA"]}, "train": {"lora_r": 4}}))
    run = CliRunner().invoke(folds_cli.main, ["queue", "r4", "--recipe", str(recipe), "--sources", "6_NINDS_QA",
                                              "--test-questions", "3", "--dry-run"])
    assert run.exit_code == 0 and run.output.count("split.test_sources") == 1 and "-S train.lora_r=4 " in run.output


# ---------------------------------------------------------------- the whole loop on the tiny model


def predictions(repo, rev: str, path: str = "eval/tuned/predictions.jsonl") -> dict[str, dict]:
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True, check=True).stdout
    return {r["id"]: r for r in map(json.loads, text.splitlines())}


def test_two_folds_of_two_configurations_queued_run_and_compared(repo_copy):
    sources = ["--sources", "2_GARD_QA", "--sources", "6_NINDS_QA", "--test-questions", "4"]
    for args in (["base"], ["lr", "--set", "train.learning_rate=1e-2"]):
        proc = subprocess.run([sys.executable, "-m", "medtune.tools.folds", "queue", *args, *sources], cwd=repo_copy,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("queued ") == 2
    dvc(repo_copy, "exp", "run", "--run-all")
    status = dvc(repo_copy, "queue", "status")
    failed = [line.split()[1] for line in status.splitlines() if "Failed" in line]
    assert not failed, dvc(repo_copy, "queue", "logs", failed[0])[-3000:]
    shown = json.loads(dvc(repo_copy, "exp", "show", "--json"))
    exps = {e["name"]: e for c in shown for g in c.get("experiments") or [] for e in g["revs"]}
    names = {"base-fold-2-gard-qa", "base-fold-6-ninds-qa", "lr-fold-2-gard-qa", "lr-fold-6-ninds-qa"}
    assert set(exps) == names  # dvc exp show lists the fold experiments
    for name, e in exps.items():
        p = e["data"]["params"]["params.yaml"]["data"]
        assert p["split"]["test_sources"] == [{"gard": "2_GARD_QA", "ninds": "6_NINDS_QA"}[name.split("-")[3]]]
        assert p["evaluate"]["max_examples"] == 4 and p["train"]["learning_rate"] == (0.01 if name.startswith("lr") else 0.001)
        metrics = e["data"]["metrics"]  # run up to evaluate_tuned: no merge (dvc lists its metrics file as missing)
        assert "n" in metrics["metrics/eval_tuned.json"]["data"] and "data" not in metrics.get("metrics/merge.json", {})
    listed = subprocess.run([sys.executable, "-m", "medtune.tools.folds", "list"], cwd=repo_copy, capture_output=True, text=True)
    assert "base: 2 folds: 2-gard-qa (Success), 6-ninds-qa (Success)" in listed.stdout, listed.stderr

    cmd = [sys.executable, "-m", "medtune.tools.folds", "compare", "--out", "reports/folds", "--reference", "base"]
    proc = subprocess.run(cmd, cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = repo_copy / "reports" / "folds"
    rows = list(csv.DictReader((out / "cross_fold.csv").open()))
    assert [(r["config"], r["fold"]) for r in rows] == [("base", "2-gard-qa"), ("base", "6-ninds-qa"), ("base", "mean"),
                                                        ("lr", "2-gard-qa"), ("lr", "6-ninds-qa"), ("lr", "mean")]
    by = {(r["config"], r["fold"]): r for r in rows}
    assert by[("base", "mean")]["delta"] == "0.0" and by[("base", "mean")]["result"] == "reference"
    # the mean over folds, computed here from the experiments' predictions files
    fold_means = []
    for fold in ("2-gard-qa", "6-ninds-qa"):
        lr = predictions(repo_copy, exps[f"lr-fold-{fold}"]["rev"])
        ref = predictions(repo_copy, exps[f"base-fold-{fold}"]["rev"])
        assert set(lr) == set(ref) and len(lr) == {"2-gard-qa": 1, "6-ninds-qa": 4}[fold]  # GARD's two rows: one a duplicate
        fold_means.append(np.mean([lr[k]["rougeL"] - ref[k]["rougeL"] for k in lr]))
        assert float(by[("lr", fold)]["delta"]) == pytest.approx(fold_means[-1], abs=6e-5)
        assert by[("lr", fold)]["n"] == str(len(lr)) and by[("lr", fold)]["held_out"] in ("2_GARD_QA", "6_NINDS_QA")
    mean = by[("lr", "mean")]
    assert float(mean["delta"]) == pytest.approx(np.mean(fold_means), abs=6e-5)
    assert float(mean["delta_ci_low"]) <= float(mean["delta"]) <= float(mean["delta_ci_high"])
    assert mean["result"] in ("wins", "loses", "within noise")
    md = (out / "cross_fold.md").read_text()
    assert "| base (reference) | 2 |" in md and "\n| lr | 2 |" in md and "2_GARD_QA" in md and "6_NINDS_QA" in md
    assert "Δ entity F1" in md and "runaway per fold" in md
    assert (out / "per_fold_deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # against the untuned base model: the reference's eval/base answers; base's row is then its own tuned - base
    proc = subprocess.run(cmd[:-3] + ["reports/vs-base", "--reference", "base", "--reference-predictions",
                                      "eval/base/predictions.jsonl"], cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["config"], r["fold"]): r for r in csv.DictReader((repo_copy / "reports/vs-base/cross_fold.csv").open())}
    deltas = [exps[f"base-fold-{f}"]["data"]["metrics"]["metrics/eval_tuned.json"]["data"]["delta_rougeL"]
              for f in ("2-gard-qa", "6-ninds-qa")]
    assert float(rows[("base", "mean")]["delta"]) == pytest.approx(np.mean(deltas), abs=2e-4)
    assert rows[("base", "mean")]["result"] != "reference"
    proc = subprocess.run(cmd[:-1] + ["nope"], cwd=repo_copy, capture_output=True, text=True)
    assert proc.returncode == 1 and "--reference nope: no finished fold runs named nope-fold-*" in proc.stderr
