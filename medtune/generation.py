"""Batched greedy generation: how evaluate, merge's check and the check tool get answers from a model. Prompts
are batched by length and padded on the left, and an answer ends at the first of models.stop_token_ids."""

from __future__ import annotations

from medtune.console import progress
from medtune.models import stop_token_ids


def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generate") -> list[dict]:
    """Per prompt: `answer` (text, special tokens dropped), `ids` (the answer's tokens, without the stop token),
    `stopped` (whether it ended with a stop token before max_new_tokens) and `new_tokens`."""
    import torch

    stops = stop_token_ids(tok, model)
    if model.device.type == "cuda":
        # cuDNN's attention builds a plan for every new key length, i.e. at every decoding step: 2.3x slower on an
        # H100 (benchmarks/results/h100); the other fused SDPA kernels give the same answers
        torch.backends.cuda.enable_cudnn_sdp(False)
    tok.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict] = [{}] * len(prompts)
    for start in progress(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)
        for row, i in zip(gen[:, enc["input_ids"].shape[1]:].tolist(), idx):
            stopped = next((k for k, t in enumerate(row) if t in stops), None)
            ids = row if stopped is None else row[:stopped]
            out[i] = {"answer": tok.decode(ids, skip_special_tokens=True).strip(), "ids": ids,
                      "stopped": stopped is not None, "new_tokens": len(ids)}
    return out
