"""The data-quality report: rows in/out per data stage with drop reasons, duplicates, the leakage check, token
lengths against format.max_length, likely PHI left in the training data, counts per source/qtype/answer option,
and rendered training examples with their loss mask (which tokens are trained)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from medtune.cleaning import find_phi
from medtune.models import end_of_turn
from medtune.params import FormatParams, ReportParams
from medtune.prompts import trained_tokens

SPLITS = ("train", "val", "test")
COUNT_FIELDS = ("source", "collection", "qtype", "correct")
TOP = 15  # values listed per count field


def loss_masks(tok, rows: list[dict], end: str) -> list[dict]:
    """Tokens as training sees them (prompts.trained_tokens), and whether the end token is among the trained ones."""
    end_id = tok.convert_tokens_to_ids(end)
    return [t | {"end_trained": len(t["ids"]) > t["n_prompt"] and t["ids"][-1] == end_id} for t in trained_tokens(tok, rows)]


def histogram(lengths: np.ndarray, max_length: int) -> dict[str, int]:
    """Train examples per quarter of max_length, and over it."""
    edges = [0] + [max_length * k // 4 for k in range(1, 5)]
    out = {f"{a + 1}-{b}": int(((lengths > a) & (lengths <= b)).sum()) for a, b in zip(edges, edges[1:])}
    return out | {f">{max_length}": int((lengths > max_length).sum())}


def show_mask(tok, row: dict, mask: dict) -> str:
    prompt = tok.decode(mask["ids"][: mask["n_prompt"]])
    trained = "".join(f"⟦{tok.decode([i])}⟧" for i in mask["ids"][mask["n_prompt"]:])
    return prompt + trained


def quality_report(p: ReportParams, f: FormatParams, tok, manifest: dict, clean: dict, split: dict, fmt: dict,
                   rows: dict[str, list[dict]]) -> tuple[dict, dict, str]:
    """(key figures, full breakdown, markdown) from the data stages' outputs and counts."""
    end = end_of_turn(tok) if f.template == "chat" else tok.eos_token
    train = rows["train"]
    masks = loss_masks(tok, train, end)
    lengths = np.array([r["n_tokens"] for r in train])
    tr = fmt["train"]
    seen = tr["rows"] + tr["dropped_too_long"]
    phi = Counter(k for r in train for k in find_phi(r["prompt"] + r["completion"]))
    phi_rows = sum(1 for r in train if find_phi(r["prompt"] + r["completion"]))
    report = {
        "rows_fetched": manifest["rows"],
        "rows_clean": clean["rows_out"],
        "dropped": sum(clean["dropped"].values()) + sum(split["dropped_leaks"].values()) + sum(fmt[s]["dropped_too_long"] for s in SPLITS),
        "duplicates": clean["duplicates"],
        "leakage_ok": split["leakage_ok"],
        **{f"rows_{s}": len(rows[s]) for s in SPLITS},
        "truncation_rate": round((tr["answers_truncated"] + tr["dropped_too_long"]) / seen, 4),
        "phi_flagged": phi_rows,
        "end_token_trained": round(sum(x["end_trained"] for x in masks) / len(masks), 4),
        "stages": {
            "fetch": {"rows_out": manifest["rows"], "sources": manifest.get("sources", {})},
            "clean": {k: clean[k] for k in ("rows_in", "rows_out", "dropped", "changed", "not_selected", "phi", "phi_rows", "phi_action")},
            "split": {"rows_in": clean["rows_out"], "rows_out": sum(split[s] for s in SPLITS), "dropped_leaks": split["dropped_leaks"],
                      "groups": split["groups"]},
            "format": {s: fmt[s] for s in SPLITS},  # the counts per split (not the stage's wall time)
        },
        "tokens_train": {"max_length": f.max_length, "mean": round(float(lengths.mean()), 1),
                         **{f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}, "max": int(lengths.max()),
                         "over_max_length": tr["over_max_length"], "prompt_boundary_ok": all(x["prefix_ok"] for x in masks),
                         "histogram": histogram(lengths, f.max_length)},
        "phi_train": dict(sorted(phi.items())),
        "counts": {field: {s: dict(Counter(str(r[field]) for r in rows[s] if r.get(field) is not None).most_common(TOP)) for s in SPLITS}
                   for field in COUNT_FIELDS if any(field in r for r in train)},
    }
    examples = []
    for r, mask in list(zip(train, masks))[: p.n_examples]:
        examples.append(f"### {r['id']}\n\n{mask['n_prompt']} prompt tokens (masked), {len(mask['ids']) - mask['n_prompt']} "
                        f"trained tokens in ⟦ ⟧; end token `{end}` trained: {'yes' if mask['end_trained'] else 'NO'}\n\n"
                        f"```text\n{show_mask(tok, r, mask)}\n```\n")
    c = report["stages"]["clean"]
    md = "\n".join([
        "# Data-quality report", "",
        f"Source: `{manifest['source']}` ({', '.join(f'{k}: {v:,}' for k, v in report['stages']['fetch']['sources'].items())}).", "",
        "| stage | rows in | rows out | dropped |", "| --- | ---: | ---: | --- |",
        f"| fetch | | {manifest['rows']:,} | |",
        f"| clean | {c['rows_in']:,} | {c['rows_out']:,} | {c['dropped'] or 'none'}; not selected {c['not_selected']:,} |",
        f"| split | {clean['rows_out']:,} | {report['stages']['split']['rows_out']:,} | leaks dropped {split['dropped_leaks'] or 'none'} |",
        *(f"| format {s} | {len(rows[s]) + fmt[s]['dropped_too_long']:,} | {len(rows[s]):,} | too long {fmt[s]['dropped_too_long']:,} |" for s in SPLITS),
        "", f"- Duplicates removed: {report['duplicates']:,} (exact and near-duplicate). Changed in place: {c['changed'] or 'none'}.",
        f"- Leakage check (no test question or near-duplicate answer in train): {'passed' if report['leakage_ok'] else 'FAILED'}.",
        f"- Likely PHI in the input: {c['phi_rows']:,} rows {c['phi']} (clean.phi = {c['phi_action']}); "
        f"left in the training examples: {phi_rows:,} {report['phi_train']}.",
        f"- Train tokens: mean {report['tokens_train']['mean']}, p50 {report['tokens_train']['p50']}, p90 {report['tokens_train']['p90']}, "
        f"max {report['tokens_train']['max']} against max_length {f.max_length}; truncation rate {report['truncation_rate']:.1%} "
        f"(answers cut or examples dropped); end token trained in {report['end_token_trained']:.0%} of train examples.",
        f"- Train tokens per example: {report['tokens_train']['histogram']}.",
        *(f"- {field}: " + "; ".join(f"{s} {dict(v)}" for s, v in by.items()) for field, by in report["counts"].items()),
        "", "## Examples with the loss mask", "", *examples,
    ])
    key = {k: v for k, v in report.items() if not isinstance(v, dict)}
    return key, report, md


