"""train -> evaluate (and its multiple-choice second test) -> merge on a tiny model built in a fixture (seconds, CPU,
no network)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerCallback

from medtune import choice
from medtune.choice import (
    choice_inputs,
    choice_prompt,
    choice_scores,
    content_free_items,
    option_logprobs,
    read_choice_test,
    score_choices,
)
from medtune.console import MedtuneError
from medtune.entities import entity_scores, load_lexicon, tokens
from medtune.io import read_jsonl
from medtune.metrics import parse_choice, repetition, score, token_f1
from medtune.params import EvaluateParams, FormatParams, MergeParams, TrainParams
from medtune.prompts import render
from medtune.stages import evaluate, merge, train
from medtune.training import lora_config, sft_config
from tests.conftest import tiny_params
from tests.helpers import BASE, model_params, section, train_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, formatted) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("train")
    metrics = train.run(train_params(tiny_model), model_params(tiny_model), BASE, formatted, d / "adapter", d / "curves", d / "ckpt")
    return d, metrics


def test_train_writes_a_safetensors_adapter_that_changed_only_lora_weights(trained, tiny_model):
    d, metrics = trained
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["steps"] == 4 and metrics["tokens_trained"] > 0 and metrics["trainable_params"] > 0
    weights = load_file(d / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    assert not [k for k in weights if "lora" not in k]  # no base weights in the adapter
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"] and cfg["r"] == 16
    run_config = json.loads((d / "adapter" / "run_config.json").read_text())
    assert run_config["base_model"]["kind"] == "local" and "peft" in run_config["versions"]
    assert (d / "curves" / "loss.png").stat().st_size > 1000
    assert (d / "curves" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    evals = (d / "curves" / "plots" / "metrics" / "eval" / "loss.tsv").read_text().splitlines()
    assert evals[0] == "step\tloss" and evals[1].startswith("0\t")  # the validation loss before training, at step 0


def logged_losses(curves: Path) -> list[float]:
    """The training losses the train stage logged (its log_history.json)."""
    return [h["loss"] for h in json.loads((curves / "log_history.json").read_text()) if "loss" in h]


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise Interrupt(f"killed at step {step}")

    return Stop()


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, tiny_model, formatted):
    args = (train_params(tiny_model), model_params(tiny_model), BASE, formatted)
    whole = train.run(*args, tmp_path / "a1", tmp_path / "c1", tmp_path / "ckpt1")
    assert not (tmp_path / "ckpt1").exists()  # a finished run leaves no checkpoints behind
    with pytest.raises(Interrupt):
        train.run(*args, tmp_path / "a2", tmp_path / "c2", tmp_path / "ckpt2", callbacks=(interrupt_at(3),))
    assert not (tmp_path / "a2").exists()  # no half-written adapter
    assert [x.name for x in (tmp_path / "ckpt2").glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = train.run(*args, tmp_path / "a2", tmp_path / "c2", tmp_path / "ckpt2")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == whole["steps"] == 4
    a, b = (load_file(tmp_path / x / "adapter_model.safetensors") for x in ("a1", "a2"))
    for k in a:  # same seed, same data order: resuming gives the same weights on CPU
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the whole run's figures, not the resumed part's: its mean loss, its tokens, its curves numbered as one run
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-3)
    assert resumed["tokens_trained"] == whole["tokens_trained"] and resumed["train_s"] > resumed["train_s_before_resume"] > 0
    assert resumed["tokens_per_s"] < resumed["tokens_trained"] / resumed["wall_s"]  # the time before the resume counts
    curves = [(tmp_path / c / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines() for c in ("c1", "c2")]
    steps = [[line.split("\t")[0] for line in rows[1:]] for rows in curves]  # columns: step, loss
    assert steps[0] == steps[1] == ["1", "2", "3", "4"]


def test_checkpoints_of_other_params_are_not_resumed(tmp_path, tiny_model, formatted):
    args = (model_params(tiny_model), BASE, formatted)
    with pytest.raises(Interrupt):
        train.run(train_params(tiny_model), *args, tmp_path / "a1", tmp_path / "c1", tmp_path / "ckpt", callbacks=(interrupt_at(3),))
    metrics = train.run(train_params(tiny_model, learning_rate=5e-4), *args, tmp_path / "a2", tmp_path / "c2", tmp_path / "ckpt")
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 4


def test_train_rejects_8bit_optimiser_without_cuda(tmp_path, tiny_model, formatted):
    from medtune.console import MedtuneError

    with pytest.raises(MedtuneError, match="adamw_torch"):
        train.run(train_params(tiny_model, optim="adamw_8bit"), model_params(tiny_model), BASE, formatted,
                  tmp_path / "a", tmp_path / "c", tmp_path / "ckpt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_train_refuses_liger_kernels_on_cpu_before_loading_anything(tmp_path, tiny_model, formatted):
    with pytest.raises(MedtuneError, match="liger_kernels=true needs a CUDA GPU"):
        train.run(train_params(tiny_model, liger_kernels=True), model_params(tiny_model), BASE, formatted,
                  tmp_path / "a", tmp_path / "c", tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_compiled_layers_train_the_same_losses_as_eager(tmp_path, tiny_model, formatted):
    """train.torch_compile compiles each decoder layer in place: same losses (up to float rounding) on
    padding-free rows of a new length every step (dynamic shapes), and the adapter saves under the usual names."""
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        d = tmp_path / str(compiled)
        counters.clear()
        metrics = train.run(train_params(tiny_model, torch_compile=compiled, padding_free=True, save_steps=0),
                  model_params(tiny_model), BASE, formatted, d / "adapter", d / "curves", d / "ckpt")
        assert metrics["torch_compile"] is compiled and (counters["stats"]["unique_graphs"] > 0) is compiled
        runs[compiled] = (logged_losses(d / "curves"), load_file(d / "adapter" / "adapter_model.safetensors"))
    (eager, eager_w), (comp, comp_w) = runs[False], runs[True]
    # the losses after the first step follow the updated weights, so they compare the gradients too; the weights
    # themselves are left out: Adam divides by the gradient's size, which turns float-rounding noise in near-zero
    # gradients into full-size steps
    assert len(eager) == 4 and comp == pytest.approx(eager, rel=1e-3)
    assert comp_w.keys() == eager_w.keys() and all(v.abs().sum() > 0 for k, v in comp_w.items() if "lora_B" in k)


def test_lm_head_tile_sets_trls_tile_width_for_training_and_restores_it(tmp_path, tiny_model, formatted, monkeypatch):
    import trl.trainer.utils as trl_utils

    default, widths = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, []
    real = trl_utils._ChunkedLogProbFunction

    class Spy:  # records the tile width each fused LM-head call gets (its 6th argument)
        @staticmethod
        def apply(*args):
            widths.append(args[5])
            return real.apply(*args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    losses = {}
    for tile in (None, 16):
        d = tmp_path / str(tile)
        widths.clear()
        train.run(train_params(tiny_model, lm_head_tile=tile, save_steps=0), model_params(tiny_model), BASE, formatted,
                  d / "adapter", d / "curves", d / "ckpt")
        assert widths and set(widths) == {tile or default}
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == default
        losses[tile] = logged_losses(d / "curves")
    assert losses[16] == pytest.approx(losses[None], rel=1e-4)  # same loss, in narrower tiles


def test_lm_head_tile_below_16_is_a_params_error(tiny_model):
    from medtune.strict import section_problems

    section = tiny_params(tiny_model)["train"] | {"lm_head_tile": 8}
    assert section_problems(section, "train", TrainParams, {("train", "lm_head_tile"): 7}, "params.yaml") == (None, [
        "params.yaml:7: train.lm_head_tile: input should be greater than or equal to 16 (got 8)"])


def test_train_refuses_liger_kernels_with_torch_compile_before_loading_anything(tmp_path, tiny_model, formatted):
    with pytest.raises(MedtuneError, match="do not work together"):
        train.run(train_params(tiny_model, liger_kernels=True, torch_compile=True), model_params(tiny_model), BASE,
                  formatted, tmp_path / "a", tmp_path / "c", tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


def test_evaluate_scores_base_and_tuned_on_the_same_questions(tmp_path, trained, tiny_model, formatted):
    d, _ = trained
    p = section(EvaluateParams, tiny_model, "evaluate")
    # every word of the references an entity of its own, so the tiny model's answers name some of them
    words = sorted({w.lower() for r in read_jsonl(formatted / "test.jsonl") for w in tokens(r["reference"]) if len(w) > 3})
    lexicon = tmp_path / "terms.txt"
    lexicon.write_text("".join(f"{w}\tword:{w}\tdisease\n" for w in words))
    base = evaluate.run(p, model_params(tiny_model), BASE, formatted, tmp_path / "base", lexicon=lexicon)
    tuned = evaluate.run(p, model_params(tiny_model), BASE, formatted, tmp_path / "tuned", adapter=d / "adapter",
                         baseline=tmp_path / "base" / "predictions.jsonl", lexicon=lexicon)
    assert base["n"] == tuned["n"] == 4
    for m in (base, tuned):
        lo, hi = m["rougeL_ci"]
        assert 0 <= lo <= m["rougeL"] <= hi <= 1
        assert 0 <= m["runaway_rate"] <= 1 and 0 <= m["empty_rate"] <= 1
    assert "delta_rougeL" in tuned and "delta_rougeL" not in base
    preds = {p["id"]: p for p in read_jsonl(tmp_path / "tuned" / "predictions.jsonl")}
    base_preds = {p["id"]: p for p in read_jsonl(tmp_path / "base" / "predictions.jsonl")}
    assert preds.keys() == base_preds.keys()
    mean_delta = sum(preds[i]["rougeL"] - base_preds[i]["rougeL"] for i in preds) / len(preds)
    assert tuned["delta_rougeL"] == pytest.approx(mean_delta, abs=1e-3)
    lex = load_lexicon(lexicon)  # each answer's entity F1 is entities.entity_scores of it; the mean over scored ones
    for pred in preds.values():
        assert pred["entity_f1"] == entity_scores(pred["prediction"], pred["reference"], pred["question"], lex)["entity_f1"]
    scored = [i for i in preds if preds[i]["entity_f1"] is not None]
    assert tuned["entity_n"] == len(scored) > 0 and 0 <= tuned["entity_f1_ci"][0] <= tuned["entity_f1_ci"][1] <= 1
    assert tuned["entity_f1"] == pytest.approx(sum(preds[i]["entity_f1"] for i in scored) / len(scored), abs=1e-3)
    assert tuned["delta_entity_f1"] == pytest.approx(
        sum(preds[i]["entity_f1"] - base_preds[i]["entity_f1"] for i in scored) / len(scored), abs=1e-3)
    by = json.loads((tmp_path / "tuned" / "breakdown.json").read_text())
    assert sum(v["n"] for v in by["source"].values()) == tuned["n"]
    page = (tmp_path / "tuned" / "examples.md").read_text()
    assert "## Largest gains" in page and "| reference | base | tuned |" in page


def test_rouge_and_token_f1_score_real_text():
    ref = "Glaucoma damages the optic nerve and can cause blindness."
    rows = [{"id": str(i), "question": "q", "reference": ref} for i in range(3)]
    answers = [ref, "The optic nerve is damaged by glaucoma.", "Take two aspirin daily."]
    scored = score(rows, [{"answer": a, "stopped": True, "new_tokens": 5} for a in answers], None)
    assert [s["rougeL"] for s in scored][0] == 1.0 and scored[2]["rougeL"] == 0.0
    # LCS "glaucoma"? no: "the optic nerve" (3 tokens, stemmed) of 7 answer and 9 reference tokens: F1 = 2PR/(P+R)
    assert scored[1]["rougeL"] == pytest.approx(round(2 * (3 / 7) * (3 / 9) / (3 / 7 + 3 / 9), 4))
    assert scored[1]["rouge1"] > scored[1]["rougeL"] > 0  # unigrams overlap beyond the longest common subsequence
    assert token_f1("The cause is unknown.", "the cause is unknown") == 1.0
    assert token_f1("fever", "headache") == 0.0
    assert repetition("a b c a b c a b c a b c") > 0.5 > repetition("one two three four five six")


def test_merge_matches_base_plus_adapter(tmp_path, trained, tiny_model, formatted):
    d, _ = trained
    p = section(MergeParams, tiny_model, "merge")
    metrics = merge.run(p, model_params(tiny_model), d / "adapter", formatted, tmp_path / "merged")
    assert metrics["passed"] and metrics["greedy_answers_identical"] and metrics["max_abs_logit_diff"] <= p.atol
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "merged" / "run_config.json").read_text())["merge_check"]["passed"]


def test_merge_fails_on_an_impossible_tolerance_and_writes_nothing(tmp_path, trained, tiny_model, formatted):
    from medtune.console import MedtuneError

    d, _ = trained
    p = section(MergeParams, tiny_model, "merge", dtype="bfloat16", atol=1e-9)
    with pytest.raises(MedtuneError, match="merge check failed"):
        merge.run(p, model_params(tiny_model), d / "adapter", formatted, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_padding_free_batches_give_the_same_loss_as_padded_ones(tmp_path, tiny_model, formatted):
    """Padding-free rows hold several sequences; they must not attend to each other (the loss would change)."""
    args = (model_params(tiny_model), BASE, formatted)
    padded = train.run(train_params(tiny_model, batch_size=4, save_steps=0), *args, tmp_path / "a1", tmp_path / "c1", tmp_path / "k1")
    free = train.run(train_params(tiny_model, batch_size=4, save_steps=0, padding_free=True), *args, tmp_path / "a2", tmp_path / "c2", tmp_path / "k2")
    assert free["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)
    assert free["tokens_trained"] == padded["tokens_trained"]
    # attention runs per sequence (tests/test_attention.py), also through recomputed (checkpointed) layers
    assert (padded["attn_implementation"], free["attn_implementation"]) == ("sdpa", "medtune_varlen")
    gc = train.run(train_params(tiny_model, batch_size=4, save_steps=0, padding_free=True, gradient_checkpointing=True),
                   *args, tmp_path / "a3", tmp_path / "c3", tmp_path / "k3")
    assert gc["train_loss"] == pytest.approx(padded["train_loss"], rel=1e-4)


def test_loss_is_on_answer_tokens_only_and_the_end_of_turn_token_is_trained(tiny_model, formatted, tmp_path):
    """Inspect the labels the trainer sees for a rendered example, the way train.run builds them."""
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from medtune.models import end_of_turn, load_tokenizer, stop_token_ids
    from medtune.training import check_examples, token_dataset

    m = model_params(tiny_model)
    tok = load_tokenizer(tiny_model, m)
    row = read_jsonl(formatted / "train.jsonl")[0]
    p = train_params(tiny_model)
    toks = check_examples(p, [row], tok, stop_token_ids(tok), formatted / "train.jsonl")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=sft_config(p, 0, tmp_path, end_of_turn(tok), False),
                         train_dataset=token_dataset(toks), processing_class=tok, peft_config=lora_config(p))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert ids == tok(row["prompt"] + row["completion"])["input_ids"]  # trl adds nothing: the completion ends with EOT
    assert all(x == -100 for x in labels[:n_prompt])  # no loss on the question
    assert labels[n_prompt:] == ids[n_prompt:]  # loss on every answer token ...
    assert labels[-1] == tok.convert_tokens_to_ids(end_of_turn(tok)) == tok.convert_tokens_to_ids("<eos>")  # ... and on EOT


def test_evaluate_reports_test_loss_medical_answer_checks_and_skips_bertscore_without_a_scorer(tmp_path, trained, tiny_model, formatted):
    d, _ = trained
    p = section(EvaluateParams, tiny_model, "evaluate", bertscore_model="/no/such/scorer")
    first = read_jsonl(formatted / "test.jsonl")[0]["reference"]
    m = evaluate.run(p, model_params(tiny_model), BASE, formatted, tmp_path / "base", disclaimer=first[:40])
    assert m["test_loss"] > 0 and m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]), rel=1e-3)
    assert m["test_loss_tokens"] > 0
    assert m["bertscore_note"].startswith("skipped") and "bertscore_f1" not in m  # never fails the stage
    for k in ("disclaimer_rate", "referral_rate", "runaway_rate", "empty_rate", "repetition_rate"):
        assert 0 <= m[k] <= 1
    assert m["length_ratio"] == pytest.approx(m["answer_words_mean"] / m["reference_words_mean"], rel=1e-2)


def test_evaluate_computes_bertscore_with_an_offline_scorer(tmp_path, tiny_model, formatted):
    p = section(EvaluateParams, tiny_model, "evaluate", bertscore_model=str(tiny_model))
    m = evaluate.run(p, model_params(tiny_model), BASE, formatted, tmp_path / "base")
    lo, hi = m["bertscore_f1_ci"]
    assert "bertscore_note" not in m and -1 <= lo <= m["bertscore_f1"] <= hi <= 1
    assert all("bertscore_f1" in r for r in read_jsonl(tmp_path / "base" / "predictions.jsonl"))


def test_multiple_choice_accuracy_parses_the_chosen_option_and_counts_unparseable_as_wrong(tmp_path, tiny_model, formatted):
    options = {"A": "fever", "B": "headache", "C": "rash", "D": "cough"}
    assert parse_choice("Answer: B. headache", options) == "B"
    assert parse_choice("(C) rash, because ...", options) == "C"
    assert parse_choice("It is most likely a cough.", options) == "D"
    assert parse_choice("a fever or a rash", options) is None  # two options named: unparseable
    data = tmp_path / "mcq"
    data.mkdir()
    rows = read_jsonl(formatted / "test.jsonl")
    (data / "test.jsonl").write_text("".join(json.dumps(r | {"options": options, "correct": "B"}) + "\n" for r in rows))
    p = section(EvaluateParams, tiny_model, "evaluate")
    m = evaluate.run(p, model_params(tiny_model), BASE, data, tmp_path / "out")
    preds = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert m["mcq_n"] == len(preds) == 4
    assert m["mcq_accuracy"] == pytest.approx(sum(r["choice"] == "B" for r in preds) / 4)
    assert m["mcq_unparseable_rate"] == pytest.approx(sum(r["choice"] is None for r in preds) / 4)


def test_merge_shards_large_weights_and_the_sharded_model_loads(tmp_path, trained, tiny_model, formatted):
    from transformers import AutoModelForCausalLM

    d, _ = trained
    p = section(MergeParams, tiny_model, "merge", max_shard_size="20KB")
    metrics = merge.run(p, model_params(tiny_model), d / "adapter", formatted, tmp_path / "merged")
    assert metrics["passed"] and metrics["weight_files"] > 1
    assert (tmp_path / "merged" / "model.safetensors.index.json").exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").num_parameters() > 0


def test_packing_trains_on_the_same_tokens_as_padded_batches(tmp_path, tiny_model, formatted):
    args = (model_params(tiny_model), BASE, formatted)
    padded = train.run(train_params(tiny_model, save_steps=0), *args, tmp_path / "a1", tmp_path / "c1", tmp_path / "k1")
    packed = train.run(train_params(tiny_model, save_steps=0, packing=True, max_length=128), *args, tmp_path / "a2", tmp_path / "c2", tmp_path / "k2")
    assert math.isfinite(packed["train_loss"]) and packed["steps"] == 4
    # packed rows hold several examples each, so 4 steps see more real tokens than 4 padded batches of 2
    assert packed["tokens_trained"] > padded["tokens_trained"]


def test_best_checkpoint_selection_keeps_the_lowest_eval_loss(tmp_path, tiny_model, formatted):
    p = train_params(tiny_model, max_steps=6, eval_steps=2, save_steps=2, load_best_model=True, learning_rate=0.05)
    m = train.run(p, model_params(tiny_model), BASE, formatted, tmp_path / "a", tmp_path / "c", tmp_path / "k")
    assert m["eval_loss"] == pytest.approx(m["best_eval_loss"], abs=1e-3)
    assert m["best_eval_step"] in (2, 4, 6)


class OutOfMemoryOnce(TrainerCallback):
    """Fails the first training step the way torch's CPU allocator does when memory runs out."""

    def __init__(self):
        self.raised = False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.raised:
            self.raised = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")


