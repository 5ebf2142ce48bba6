"""Padding-free rows with the varlen attention (train.padding_free / packing): every token sees only its own
sequence, so the logits equal those of the same sequences in a padded batch under SDPA. The CPU case checks the
per-sequence reference; the GPU case (skipped without CUDA) checks torch's FlashAttention varlen kernel."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from medtune.attention import VARLEN, use_varlen_attention
from medtune.console import MedtuneError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def sequences(vocab: int, lengths=(7, 3, 12, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g) for n in lengths]


def padded_logits(model, seqs, dev, grad: bool = False) -> list[torch.Tensor]:
    """Right-padded batch under the model's default attention (SDPA), one logits row per real token."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]


def free_logits(model, seqs, dev, with_cu: bool, grad: bool = False) -> list[torch.Tensor]:
    """One padding-free row as trl's collator builds it: position ids restart per sequence (+ cu_seq_lens)."""
    ids = torch.cat(seqs)[None].to(dev)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(dev)
    kw = {}
    if with_cu:
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32).to(dev)
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(map(len, seqs)), "max_length_k": max(map(len, seqs))}
    with torch.set_grad_enabled(grad):
        logits = model(input_ids=ids, position_ids=pos, **kw).logits.float().cpu()[0]
    return list(logits.split([len(s) for s in seqs]))


def tiny_gemma(dev, dtype):
    """Gemma 3's attention shape in small: one key/value head, head_dim 256-like wide heads, a sliding window."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=64, sliding_window=4, max_position_embeddings=64,
                           layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=64)
    return Gemma3ForCausalLM(cfg).to(dev, dtype).eval()


@pytest.mark.parametrize("with_cu", [True, False], ids=["collator-boundaries", "position-ids-only"])
def test_padding_free_row_gives_the_padded_batch_logits(tiny_model, with_cu):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seqs = sequences(model.config.vocab_size)
    want = padded_logits(model, seqs, "cpu")
    use_varlen_attention(model)
    assert model.config._attn_implementation == VARLEN
    for got, ref in zip(free_logits(model, seqs, "cpu", with_cu), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_and_one_kv_head_match_sdpa_on_cpu():
    model = tiny_gemma("cpu", torch.float32)
    seqs = sequences(64, lengths=(9, 2, 6))
    want = padded_logits(model, seqs, "cpu")
    use_varlen_attention(model)
    for got, ref in zip(free_logits(model, seqs, "cpu", True), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_padded_batch_is_refused_rather_than_attending_to_padding(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    use_varlen_attention(model)
    with pytest.raises(MedtuneError, match="padding-free"):
        padded_logits(model, sequences(model.config.vocab_size), "cpu")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-activations"])
def test_flash_varlen_kernel_matches_sdpa_on_cuda(dtype):
    model = tiny_gemma("cuda", dtype)
    seqs = sequences(64, lengths=(9, 2, 33, 6))
    want = padded_logits(model, seqs, "cuda")
    use_varlen_attention(model)
    got = free_logits(model, seqs, "cuda", True)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=0.05, atol=0.05)  # bf16 kernels on both sides


@cuda
@pytest.mark.gpu
def test_flash_varlen_kernel_trains_like_sdpa_on_cuda(tiny_model):
    """Gradients through the kernel's backward equal SDPA's on the padded batch."""
    grads = []
    for free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda()
        seqs = sequences(model.config.vocab_size, lengths=(20, 5, 31))
        if free:
            use_varlen_attention(model)
            logits = free_logits(model, seqs, "cuda", with_cu=False, grad=True)
        else:
            logits = padded_logits(model, seqs, "cuda", grad=True)
        sum(x.logsumexp(-1).sum() for x in logits).backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.float())
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.05)
