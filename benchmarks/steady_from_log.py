"""Steady tokens/s of bench_train.py runs recorded before it timed each step, from the run's log: trl logs the
cumulative train_runtime and tokens seen after every step (logging_steps=1), so each step's seconds and tokens
can be read back and the StepTimer rule applied (leave out steps over 3x the median: one-time kernel compiles).

Run as:  python benchmarks/steady_from_log.py --log bench_gemma.log --json bench_train_gemma.json --warmup 3
Prints one JSON line per run: config, the recorded tokens/s, the steady tokens/s and the left-out steps.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: import bench_train's rule
from benchmarks.bench_train import step_summary


def steps_from_chunk(chunk: str, warmup: int) -> list[tuple[float, int]]:
    times = [float(x) for x in re.findall(r"'train_runtime': '([0-9.e+-]+)'", chunk)]
    tokens = [int(x) for x in re.findall(r"'num_input_tokens_seen': (\d+)", chunk)]
    n = min(len(times), len(tokens)) - 1  # the last line is trl's end-of-training summary, not a step
    ends = list(zip(times[:n], tokens[:n]))[warmup - 1:]  # from the end of the last warm-up step
    return [(t1 - t0, k1 - k0) for (t0, k0), (t1, k1) in zip(ends, ends[1:])]


@click.command()
@click.option("--log", "log_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "json_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--warmup", required=True, type=int, help="the --warmup the benchmark ran with")
def main(log_file: Path, json_file: Path, warmup: int) -> None:
    runs = json.loads(json_file.read_text())["runs"]
    chunks = re.split(r'\n\{"(?:suite|model|config)"', log_file.read_text())  # each run's log ends with its result line
    for run, chunk in zip(runs, chunks):
        timing = step_summary(steps_from_chunk(chunk, warmup))
        click.echo(json.dumps({
            "suite": run.get("suite", run.get("model")), "config": run["config"], "timed_steps": timing["timed_steps"],
            "real_tokens_per_s": run.get("real_tokens_per_s"),
            "real_tokens_per_s_steady": round(timing["steady"]),
            "slow_steps_s": timing["slow_steps_s"],
            "peak_memory_gib": run.get("peak_memory_gib"), "loss_first_last": run.get("loss_first_last"),
        }))


if __name__ == "__main__":
    main()
