"""The end of a run in one short table: base vs tuned ROUGE-L with the paired delta and its CI, entity F1,
runaway answers,
the merge check, each stage's wall time, and where the model is. Read from the files the stages wrote, so
`medtune summary` shows the same table for any run the workspace holds."""

from __future__ import annotations

import json
from pathlib import Path

STAGE_METRICS = {"fetch": "fetch", "clean": "clean", "split": "split", "format": "format", "report": "data_quality",
                 "train": "train", "evaluate_base": "eval_base", "evaluate_tuned": "eval_tuned", "merge": "merge",
                 "export": "export"}


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def table(root: Path = Path(".")) -> str:
    """The summary of the run in `root`, as plain text lines (what is missing shows as "-")."""
    base, tuned = read(root / "eval/base/metrics.json"), read(root / "eval/tuned/metrics.json")
    merge, export = read(root / "metrics/merge.json"), read(root / "metrics/export.json")

    def score(m: dict, key: str, sign: str = "") -> str:
        if key not in m:
            return "-"
        ci = m.get(f"{key}_ci")
        return f"{m[key]:{sign}.4f}" + (f" [{ci[0]:{sign}.4f}, {ci[1]:{sign}.4f}] (95% CI)" if ci else "")

    rows = [("ROUGE-L, base model", score(base, "rougeL")), ("ROUGE-L, fine-tuned", score(tuned, "rougeL")),
            ("paired delta (tuned - base)", score(tuned, "delta_rougeL", "+")),
            ("test questions", str(tuned.get("n", "-"))),
            ("medical entity F1, base / tuned", f"{base['entity_f1']:.4f} / {tuned['entity_f1']:.4f} (delta "
                                                f"{score(tuned, 'delta_entity_f1', '+')}, n={tuned['entity_n']})"
             if base.get("entity_f1") is not None and tuned.get("entity_f1") is not None else "-"),
            ("runaway answers, base / tuned", f"{base.get('runaway_rate', float('nan')):.0%} / "
                                              f"{tuned.get('runaway_rate', float('nan')):.0%}" if base and tuned else "-"),
            ("merge check", "-" if not merge else ("passed" if merge.get("passed") else "FAILED")
             + (f" (max |logit diff| {merge['max_abs_logit_diff']:.2g})" if "max_abs_logit_diff" in merge else ""))]
    if export and export.get("enabled"):
        rows.append(("GGUF parity check", "passed" if export.get("passed") else "FAILED"))
    walls = [(stage, read(root / "metrics" / f"{name}.json").get("wall_s")) for stage, name in STAGE_METRICS.items()]
    walls = [(s, w) for s, w in walls if w is not None]
    rows.append(("wall time per stage", ", ".join(f"{s} {w:.0f} s" for s, w in walls) or "-"))
    rows.append(("total of the stages", f"{sum(w for _, w in walls):.0f} s" if walls else "-"))
    where = [p for p in ("models/merged", "models/adapter", "models/gguf") if (root / p).exists()]
    rows.append(("the model", ", ".join(where) + " (try: medtune chat --model models/merged \"your question\")"
                 if where else "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