def test_auto_find_batch_size_halves_the_batch_after_an_out_of_memory_error(tmp_path, tiny_model, formatted):
    args = (model_params(tiny_model), BASE, formatted)
    m = train.run(train_params(tiny_model, auto_find_batch_size=True, save_steps=0), *args,
                  tmp_path / "a", tmp_path / "c", tmp_path / "k", callbacks=(OutOfMemoryOnce(),))
    assert m["batch_size"] == 1 and m["steps"] == 4 and math.isfinite(m["train_loss"])  # 2 -> 1, then trained
    with pytest.raises(RuntimeError, match="can't allocate memory"):  # without the knob the error stops the stage
        train.run(train_params(tiny_model, save_steps=0), *args, tmp_path / "a2", tmp_path / "c2", tmp_path / "k2",
                  callbacks=(OutOfMemoryOnce(),))


def test_train_params_reject_best_model_without_periodic_evaluation(tiny_model):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="load_best_model: needs eval_steps > 0"):
        train_params(tiny_model, load_best_model=True, eval_steps=0)


def test_train_stops_before_loading_the_model_when_an_example_exceeds_max_length(tmp_path, tiny_model, formatted):
    from medtune.console import MedtuneError

    # below the params' floor of 64, so built without validation: the tiny fixture's examples are all shorter than 64
    short = TrainParams.model_construct(**(train_params(tiny_model).model_dump() | {"max_length": 16}))
    with pytest.raises(MedtuneError, match=r"train\.jsonl line \d+ .*train\.max_length=16"):
        train.run(short, model_params(tiny_model), BASE, formatted, tmp_path / "a", tmp_path / "c", tmp_path / "k")
    assert not (tmp_path / "a").exists()


