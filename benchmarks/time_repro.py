"""Time each stage of `dvc repro` (forced, so every stage runs) and write the result to benchmarks/results/.

Run as:  python benchmarks/time_repro.py --out benchmarks/results/cpu_default_run
Writes <out>.json and <out>.md naming the machine, versions and the command.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import the project's stages from anywhere


@click.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force/--no-force", default=True, help="rerun every stage (default), or only what changed")
def main(out: Path, force: bool) -> None:
    cmd = [sys.executable, "-m", "dvc", "repro"] + (["--force"] if force else [])
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = last = time.perf_counter()
    stages: list[dict] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        sys.stderr.write(line)
        if m := re.search(r"Running stage '([^']+)'", line):
            now = time.perf_counter()
            if stages:
                stages[-1]["seconds"] = round(now - last, 1)
            stages.append({"stage": m.group(1)})
            last = now
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed ({proc.returncode})")
    total = time.perf_counter() - t0
    if stages:
        stages[-1]["seconds"] = round(time.perf_counter() - last, 1)
    from medtune.models import device_name, versions

    metrics = {name: json.loads(Path(f"metrics/{name}.json").read_text()) for name in ("train", "eval_base", "eval_tuned", "merge")}
    result = {"command": " ".join(["dvc", "repro"] + (["--force"] if force else [])), "machine": device_name(),
              "platform": platform.platform(), "versions": versions(), "total_seconds": round(total, 1),
              "stages": stages, "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {s['stage']} | {s.get('seconds', '?')} |" for s in stages)
    b, t = metrics["eval_base"], metrics["eval_tuned"]
    out.with_suffix(".md").write_text(
        f"# `{result['command']}` on {result['machine']}\n\n{result['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f"\n\n| stage | seconds |\n| --- | ---: |\n{rows}\n| **total** | **{result['total_seconds']}** |\n\n"
        f"ROUGE-L on n={t['n']} test questions: base {b['rougeL']} {b['rougeL_ci']}, tuned {t['rougeL']} {t['rougeL_ci']}, "
        f"delta {t['delta_rougeL']} {t['delta_rougeL_ci']} (95% paired bootstrap). Runaway answers: base "
        f"{b['runaway_rate']:.0%}, tuned {t['runaway_rate']:.0%}. Training: {metrics['train']['steps']} steps, "
        f"{metrics['train']['tokens_per_s']} tokens/s, peak RSS {metrics['train']['peak_memory_mb']:.0f} MB. "
        f"Merge check: max |logit diff| {metrics['merge']['max_abs_logit_diff']}, passed {metrics['merge']['passed']}.\n"
    )
    click.echo(f"total {total:.0f} s -> {out.with_suffix('.md')}", err=True)


if __name__ == "__main__":
    main()
