"""GGUF for llama.cpp and Ollama: a HF model folder as a GGUF file of one type (f32, f16, bf16, q8_0), written with
the gguf package's writer and tensor-name map as llama.cpp's convert_hf_to_gguf.py writes it: the tokenizer (tokens,
scores, types, special ids), the chat template the model was trained with, the stop tokens and the model card's
essentials go into its metadata. The parity check loads a written file back through transformers' own GGUF loader
(the path fetch uses for the default base model) and compares its tokens, logits and greedy answers with the HF
model's; it is what proves the conventions below, each the inverse of what that loader undoes: Gemma 3 norm weights
stored + 1, Llama's q/k rows permuted into llama.cpp's rope layout, no `output.weight` for tied embeddings, 1-D
tensors in f32 and, in a q8_0 file, a matrix whose rows are not a multiple of 32 in f16 (as llama.cpp does).
torch, transformers and gguf are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from medtune.console import MedtuneError

ARCHS = {"gemma3_text": "GEMMA3", "llama": "LLAMA"}  # HF model_type -> gguf.MODEL_ARCH member
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}  # export type -> (GGML tensor type, GGUF file type)
FLOAT_TYPES = ("f32", "f16", "bf16")  # greedy answers must be identical; q8_0's are reported


def arch_of(config):
    """The gguf.MODEL_ARCH of a HF config, or a one-line error naming the architecture it cannot write."""
    import gguf

    if config.model_type not in ARCHS:
        names = f" ({', '.join(config.architectures)})" if config.architectures else ""
        raise MedtuneError(f"GGUF export: architecture {config.model_type}{names} cannot be written; "
                           f"supported: {', '.join(ARCHS)}")
    rope = getattr(config, "rope_parameters", None) or {}
    for part in rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]:
        if part.get("rope_type", "default") != "default":
            raise MedtuneError(f"GGUF export: {config.model_type} with rope scaling {part['rope_type']!r} cannot be written")
    if config.model_type == "gemma3_text":  # what llama.cpp assumes for Gemma 3 and a GGUF does not carry
        assumed = {"query_pre_attn_scalar": (config.query_pre_attn_scalar, config.head_dim),
                   "sliding rope_theta": (rope.get("sliding_attention", {}).get("rope_theta"), 10000.0),
                   "layer_types": (config.layer_types, [("sliding_attention", "full_attention")[(i + 1) % 6 == 0]
                                                        for i in range(config.num_hidden_layers)])}
        for key, (value, expected) in assumed.items():
            if value != expected:
                raise MedtuneError(f"GGUF export: gemma3_text with {key} {value} cannot be written (llama.cpp assumes {expected})")
    return getattr(gguf.MODEL_ARCH, ARCHS[config.model_type])


# ---------------------------------------------------------------- tokenizer


@dataclasses.dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama", SentencePiece-style BPE with byte fallback (Gemma, Llama 2)
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    scores: list[float]  # llama.cpp's SentencePiece merges by score: -(rank of the merge that makes the token)
    add_space_prefix: bool


def vocab_of(tok, config) -> Vocab:
    """The tokenizer as GGUF describes it; rows of the embedding beyond the tokenizer are [PAD<i>] tokens."""
    import gguf

    n_vocab, gemma = config.vocab_size, config.model_type.startswith("gemma")

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    shape = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if model["type"] != "BPE" or not model.get("byte_fallback") or "\u2581" not in shape:
        raise MedtuneError(f"GGUF export: a {model['type']} tokenizer (byte_fallback={model.get('byte_fallback')}) "
                           "cannot be written; supported: SentencePiece-style BPE with byte fallback (Gemma, Llama 2)")
    by_id = {i: t for t, i in tok.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > n_vocab:
        raise MedtuneError(f"GGUF export: the tokenizer has {len(by_id)} tokens, the embedding {n_vocab} rows")
    pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    added = {a["id"]: a["special"] for a in spec["added_tokens"]}
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            kind, score, t = gguf.TokenType.UNUSED, -1000.0, f"[PAD{i}]"
        elif i in added:
            kind, score = (gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED), -1000.0
        elif gemma and len(t) > 1 and set(t) == {"\u2581"}:  # as Gemma's SentencePiece model and GGUFs hold them
            kind, score, t = gguf.TokenType.USER_DEFINED, -1000.0, " " * len(t)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            kind, score = gguf.TokenType.BYTE, 0.0
        else:
            kind, score = gguf.TokenType.NORMAL, -float(rank.get(t, len(pairs) + i))  # unmerged: characters, last
        tokens.append(t)
        types.append(int(kind))
        scores.append(score)
    prefix = '"prepend_scheme": "always"' in shape or '"prepend_scheme": "first"' in shape or '"Prepend"' in shape
    return Vocab("llama", tokens, types, scores, prefix)


def stop_kinds(tok, stops: list[int]) -> dict[str, int]:
    """The stop tokens as GGUF names them: eos, then eot (the chat template's end of turn) and eom."""
    from medtune.models import end_of_turn

    eot = tok.convert_tokens_to_ids(end_of_turn(tok))
    others = sorted(set(stops) - {tok.eos_token_id}, key=lambda i: (i != eot, i))
    if len(others) > 2:
        raise MedtuneError(f"GGUF export: {len(stops)} stop tokens {stops}; GGUF names three at most (eos, eot, eom)")
    return {"eos": tok.eos_token_id} | dict(zip(("eot", "eom"), others))


def read_stops(path: Path) -> list[int]:
    """The stop token ids a GGUF file names (eos, eot, eom), read with transformers' metadata reader."""
    from transformers.integrations.gguf import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    return sorted(meta[f"tokenizer.ggml.{n}_token_id"] for n in ("eos", "eot", "eom") if f"tokenizer.ggml.{n}_token_id" in meta)


# ---------------------------------------------------------------- writing


def _hparams(w, config, arch) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters or {}
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 10000.0))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.GEMMA3:
        w.add_sliding_window(config.sliding_window)
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(config.final_logit_softcapping)
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(config.vocab_size)