def test_train_refuses_answers_that_do_not_end_with_a_stop_token(tmp_path, tiny_model, formatted):
    """A template mistake (answers without the end-of-turn token) would train a model that never stops."""
    from medtune.console import MedtuneError

    bad = tmp_path / "fmt"
    bad.mkdir()
    for name in ("train", "val"):
        rows = read_jsonl(formatted / f"{name}.jsonl")
        (bad / f"{name}.jsonl").write_text("".join(json.dumps(r | {"completion": r["completion"].replace("<eos>", "")}) + "\n" for r in rows))
    with pytest.raises(MedtuneError, match="never learn to stop"):
        train.run(train_params(tiny_model), model_params(tiny_model), BASE, bad, tmp_path / "a", tmp_path / "c", tmp_path / "k")


@pytest.fixture(scope="module")
def knob_baseline(tmp_path_factory, tiny_model, formatted):
    d = tmp_path_factory.mktemp("knobs")
    m = train.run(train_params(tiny_model, save_steps=0), model_params(tiny_model), BASE, formatted, d / "a", d / "c", d / "k")
    return d, m


def train_with(tmp_path, tiny_model, formatted, **kw) -> tuple[Path, dict]:
    m = train.run(train_params(tiny_model, save_steps=0, **kw), model_params(tiny_model), BASE, formatted,
                  tmp_path / "a", tmp_path / "c", tmp_path / "k")
    return tmp_path / "a", m


