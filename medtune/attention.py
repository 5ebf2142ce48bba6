"""Attention for padding-free rows, and compiled decoder layers: the training speed levers that reach inside the
model (train.padding_free / train.packing, train.torch_compile)."""

from __future__ import annotations

from medtune.console import MedtuneError

VARLEN = "medtune_varlen"  # the attention implementation name padding-free training registers with transformers


def use_varlen_attention(model) -> None:
    """Attend within each sequence of a padding-free row (train.padding_free / packing) with a variable-length
    kernel, instead of SDPA over the whole flattened batch under a block-diagonal mask: that costs the square of
    the row's length (16k tokens for 8 packed rows of 2048) where the sequences need only the squares of their own.
    On CUDA the kernel is torch's FlashAttention varlen (torch.nn.attention.varlen); on CPU the same per-sequence
    causal attention runs through SDPA one sequence at a time."""
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    # FlashAttention's mask function: no mask for padding-free rows, the 2D padding mask for a padded batch
    # (which varlen_attention refuses rather than attend to padding)
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    model.set_attn_implementation(VARLEN)
    if torch.cuda.is_available():
        _varlen_params()


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-function interface: query [B, Hq, S, D], key/value [B, Hkv, S, D] ->
    ([B, S, Hq, D], None). The sequences' boundaries come from trl's padding-free collator (cu_seq_lens_q,
    max_length_q), else from position ids that restart at 0, else each row is one sequence."""
    import torch

    if attention_mask is not None:
        raise MedtuneError("varlen attention needs padding-free batches (train.padding_free or train.packing); got a padded batch")
    if softcap is not None or (dropout and module.training):
        raise MedtuneError(f"varlen attention: attention softcapping ({softcap}) and attention dropout ({dropout}) are not supported")
    b, hq, s, d = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            from transformers.modeling_flash_attention_utils import (
                prepare_fa_kwargs_from_position_ids,
            )

            (cu, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(position_ids)
        else:
            cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=query.device)
            max_len = s
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    scale = scaling if scaling is not None else d**-0.5
    out = _varlen_cuda(q, k, v, cu, int(max_len), scale, sliding_window) if q.is_cuda else \
        _varlen_reference(q, k, v, cu, scale, sliding_window)
    return out.view(b, s, hq, d), None


def compile_decoder_layers(model) -> int:
    """Regional compilation: torch.compile each decoder layer in place. The layers share one class, so they share
    the compiled code (one compile per layer kind, e.g. Gemma 3's sliding and global layers, not one per layer);
    dynamic shapes, because padding-free rows change length every step. A small model's step is bound by
    launching its many small kernels (norms, RoPE, LoRA's scale-and-add), which the compiler fuses. In place, so
    the state dict keeps its names (the adapter saves as usual) and peft's LoRA layers, added later, are traced
    on the first call. Returns how many layers were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise MedtuneError(f"train.torch_compile: found no decoder layers in {type(model).__name__} to compile; "
                           "use -S train.torch_compile=false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


_VARLEN_KW: tuple[str, ...] | None = None  # the varlen kernel's keyword arguments, once read


def _varlen_params() -> tuple[str, ...]:
    """The keyword arguments of this torch's varlen kernel (they changed between torch 2.10 and 2.11). Read once,
    by use_varlen_attention, outside any compiled region: under train.torch_compile the attention function is
    traced, and a global tuple is a constant to the compiler where inspect.signature would break the graph."""
    global _VARLEN_KW
    if _VARLEN_KW is None:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_KW = tuple(inspect.signature(varlen_attn).parameters)
    return _VARLEN_KW


def _varlen_cuda(q, k, v, cu, max_len: int, scale: float, window: int | None):
    """torch's FlashAttention varlen kernel."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    dtype = q.dtype
    if dtype == torch.float32:  # float32 activations (a float32 model, norms kept in float32): the kernel takes bf16/fp16
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    kw = {}
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "scale" in params:
        kw["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)  # (left, 0): causal, within the sliding window
    else:
        if window and max_len > window:
            raise MedtuneError(f"varlen attention: this torch has no sliding window; sequences of {max_len} tokens exceed "
                               f"the model's window of {window}: lower train.max_length or upgrade torch")
        kw["is_causal"] = True
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out.to(dtype)


def _varlen_reference(q, k, v, cu, scale: float, window: int | None):
    """The same attention one sequence at a time through SDPA (CPU, and the tests' reference)."""
    import torch
    import torch.nn.functional as F

    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = end - start
        if n == 0:
            continue
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().triu(-(window - 1)) if window and n > window else None
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=ks.shape[0] != qs.shape[0])
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, dim=0)
