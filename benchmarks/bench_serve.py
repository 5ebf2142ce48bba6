"""Load benchmark of `medtune serve`, started as a user starts it (python -m medtune.commands.serve), with /health
polled all along:
  abandoned: two max_tokens 1024 requests whose clients give up after 2 s, then a 4-token request (and the same
             4-token request on the idle server first);
  burst:     100 concurrent short requests (max_tokens 8): status counts (200 / 429 / 503), latency p50 / p95.

    python benchmarks/bench_serve.py --adapter DIR --label after --out benchmarks/results/cpu_serve_load.json
    python benchmarks/bench_serve.py --untrained-adapter /tmp/gemma-adapter ...   # build one on params' model.base
    python benchmarks/bench_serve.py --code /tmp/serve-before --label before ...    # the code of a git worktree
    python benchmarks/bench_serve.py ... --label after-queue100 --serve-arg=--max-queue --serve-arg=100

--untrained-adapter writes a LoRA adapter with B = 0 on params.yaml's model.base (the default model): its
answers are the base model's and, merged in memory, it costs what a trained adapter costs. Each run's figures
go under its label in --out, beside the other runs'.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
QUESTIONS = ["What are the symptoms of glaucoma ?", "How is high blood pressure treated ?", "Is cystic fibrosis inherited ?",
             "What causes gout ?", "What are the treatments for asthma ?", "How to prevent osteoporosis ?",
             "What is the outlook for Parkinson's disease ?", "Who is at risk for diabetes ?"]


def untrained_adapter(out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from medtune import params
    from medtune.io import write_json
    from medtune.models import load_model, load_tokenizer, resolve_base

    if (out / "adapter_model.safetensors").exists():
        return out
    (m,) = params.load("model")
    base, identity = resolve_base(m)
    peft = get_peft_model(load_model(base, m), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(out)
    load_tokenizer(base, m).save_pretrained(out)
    write_json(out / "run_config.json", {"params": {"model": m.model_dump()}, "base_model": identity})
    return out


def start(code: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "medtune.commands.serve", *args, "--port", str(port)], cwd=code,
                                env=env, stdout=f, stderr=f)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start in 10 minutes")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(q * (len(xs) - 1)))], 2)


async def ask(client, url: str, question: str, max_tokens: int, timeout: float) -> dict:
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/chat/completions", timeout=timeout,
                              json={"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens})
    except httpx.TimeoutException:
        return {"status": "client timeout", "s": round(time.perf_counter() - t0, 2)}
    out = {"status": r.status_code, "s": round(time.perf_counter() - t0, 2), "retry_after": r.headers.get("retry-after")}
    if r.status_code == 200:
        out["tokens"] = r.json()["usage"]["completion_tokens"]
    return out


async def poll_health(url: str, stop: asyncio.Event, seen: list[float]) -> None:
    """One /health at a time, every 0.5 s, until `stop`: a hung /health shows as one long latency."""
    import httpx

    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await client.get(f"{url}/health", timeout=1800)
            except httpx.TransportError:
                pass
            seen.append(time.perf_counter() - t0)
            await asyncio.sleep(0.5)


def health_summary(seen: list[float]) -> dict:
    return {"polls": len(seen), "p50_s": pct(seen, 0.5), "max_s": round(max(seen), 2) if seen else None,
            "over_1s": sum(s > 1 for s in seen)}


async def scenarios(url: str, n: int, max_tokens: int, long_tokens: int, give_up_s: float) -> dict:
    import httpx

    stop, seen = asyncio.Event(), []
    poller = asyncio.create_task(poll_health(url, stop, seen))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        await ask(client, url, QUESTIONS[0], 4, 1800)  # warm-up
        idle = await ask(client, url, QUESTIONS[0], 4, 1800)
        gave_up = await asyncio.gather(*(ask(client, url, q, long_tokens, give_up_s) for q in QUESTIONS[:2]))
        short = await ask(client, url, QUESTIONS[0], 4, 3600)
        abandoned = {"idle_4_token_s": idle["s"], "abandoned": gave_up, "next_4_token_s": short["s"],
                     "next_status": short["status"], "health": health_summary(seen)}
        while True:  # the burst starts on an idle server (the code before has no "generating" field)
            h = (await client.get(f"{url}/health", timeout=1800)).json()
            if not h.get("generating") and not h.get("waiting"):
                break
            await asyncio.sleep(1)
        seen.clear()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(ask(client, url, QUESTIONS[i % len(QUESTIONS)], max_tokens, 3600) for i in range(n)))
        wall = time.perf_counter() - t0
    stop.set()
    await poller
    ok = [r["s"] for r in results if r["status"] == 200]
    refused = [r["s"] for r in results if r["status"] in (429, 503)]
    counts: dict = {}
    for r in results:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    burst = {"requests": n, "max_tokens": max_tokens, "status_counts": counts, "wall_s": round(wall, 1),
             "answered_per_s": round(len(ok) / wall, 3),
             "latency_200_s": {"p50": pct(ok, 0.5), "p95": pct(ok, 0.95), "max": pct(ok, 1.0)},
             "latency_refused_s": {"p50": pct(refused, 0.5), "max": pct(refused, 1.0)},
             "retry_after_s": sorted({r["retry_after"] for r in results if r.get("retry_after")}),
             "health": health_summary(seen)}
    return {"abandoned": abandoned, "burst": burst}


@click.command()
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="an adapter folder to serve")
@click.option("--untrained-adapter", type=click.Path(file_okay=False, path_type=Path),
              help="build (once) an untrained adapter on params.yaml's model.base in this folder, and serve it")
@click.option("--code", type=click.Path(exists=True, file_okay=False, path_type=Path), default=REPO, show_default=True,
              help="the repository whose medtune is served (a worktree of the code before, say); its params.yaml is read")
@click.option("--label", required=True, help="the key of this run in --out, e.g. before / after")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--requests", "n", default=100, show_default=True)
@click.option("--max-tokens", default=8, show_default=True)
@click.option("--long-tokens", default=1024, show_default=True, help="max_tokens of the abandoned requests")
@click.option("--give-up-s", default=2.0, show_default=True, help="when the abandoned requests' clients give up")
@click.option("--serve-arg", "serve_args", multiple=True, help="an extra option for the server (repeat)")
def main(adapter, untrained_adapter, code, label, out, n, max_tokens, long_tokens, give_up_s, serve_args):
    import torch
    import transformers

    if (adapter is None) == (untrained_adapter is None):
        raise click.UsageError("give one of --adapter or --untrained-adapter")
    folder = adapter or untrained_adapter_in(code, untrained_adapter)
    log = Path(tempfile.gettempdir()) / f"bench_serve.{label}.log"  # the server's log
    args = ["--adapter", str(folder), *serve_args]
    proc, url = start(code, args, log)
    load0 = os.getloadavg()
    try:
        figures = asyncio.run(scenarios(url, n, max_tokens, long_tokens, give_up_s))
    finally:
        proc.terminate()
        proc.wait(30)
    rc = json.loads((folder / "run_config.json").read_text())
    git = subprocess.run(["git", "-C", str(code), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    run = {"code": str(code), "git": git.stdout.strip(),
           "server_args": args, "model": rc.get("base_model", {}).get("base"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {'GPU' if torch.cuda.is_available() else 'no GPU'}",
           "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
           "load_average_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)]} | figures
    results = json.loads(out.read_text()) if out.exists() else {}
    results[label] = run
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(run, indent=2))


def untrained_adapter_in(code: Path, folder: Path) -> Path:
    old = os.getcwd()
    os.chdir(code)  # params.yaml of the served code names the base model
    try:
        return untrained_adapter(folder)
    finally:
        os.chdir(old)


if __name__ == "__main__":
    main()