def test_lora_knobs_reach_the_adapter(tmp_path, tiny_model, formatted):
    a, _ = train_with(tmp_path, tiny_model, formatted, lora_r=4, lora_alpha=8, lora_dropout=0.2, lora_bias="all",
                      target_modules=["all-linear"])
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["bias"]) == (4, 8, 0.2, "all")
    trained = {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]}  # peft may list full module paths
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= trained


def test_scheduler_and_warmup_steps_shape_the_learning_rate(tmp_path, tiny_model, formatted):
    a, _ = train_with(tmp_path, tiny_model, formatted, lr_scheduler="constant_with_warmup", warmup=2, learning_rate=1e-3)
    lrs = [h["learning_rate"] for h in json.loads((tmp_path / "c" / "log_history.json").read_text()) if "learning_rate" in h]
    assert lrs[0] < lrs[2] == lrs[3] == pytest.approx(1e-3)  # two warm-up steps, then constant


def test_gradient_accumulation_trains_on_more_tokens_per_step(tmp_path, tiny_model, formatted, knob_baseline):
    _, m = train_with(tmp_path, tiny_model, formatted, grad_accum=2)
    assert m["steps"] == knob_baseline[1]["steps"] and m["tokens_trained"] > 1.5 * knob_baseline[1]["tokens_trained"]