def _tokenizer(w, tok, v: Vocab, stops: list[int]) -> str:
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre("default")
    w.add_token_list(v.tokens)
    w.add_token_scores(v.scores)
    w.add_token_types(v.types)  # no merges: llama.cpp's SentencePiece tokenizer merges by score (and reads none)
    for kind, i in [("bos", tok.bos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)]:
        if i is not None:
            getattr(w, f"add_{kind}_token_id")(i)
    for kind, i in stop_kinds(tok, stops).items():
        getattr(w, f"add_{kind}_token_id")(i)
    ids = tok("a")["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    w.add_add_eos_token(ids[-1] == tok.eos_token_id)
    w.add_add_space_prefix(v.add_space_prefix)
    w.add_chat_template(tok.chat_template)
    return v.model


def _card(w, card: dict, qtype: str) -> None:
    import gguf

    w.add_type("model")
    w.add_name(card["name"])
    w.add_description(card["description"])
    w.add_license(card["license"])
    w.add_tags(card["tags"])
    w.add_languages(card["languages"])
    if card.get("base_model"):
        w.add_base_model_count(1)
        w.add_base_model_name(0, card["base_model"])
        w.add_base_model_repo_url(0, f"https://huggingface.co/{card['base_model']}")
    w.add_file_type(getattr(gguf.LlamaFileType, TYPES[qtype][1]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_plan(src: Path, config, arch, qtype: str) -> list[tuple[Path, str, str, tuple, object]]:
    """(file, HF name, GGUF name, shape, GGML type) of every tensor to write, in the files' order."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch])
    base_type = getattr(gguf.GGMLQuantizationType, TYPES[qtype][0])
    plan = []
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                hit = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
                if hit is None or hit[0] not in allowed:
                    raise MedtuneError(f"GGUF export: {config.model_type} tensor {name} has no GGUF name")
                shape = tuple(st.get_slice(name).get_shape())
                kind = base_type
                if len(shape) == 1:
                    kind = gguf.GGMLQuantizationType.F32
                elif kind == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
                    kind = gguf.GGMLQuantizationType.F16
                plan.append((f, name, hit[1], shape, kind))
    return plan


def tensor_values(name: str, data, config, arch):
    """A HF weight (float32 numpy) as llama.cpp stores it."""
    import gguf

    if arch == gguf.MODEL_ARCH.GEMMA3 and name.endswith("norm.weight"):
        return data + 1  # Gemma3RMSNorm scales by (1 + weight); llama.cpp's norm by the weight
    if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
        return data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return data


def write_gguf(src: Path, config, tok, path: Path, qtype: str, stops: list[int], card: dict, vocab: Vocab | None = None,
               transform=tensor_values) -> dict:
    """Write `src` (a HF folder of safetensors) to the GGUF file `path`, one tensor at a time. `vocab`: vocab_of(tok)
    when several types are written; `transform`: how a HF weight is stored (tensor_values; tests perturb it)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    arch = arch_of(config)
    plan = tensor_plan(src, config, arch, qtype)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _hparams(w, config, arch)
    tokenizer = _tokenizer(w, tok, vocab or vocab_of(tok, config), stops)
    _card(w, card, qtype)
    for _, _, new, shape, kind in plan:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        w.add_tensor_info(new, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, raw_dtype=kind)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for f in dict.fromkeys(p[0] for p in plan):
            with safe_open(f, "pt") as st:
                for _, name, _, _, kind in (p for p in plan if p[0] == f):
                    data = transform(name, st.get_tensor(name).float().numpy(), config, arch)
                    w.write_tensor_data(gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind))
    finally:
        w.close()
    return {"tensors": len(plan), "tokenizer": tokenizer, "arch": gguf.MODEL_ARCH_NAMES[arch]}


# ---------------------------------------------------------------- the parity check


def reference(model, tok, prompts: list[str], new_tokens: int) -> dict:
    """What a GGUF must reproduce: the HF model's logits on the prompts and its greedy answers."""
    import torch

    from medtune.generation import greedy
    from medtune.models import stop_token_ids

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        logits = model(**enc).logits.float()
    answers = greedy(model, tok, prompts, new_tokens, len(prompts), desc="export check (HF model)")
    return {"enc": enc, "logits": logits, "answers": answers, "ids": [tok(p)["input_ids"] for p in prompts],
            "chat_template": tok.chat_template, "stops": stop_token_ids(tok, model)}


def check_gguf(path: Path, qtype: str, ref: dict, prompts: list[str], new_tokens: int, atol: float, device: str) -> dict:
    """Load `path` through transformers' GGUF loader and compare it with `ref`: the same tokens for the prompts and
    the same chat template, logits within `atol`, the same stop tokens, and (float types) the same greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.generation import greedy

    try:
        gtok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        stops = read_stops(path)
    except Exception as e:  # a file transformers cannot read is a failed check, whatever the reason
        raise MedtuneError(f"export check: {path.name} does not load through transformers ({type(e).__name__}: {e})") from None
    model = model.to(device).eval()
    model.generation_config.eos_token_id = stops  # transformers' reader keeps only eos; llama.cpp stops at all three
    if gtok.pad_token is None:
        gtok.pad_token = gtok.eos_token
    same_tokens = [gtok(p)["input_ids"] for p in prompts] == ref["ids"] and gtok.chat_template == ref["chat_template"]
    enc = ref["enc"]
    with torch.no_grad():
        diff = (model(**enc).logits.float() - ref["logits"]).abs()[enc["attention_mask"].bool()]
    max_diff = float(diff.max()) if not diff.isnan().any() else float("inf")
    answers = greedy(model, gtok, prompts, new_tokens, len(prompts), desc=f"export check ({path.name})")
    agree = sum(a["ids"] == b["ids"] for a, b in zip(answers, ref["answers"])) / len(prompts)
    passed = same_tokens and stops == ref["stops"] and max_diff <= atol and (agree == 1 or qtype not in FLOAT_TYPES)
    return {"max_abs_logit_diff": round(max_diff, 6), "atol": atol, "tokens_identical": same_tokens,
            "greedy_answers_identical": agree == 1, "greedy_agreement": round(agree, 4), "stop_token_ids": stops,
            "passed": passed}
