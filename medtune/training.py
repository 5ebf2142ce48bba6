"""Fine-tuning with trl's SFTTrainer and a peft LoRA adapter: the trainer's configuration, the checks that the
examples train as rendered, checkpoints for resuming, and the loss curves."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import time
from pathlib import Path

from medtune.attention import compile_decoder_layers, use_varlen_attention
from medtune.callbacks import Progress, StartOfCurve, guards
from medtune.checkpoints import (
    before_resume,
    complete_checkpoint,
    fingerprint,
    last_checkpoint,
    whole_run_loss,
)
from medtune.console import MedtuneError, on_terminal
from medtune.io import read_jsonl
from medtune.models import (
    device,
    load_model,
    load_tokenizer,
    resolve_base,
    set_seed,
    stop_token_ids,
)
from medtune.params import ModelParams, TrainParams
from medtune.prompts import trained_tokens

log = logging.getLogger("medtune.train")


def under_fsdp() -> bool:
    """Whether `accelerate launch` runs this process under an FSDP config (accelerate sets the variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def preflight(p: TrainParams) -> None:
    """Fail before loading anything on combinations that cannot work here."""
    if p.optim in ("adamw_8bit", "paged_adamw_8bit") and device() != "cuda":
        raise MedtuneError(f"train.optim={p.optim} needs a CUDA GPU (bitsandbytes); on CPU use -S train.optim=adamw_torch")
    if p.quantization != "none" and device() != "cuda":
        raise MedtuneError(f"train.quantization={p.quantization} needs a CUDA GPU (bitsandbytes); on CPU use "
                           "-S train.quantization=none (plain LoRA on the full-precision base)")
    if p.liger_kernels and p.torch_compile:  # measured on an H200: dynamo fails inside Liger's RMSNorm
        raise MedtuneError("train.liger_kernels and train.torch_compile do not work together (torch.compile fails on "
                           "Liger's kernels); choose one: -S train.liger_kernels=false or -S train.torch_compile=false")
    if under_fsdp() and p.quantization != "none":  # needs bnb_4bit_quant_storage and a different loading path; not built yet
        raise MedtuneError(f"train.quantization={p.quantization} under FSDP is not supported: use DDP "
                           "(configs/accelerate/ddp.yaml) for QLoRA, or quantization none with FSDP")
    if under_fsdp() and p.torch_compile:
        raise MedtuneError("train.torch_compile under FSDP is not supported (compiled layers are not verified with "
                           "FSDP's sharding); use -S train.torch_compile=false, or DDP (configs/accelerate/ddp.yaml)")
    if p.liger_kernels:
        import importlib.util

        if device() != "cuda":
            raise MedtuneError("train.liger_kernels=true needs a CUDA GPU (Triton kernels); on CPU use -S train.liger_kernels=false")
        if importlib.util.find_spec("liger_kernel") is None:
            raise MedtuneError('train.liger_kernels=true needs the liger-kernel package: pip install -e ".[gpu]"')


def check_examples(p: TrainParams, rows: list[dict], tok, stops: list[int], path: Path) -> list[dict]:
    """Catch template/EOS mistakes before the model loads: every example fits max_length, the prompt tokenises
    the same alone (as evaluation sees it) and before its answer (as training sees it), and each answer ends
    with a token that stops generation, so the model learns to stop where evaluation expects it to. Returns the
    examples' tokens (prompts.trained_tokens), which training then uses as they are."""
    toks = trained_tokens(tok, rows)
    for i, (r, t) in enumerate(zip(rows, toks), 1):
        where = f"{path} line {i} (id {r.get('id', '?')})"
        full = t["ids"]
        if t["n_prompt"] >= p.max_length:
            raise MedtuneError(f"{where}: the prompt alone is {t['n_prompt']} tokens, train.max_length={p.max_length} "
                               "leaves no room for the answer; raise train.max_length or shorten format.system_prompt")
        if len(full) > p.max_length:
            raise MedtuneError(f"{where}: {len(full)} tokens > train.max_length={p.max_length}, so its end-of-turn token "
                               "would be cut; raise train.max_length or lower format.max_length")
        if not t["prefix_ok"]:
            raise MedtuneError(f"{where}: the prompt tokenises differently before its answer than alone, so evaluation "
                               "would prompt the model differently from training; the template must end the prompt on a "
                               "token boundary (e.g. a newline)")
        if full[-1] not in stops and not r.get("cut_at_max_length"):  # format.overflow=cut loses it on purpose
            raise MedtuneError(f"{where}: the answer ends with {tok.convert_ids_to_tokens(full[-1])!r}, not a token that stops "
                               f"generation ({', '.join(tok.convert_ids_to_tokens(stops))}); the model would never learn to "
                               "stop: check model.chat_template / format.template")
    return toks


def token_dataset(toks: list[dict]):
    """The examples as trl trains them, tokenized once by prompts.trained_tokens: input ids, and labels that are
    -100 (no loss) on the prompt and the ids themselves on the answer and its end token. trl takes such a
    dataset as it is, instead of tokenizing the text a second time."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [t["ids"] for t in toks],
                                       "labels": [[-100] * t["n_prompt"] + t["ids"][t["n_prompt"]:] for t in toks]})


def check_trainer_examples(trainer, rows: list[dict], toks: list[dict], n: int = 8) -> None:
    """The first examples exactly as the trainer will see them: the answer tokens, and only they, carry loss,
    including the end-of-turn token (prompts.trained_tokens is the rule)."""
    ds = trainer.train_dataset
    if "seq_lengths" in ds.column_names:  # packed rows: each example was checked before packing
        return
    for i, t in enumerate(toks[:n]):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        if ids != t["ids"] or labels != [-100] * t["n_prompt"] + t["ids"][t["n_prompt"]:]:
            raise MedtuneError(f"train example {i + 1} (id {rows[i].get('id', '?')}): the trainer's tokens or loss mask differ "
                               "from the rendered prompt/completion; the answer would not be trained as rendered")


@contextlib.contextmanager
def lm_head_tile(width: int | None):
    """trl's fused LM-head loss projects the hidden states onto the vocabulary in tiles of 4096 tokens x `width`
    entries (trl's default 32768: a 256 MiB bf16 buffer), so it never builds the whole logits. A narrower tile
    lowers the peak memory where a large vocabulary dominates it (gemma-3-270m: 262k entries, 640 wide). trl keeps
    the width in a module constant: set for the duration of the block, restored after."""
    if width is None:
        yield
        return
    import trl.trainer.utils as trl_utils

    if not isinstance(getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int):
        raise MedtuneError(f"train.lm_head_tile={width}: this trl version has no fused LM-head tile width to set; "
                           "use -S train.lm_head_tile=null")
    default = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = width
    try:
        yield
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = default


def quantization_config(p: TrainParams):
    import torch
    from transformers import BitsAndBytesConfig

    if p.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def lora_config(p: TrainParams):
    from peft import LoraConfig

    return LoraConfig(
        r=p.lora_r,
        lora_alpha=p.lora_alpha,
        lora_dropout=p.lora_dropout,
        bias=p.lora_bias,
        target_modules=p.target_modules[0] if list(p.target_modules) == ["all-linear"] else list(p.target_modules),
        task_type="CAUSAL_LM",
    )


def sft_config(p: TrainParams, seed: int, ckpt_dir: Path, eot: str, cuda: bool):
    """The trl SFTConfig of the `train` stage (also used by benchmarks/bench_train.py)."""
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup if p.warmup < 1 else int(p.warmup),  # trl: a float below 1 is a ratio of the steps
        weight_decay=p.weight_decay,
        optim=p.optim,
        num_train_epochs=p.epochs,
        max_steps=p.max_steps,
        activation_checkpointing=p.gradient_checkpointing,  # transformers 5 renamed gradient_checkpointing
        auto_find_batch_size=p.auto_find_batch_size,
        packing=p.packing,
        padding_free=p.padding_free or p.packing,
        pad_to_multiple_of=p.pad_to_multiple_of,
        neftune_noise_alpha=p.neftune_noise_alpha,
        # trl applies Liger's layer kernels only (its own chunked LM-head loss already avoids the full logits)
        use_liger_kernel=p.liger_kernels,
        eval_strategy="steps" if p.eval_steps else "no",
        eval_steps=p.eval_steps or None,
        save_strategy="steps" if p.save_steps else "no",
        save_steps=p.save_steps or 500,
        save_total_limit=2,
        load_best_model_at_end=p.load_best_model,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=p.logging_steps,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        report_to="none",
        disable_tqdm=not on_terminal(),  # a redrawn bar in a log is thousands of lines; Progress logs lines instead
        # check_examples made sure no example is longer, so nothing is truncated; trl refuses a max_length it
        # would not enforce (padding-free without packing)
        max_length=p.max_length if p.packing or not p.padding_free else None,
        completion_only_loss=True,
        eos_token=eot,  # the completion already ends with it, so trl adds nothing
        # the datasets are tokenized and checked already (token_dataset); packing still needs trl's preparation
        dataset_kwargs={"skip_prepare_dataset": not p.packing},
        include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: skip DDP's per-step search for unused ones
    )


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_finite(model) -> None:
    """Refuse to save an adapter with weights that are not numbers."""
    bad = [name for name, x in model.named_parameters() if x.requires_grad and not x.detach().isfinite().all()]
    if bad:
        raise MedtuneError(f"train: {len(bad)} adapter tensors hold NaN or inf (e.g. {bad[0]}); the adapter was not "
                           "saved: lower train.learning_rate")


@dataclasses.dataclass
class Fitted:
    """A finished training run: what the train stage saves and reports."""
    trainer: object
    tok: object
    identity: dict  # the base model's identity (models.resolve_base)
    metrics: dict
    history: list[dict]
    adapter_state: dict | None  # the gathered adapter weights under FSDP; None otherwise
    main_process: bool  # under `accelerate launch`, only the main process writes outputs


def fit(p: TrainParams, m: ModelParams, seed: int, data_dir: Path, ckpt_dir: Path, callbacks: tuple = ()) -> Fitted:
    """Train a LoRA adapter on data_dir/{train,val}.jsonl: checks first, then the model, then trl's SFTTrainer.
    Resumes from a checkpoint in ckpt_dir left by an interrupted run with the same params and data."""
    preflight(p)
    import torch
    from accelerate import PartialState
    from trl import SFTTrainer

    set_seed(seed)
    base_path, identity = resolve_base(m)
    tok = load_tokenizer(base_path, m)
    rows = {split: read_jsonl(data_dir / f"{split}.jsonl") for split in ("train", "val")}
    stops = stop_token_ids(tok)
    toks = {split: check_examples(p, split_rows, tok, stops, data_dir / f"{split}.jsonl") for split, split_rows in rows.items()}
    eot = tok.convert_ids_to_tokens(toks["train"][0]["ids"][-1])  # what answers end with
    train_ds, val_ds = token_dataset(toks["train"]), token_dataset(toks["val"])
    cuda = device() == "cuda"
    # Under `accelerate launch` every process runs this function, each on its own device; only the main one
    # touches the outputs.
    state = PartialState(cpu=not cuda)  # cpu=True: gloo across CPU processes under `accelerate launch`
    fsdp = under_fsdp()  # each process loads to host memory and FSDP moves only its shard to its GPU
    if p.quantization == "none":
        model = load_model(base_path, m, on="cpu" if fsdp else state.device)
    else:  # QLoRA / 8-bit: the frozen base is quantized by bitsandbytes on load; trl prepares it for k-bit training
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization_config(p), dtype=torch.bfloat16,
                                                     device_map={"": state.local_process_index}, trust_remote_code=m.trust_remote_code,
                                                     use_safetensors=True)
    if p.padding_free or p.packing:  # per-sequence attention; SDPA would attend over the whole flattened batch
        use_varlen_attention(model)
    if p.torch_compile:
        compile_decoder_layers(model)
    if state.is_main_process:
        last_checkpoint(ckpt_dir, fingerprint(p, m, data_file=data_dir / "train.jsonl") + str(seed))
    state.wait_for_everyone()
    resume = complete_checkpoint(ckpt_dir) if p.save_steps > 0 else None
    before_s = before_resume(resume)
    trainer = SFTTrainer(model=model, args=sft_config(p, seed, ckpt_dir, eot, cuda), train_dataset=train_ds,
                         eval_dataset=val_ds, processing_class=tok, peft_config=lora_config(p),
                         callbacks=[*guards(before_s), *([] if on_terminal() else [Progress()]), *callbacks])
    check_trainer_examples(trainer, rows["train"], toks["train"])
    trainable = sum(x.numel() for x in trainer.model.parameters() if x.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with lm_head_tile(p.lm_head_tile):
        if resume is None:  # the validation loss before any training: the curve's start (a resumed run has it)
            trainer.add_callback(StartOfCurve(trainer.evaluate()))
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        wall = time.perf_counter() - t0
        eval_loss = trainer.evaluate()["eval_loss"]  # of the weights being saved (the best ones with load_best_model)
    check_finite(trainer.model)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [(h["eval_loss"], h["step"]) for h in history if "eval_loss" in h]
    tokens = int(trainer.state.num_input_tokens_seen)  # restored from the checkpoint: the whole run's
    resumed_at = int(resume.name.split("-")[1]) if resume else 0
    wall += before_s  # the whole run's training time
    metrics = {
        "train_loss": round(whole_run_loss(history, float(result.training_loss), resumed_at, trainer.state.global_step), 4),
        "final_loss": round(losses[-1], 4) if losses else None,
        "best_train_loss": round(min(losses), 4) if losses else None,
        "eval_loss": round(float(eval_loss), 4),
        "best_eval_loss": round(min(evals)[0], 4),
        "best_eval_step": min(evals)[1],
        "batch_size": trainer._train_batch_size,  # differs from train.batch_size if auto_find_batch_size lowered it
        "steps": trainer.state.global_step,
        "tokens_trained": tokens,  # real (not padding) tokens
        "train_tokens_per_s": round(tokens / wall, 1),  # over the training loop alone; the stage adds tokens_per_s
        "train_s": round(wall, 1),  # the training loop and its evaluations (before a resume too); the stage adds wall_s
        "train_s_before_resume": round(before_s, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "trainable_params": trainable,
        "attn_implementation": model.config._attn_implementation,
        "torch_compile": p.torch_compile,
        "resumed_from_step": resumed_at,  # 0: not resumed
        "processes": state.num_processes,
    }
    log.info("world size %d, process %d: %s steps done", state.num_processes, state.process_index, metrics["steps"])
    adapter_state = None
    if trainer.is_fsdp_enabled:  # the weights are sharded across processes: every process joins in gathering them
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        adapter_state = trainer.accelerator.get_state_dict(trainer.model)
    return Fitted(trainer, tok, identity, metrics, history, adapter_state, state.is_main_process)