class SavedActivations(TrainerCallback):
    """Bytes of the tensors autograd keeps for the backward pass, per training step (the activation memory that
    gradient checkpointing trades for recomputation)."""

    def __init__(self):
        self.per_step, self.hooks = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.per_step.append(0)

        def pack(t):
            self.per_step[-1] += t.numel() * t.element_size()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.hooks.__exit__(None, None, None)


def test_gradient_checkpointing_keeps_less_activation_memory_and_the_same_result(tmp_path, tiny_model, formatted):
    plain, checkpointed = SavedActivations(), SavedActivations()
    args = (model_params(tiny_model), BASE, formatted)
    a = train.run(train_params(tiny_model, save_steps=0), *args, tmp_path / "a1", tmp_path / "c1", tmp_path / "k1", callbacks=(plain,))
    b = train.run(train_params(tiny_model, save_steps=0, gradient_checkpointing=True), *args, tmp_path / "a2", tmp_path / "c2",
                  tmp_path / "k2", callbacks=(checkpointed,))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert len(plain.per_step) == len(checkpointed.per_step) == 4
    assert sum(checkpointed.per_step) < 0.6 * sum(plain.per_step), (plain.per_step, checkpointed.per_step)


@pytest.mark.parametrize("knob", [{"neftune_noise_alpha": 5.0}, {"weight_decay": 0.5}, {"learning_rate": 1e-4}])
def test_training_knobs_change_the_adapter(tmp_path, tiny_model, formatted, knob_baseline, knob):
    a, _ = train_with(tmp_path, tiny_model, formatted, **knob)
    base = load_file(knob_baseline[0] / "a" / "adapter_model.safetensors")
    new = load_file(a / "adapter_model.safetensors")
    assert any(not torch.allclose(base[k], new[k]) for k in base)


def test_epochs_when_max_steps_is_off(tmp_path, tiny_model, formatted):
    n_train = len(read_jsonl(formatted / "train.jsonl"))
    _, m = train_with(tmp_path, tiny_model, formatted, max_steps=-1, epochs=1.0, batch_size=8)
    assert m["steps"] == math.ceil(n_train / 8)


# ---------------------------------------------------------------- the second test: multiple choice by log-likelihood

CHOICE_OPTIONS = [["rare", "common", "not known"], ["inherited", "not inherited"], ["no", "it is", "unknown"]]


@pytest.fixture(scope="module")
def choice_file(tmp_path_factory, tiny_rows) -> Path:
    """Six items in the choice-test shape. The tiny tokenizer knows only the fixture's words, so the options are
    words of the fixture; some are two tokens long, and one item has no context (other sets may lack it)."""
    items = []
    for k in range(6):
        opts = CHOICE_OPTIONS[k % 3]
        r = tiny_rows[k]
        item = {"id": f"choice/{k}", "question": r["question"], "context": f"BACKGROUND: {r['answer']}\nRESULTS: it is rare",
                "options": opts, "answer": opts[k % len(opts)]}
        items.append(item if k != 4 else {x: v for x, v in item.items() if x != "context"})
    path = tmp_path_factory.mktemp("choice") / "choice.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in reversed(items)))  # unsorted: the stage sorts by id
    return path


def fmt_params(tiny_model, **kw):
    return section(FormatParams, tiny_model, "format", **kw)


def test_choice_test_scores_each_option_and_the_tuned_run_has_the_paired_delta(tmp_path, trained, tiny_model, formatted, choice_file):
    d, _ = trained
    p = section(EvaluateParams, tiny_model, "evaluate")  # choice_max_examples=3
    args = (model_params(tiny_model), BASE, formatted)
    kw = {"choice_test": choice_file, "fmt": fmt_params(tiny_model)}
    base = evaluate.run(p, *args, tmp_path / "base", **kw)
    tuned = evaluate.run(p, *args, tmp_path / "tuned", adapter=d / "adapter", baseline=tmp_path / "base" / "predictions.jsonl", **kw)
    items = {it["id"]: it for it in read_jsonl(choice_file)}
    for m, name in ((base, "base"), (tuned, "tuned")):
        preds = read_jsonl(tmp_path / name / "choice_predictions.jsonl")
        assert m["choice_n"] == len(preds) == p.choice_max_examples == 3
        assert [r["id"] for r in preds] == sorted(items)[:3]  # the first N by id
        for r in preds:
            it = items[r["id"]]
            assert sorted(r["logprobs"]) == sorted(it["options"]) and all(v < 0 for v in r["logprobs"].values())
            assert r["choice"] == max(it["options"], key=r["logprobs"].get) and r["answer"] == it["answer"]
            assert r["correct"] == (r["choice"] == r["answer"])
            # calibrated: the option whose log-prob rose most over the content-free prompt's (values rounded to 1e-4)
            assert sorted(r["prior_logprobs"]) == sorted(it["options"]) and all(v < 0 for v in r["prior_logprobs"].values())
            gain = {o: r["logprobs"][o] - r["prior_logprobs"][o] for o in it["options"]}
            assert gain[r["calibrated_choice"]] >= max(gain.values()) - 2e-4
            assert r["calibrated_correct"] == (r["calibrated_choice"] == r["answer"])
        for key, correct in (("choice_accuracy", "correct"), ("choice_calibrated_accuracy", "calibrated_correct")):
            lo, hi = m[f"{key}_ci"]
            assert 0 <= lo <= m[key] <= hi <= 1
            assert m[key] == pytest.approx(sum(r[correct] for r in preds) / 3, abs=1e-4)
        assert m["choice_majority_rate"] == pytest.approx(max(Counter(r["answer"] for r in preds).values()) / 3, abs=1e-4)
        every_option = [o for opts in CHOICE_OPTIONS for o in opts]  # items 0-2 have the three option lists
        for key, chosen in (("choice_answer_counts", "choice"), ("choice_calibrated_answer_counts", "calibrated_choice")):
            assert list(m[key]) == every_option and sum(m[key].values()) == m["choice_n"]
            assert m[key] == {o: sum(r[chosen] == o for r in preds) for o in every_option}
    assert "delta_choice_accuracy" not in base and "delta_choice_calibrated_accuracy" not in base
    for key in ("choice_accuracy", "choice_calibrated_accuracy"):
        lo, hi = tuned[f"delta_{key}_ci"]
        assert lo <= tuned[f"delta_{key}"] <= hi
        assert tuned[f"delta_{key}"] == pytest.approx(tuned[key] - base[key], abs=1e-3)
    base_preds = {r["id"]: r for r in read_jsonl(tmp_path / "base" / "choice_predictions.jsonl")}
    for r in read_jsonl(tmp_path / "tuned" / "choice_predictions.jsonl"):
        assert (r["base_choice"], r["base_calibrated_choice"]) == (base_preds[r["id"]]["choice"], base_preds[r["id"]]["calibrated_choice"])

    # a base run written before calibrated scoring: the tuned run stops before loading a model and names the file
    old = tmp_path / "old_base"
    old.mkdir()
    (old / "predictions.jsonl").write_text((tmp_path / "base" / "predictions.jsonl").read_text())
    (old / "choice_predictions.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k not in ("calibrated_choice", "calibrated_correct", "prior_logprobs")}) + "\n"
        for r in base_preds.values()))
    with pytest.raises(MedtuneError, match=r"old_base/choice_predictions\.jsonl: 3 of the 3 items have no calibrated choice "
                                           r"\(e\.g\. choice/0: no 'calibrated_correct'.*; re-run evaluate_base"):
        evaluate.run(p, *args, tmp_path / "tuned_old", adapter=d / "adapter", baseline=old / "predictions.jsonl", **kw)
    assert not (tmp_path / "tuned_old").exists()

    every = section(EvaluateParams, tiny_model, "evaluate", choice_max_examples=0)
    with pytest.raises(MedtuneError, match=r"choice_predictions\.jsonl: lacks 3 of the 6 choice-test ids .*re-run evaluate_base"):
        evaluate.run(every, *args, tmp_path / "tuned2", adapter=d / "adapter", baseline=tmp_path / "base" / "predictions.jsonl", **kw)
    assert not (tmp_path / "tuned2").exists()
    assert evaluate.run(every, *args, tmp_path / "all", **kw)["choice_n"] == 6


def test_batched_padded_option_scores_equal_one_sequence_at_a_time(tiny_model, choice_file):
    """Left padding, deduplicated inputs and logits kept for the last positions only must not shift an offset."""
    from medtune.models import load_model, load_tokenizer

    m = model_params(tiny_model)
    tok, model = load_tokenizer(tiny_model, m), load_model(tiny_model, m).eval()
    for fmt in (fmt_params(tiny_model), fmt_params(tiny_model, template="alpaca", system_prompt="Answer briefly .")):
        items = read_choice_test(choice_file)
        inputs = choice_inputs(tok, fmt, items)
        assert len({len(x) for x in inputs}) > 4 and {len(t) for v in inputs.values() for _, _, t in v} == {1, 2}
        batched = option_logprobs(model, tok, items, inputs, batch_size=4)
        for it, scores in zip(items, batched):
            prompt = choice_prompt(tok, fmt, it)
            assert prompt == render(tok, fmt, {"id": it["id"], "question": prompt_question(it)})[0]
            n = len(tok(prompt)["input_ids"])
            for option, got in zip(it["options"], scores):
                ids = tok(prompt + option, return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    logp = model(ids).logits[0].float().log_softmax(-1)
                want = sum(float(logp[k - 1, ids[0, k]]) for k in range(n, ids.shape[1]))
                assert got == pytest.approx(want, abs=1e-4), (it["id"], option)


def test_calibrated_scores_equal_logp_after_the_prompt_minus_logp_after_the_content_free_prompt(tiny_model, choice_file):
    """One sequence at a time, with the content-free prompt spelled out: no context, "N/A", the same answer line."""
    from medtune.models import load_model, load_tokenizer

    m = model_params(tiny_model)
    tok, model = load_tokenizer(tiny_model, m), load_model(tiny_model, m).eval()

    def logp(prompt: str, option: str) -> float:
        n = len(tok(prompt)["input_ids"])
        ids = tok(prompt + option, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)
        return sum(float(lp[k - 1, ids[0, k]]) for k in range(n, ids.shape[1]))

    fmt = fmt_params(tiny_model)
    items = read_choice_test(choice_file)
    free = content_free_items(items)
    assert [f["options"] for f in free] == [items[0]["options"], items[1]["options"], items[2]["options"]]  # one per list
    inputs = choice_inputs(tok, fmt, items + free)
    raw, prior = choice_scores(model, tok, items, inputs, batch_size=4)
    for it, lp, lp0 in zip(items, raw, prior):
        prompt = choice_prompt(tok, fmt, it)
        opts = it["options"]
        free_prompt = render(tok, fmt, {"id": "x", "question": f"N/A\nAnswer {', '.join(opts[:-1])} or {opts[-1]}."})[0]
        for option, got, got0 in zip(opts, lp, lp0):
            want = logp(prompt, option) - logp(free_prompt, option)
            assert got - got0 == pytest.approx(want, abs=1e-4), (it["id"], option)
    rows = score_choices(model, tok, items, inputs, section(EvaluateParams, tiny_model, "evaluate"))
    for r, it, lp, lp0 in zip(rows, items, raw, prior):
        assert r["calibrated_choice"] == it["options"][max(range(len(lp)), key=lambda j: lp[j] - lp0[j])]


def prompt_question(item: dict) -> str:
    """The question text the choice test renders, spelled out: context, blank line, question, what to answer."""
    opts = item["options"]
    head = f"{item['context']}\n\n" if item.get("context") else ""
    return f"{head}{item['question']}\nAnswer {', '.join(opts[:-1])} or {opts[-1]}."


GOOD_ITEM = {"id": "a", "question": "Is it rare ?", "options": ["rare", "common"], "answer": "rare"}


@pytest.mark.parametrize("lines, error", [
    ([json.dumps(GOOD_ITEM), '{"id": "b", "question": "Is it common ?",', json.dumps(GOOD_ITEM | {"id": "c"})],
     r"bad\.jsonl:2: malformed JSON"),
    ([json.dumps(GOOD_ITEM), "", json.dumps(GOOD_ITEM | {"id": "b", "answer": "often"})],
     r"bad\.jsonl:3: answer: expected one of the options \['rare', 'common'\], got 'often'"),
    ([json.dumps({k: v for k, v in GOOD_ITEM.items() if k != "options"})], r"bad\.jsonl:1: missing key 'options'"),
    ([json.dumps(GOOD_ITEM), json.dumps(GOOD_ITEM)], r"bad\.jsonl:2: id: 'a' repeats the id of line 1"),
])
def test_a_malformed_choice_test_names_the_file_and_line_and_writes_nothing(tmp_path, tiny_model, formatted, lines, error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(MedtuneError, match=error):
        evaluate.run(section(EvaluateParams, tiny_model, "evaluate"), model_params(tiny_model), BASE, formatted,
                     tmp_path / "out", choice_test=bad, fmt=fmt_params(tiny_model))
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_reports_a_malformed_choice_test_in_one_line(tmp_path, tiny_model, formatted, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model)))
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD_ITEM) + "\nnot json\n")
    result = CliRunner().invoke(evaluate.main, ["--data", str(formatted), "--choice-test", "bad.jsonl", "--out", "out",
                                                "--metrics", "m.json"])
    assert result.exit_code == 1 and "bad.jsonl:2: malformed JSON" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_an_option_whose_tokens_merge_with_the_prompt_is_refused(tiny_model, choice_file, monkeypatch):
    from medtune.models import load_tokenizer

    monkeypatch.setattr(choice, "choice_prompt", lambda tok, fmt, item: "is it")  # "is it" + "rare" = "is itrare"
    with pytest.raises(MedtuneError, match=r"choice test item 'choice/\d': the prompt's tokens are not a prefix"):
        choice_inputs(load_tokenizer(tiny_model, model_params(tiny_model)), fmt_params(tiny_model),
                               read_choice_test(choice_file))
