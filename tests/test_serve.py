"""`medtune serve` under load: a full queue refuses at once (429 + Retry-After), a client that goes away stops
its generation, /health answers while a generation runs, the time limit ends requests that wait or generate too
long, and queued requests are generated in batches that give the answers each would get alone.

The app runs in a real uvicorn server in this process (real sockets, real disconnects) on the tiny adapter's
model, with a forward hook that holds or slows generation: the tests check who waits and what stops, not how
long anything takes."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest

from medtune.assistant import Answer, Limits, generate, load_tuned
from medtune.commands.serve import make_app
from tests.helpers import QUESTION, expected_answer, free_port

CP = Limits(max_new_tokens=12, max_new_tokens_cap=200, max_prompt_tokens=64, temperature=0.0, top_p=1.0)
OTHERS = ["is glaucoma inherited ?", "what causes gout ?", "how to prevent glaucoma ?", "what is glaucoma ?"]


@pytest.fixture(scope="module")
def tuned(workdir, tiny_adapter):
    old = os.getcwd()
    os.chdir(workdir)  # load_tuned reads the format params of the folder it runs in
    try:
        yield load_tuned(tiny_adapter, adapter=True)[0]
    finally:
        os.chdir(old)


class Gate:
    """A forward hook on the model: counts forward passes, holds each one while closed, and sleeps `delay` in each
    (a slow model); and a wrapper of model.generate recording each call's batch size and new tokens."""

    def __init__(self, model, monkeypatch, delay: float = 0.0):
        self.delay, self.open, self.entered, self.returned = delay, threading.Event(), threading.Event(), threading.Event()
        self.open.set()
        self.calls: list[tuple[int, int]] = []  # (batch size, tokens generated) per generate call
        self.handle = model.register_forward_pre_hook(self.hook)
        real = model.generate

        def spy(*args, **kw):
            out = real(*args, **kw)
            self.calls.append((out.shape[0], out.shape[1] - kw["input_ids"].shape[1]))
            self.returned.set()
            return out

        monkeypatch.setattr(model, "generate", spy)

    @contextlib.contextmanager
    def held(self):
        """Generation waits at its next forward pass until the block ends, however it ends."""
        self.open.clear()
        try:
            yield
        finally:
            self.open.set()

    def hook(self, module, args):
        self.entered.set()
        self.open.wait(60)
        time.sleep(self.delay)


@pytest.fixture
def gate(tuned, monkeypatch):
    g = Gate(tuned.model, monkeypatch)
    yield g
    g.open.set()
    g.handle.remove()


@contextlib.contextmanager
def serving(tuned, max_batch=4, max_queue=8, request_timeout=120.0):
    import uvicorn

    app = make_app({"tuned": tuned}, CP, 65536, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def ask(url: str, question: str = QUESTION, timeout: float = 60, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]} | body,
                      timeout=timeout)


def health(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=30)  # hangs, and fails, where /health waits behind generation
    assert r.status_code == 200
    return r.json()


def until(check, what: str):
    for _ in range(600):
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"never: {what}")


def test_a_full_queue_refuses_at_once_with_429_and_retry_after(tuned, gate):
    with serving(tuned, max_batch=1, max_queue=1) as url, ThreadPoolExecutor(4) as pool, gate.held():
        held = pool.submit(ask, url)
        assert gate.entered.wait(60)  # generating, and held there
        more = [pool.submit(ask, url, q) for q in OTHERS[:2]]  # one may wait; the other is one too many
        done, pending = wait(more, timeout=30, return_when=FIRST_COMPLETED)
        assert done, "no request was refused while the queue was full: they all waited"
        refused = done.pop().result()
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        err = refused.json()["error"]
        assert err["code"] == "queue_full" and "--max-queue" in err["message"] and not held.done()
        gate.open.set()  # let them through
        assert held.result().status_code == 200 and [f.result().status_code for f in pending] == [200]
        assert ask(url).status_code == 200  # places free again once the queue drains


def test_health_answers_while_generation_runs_and_many_wait(tuned, gate):
    with serving(tuned, max_batch=8, max_queue=60) as url, ThreadPoolExecutor(50) as pool, gate.held():
        first = pool.submit(ask, url)
        assert gate.entered.wait(60)
        rest = [pool.submit(ask, url, OTHERS[i % 4], max_tokens=1) for i in range(49)]  # more than a thread pool holds
        until(lambda: health(url)["waiting"] == 49, "/health saw all 49 requests waiting")
        h = health(url)
        assert h["status"] == "ok" and h["generating"] == 1 and not first.done()
        gate.open.set()
        assert {f.result().status_code for f in [first, *rest]} == {200}
        until(lambda: (health(url)["generating"], health(url)["waiting"]) == (0, 0), "all were answered")


def send_and_hang_up(url: str, body: dict, gate: Gate) -> None:
    """Send a request on a raw socket, then close it once generation has begun: a client that gave up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n%s" % (len(data), data))
        assert gate.entered.wait(60)


@pytest.mark.parametrize("stream", [False, True])
def test_generation_stops_when_the_client_goes_away(tuned, gate, stream):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 100, "stream": stream}
    with serving(tuned) as url:
        whole = ask(url, max_tokens=100).json()  # undisturbed, this question runs to the limit
        assert whole["choices"][0]["finish_reason"] == "length" and gate.returned.wait(60) and gate.calls == [(1, 100)]
        gate.calls.clear()
        gate.entered.clear()
        gate.returned.clear()
        gate.delay = 0.1  # a slow model: 100 tokens take 10 s or more
        send_and_hang_up(url, body, gate)
        assert gate.returned.wait(60)
        assert gate.calls[0][1] < 100, "generation went on to max_tokens after its client had gone"
        gate.delay = 0
        assert ask(url).status_code == 200


def test_the_time_limit_ends_requests_that_generate_or_wait_too_long(tuned, gate):
    gate.delay = 0.05  # 200 tokens take 10 s or more: past the 4 s limit
    with serving(tuned, max_batch=1, request_timeout=4) as url:
        r = ask(url, max_tokens=200)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "timeout" and err["type"] == "server_error" and "--request-timeout (4 s), after" in err["message"]
        assert gate.returned.wait(60) and gate.calls[0][1] < 200  # the generation stopped too

        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 200, "stream": True}) as s:
            assert s.status_code == 200
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])  # text came, then the error
        assert events[-1]["error"]["code"] == "timeout"

        until(lambda: health(url)["generating"] == 0, "the streamed generation stopped")
        gate.calls.clear()
        gate.entered.clear()
        with ThreadPoolExecutor(2) as pool, gate.held():
            held = pool.submit(ask, url, max_tokens=200)
            assert gate.entered.wait(60)
            queued = ask(url, OTHERS[1])  # waits behind the held one until its own time runs out
            assert queued.status_code == 503 and "before its turn came" in queued.json()["error"]["message"]
            assert held.result().status_code == 503 and health(url)["waiting"] == 0
            gate.open.set()
        until(lambda: health(url)["generating"] == 0, "the held generation ended")
        assert len(gate.calls) == 1  # the request that timed out waiting was never generated


def test_batched_greedy_answers_equal_the_answers_alone(tuned):
    questions, limits = [QUESTION, *OTHERS], [12, 3, 40, 7, 20]  # different prompt lengths (padding) and limits
    alone = []
    for q, n in zip(questions, limits):
        a = Answer(tuned, q, CP, n)
        alone.append((list(a), a.finish_reason, a.completion_tokens))
    together = [Answer(tuned, q, CP, n) for q, n in zip(questions, limits)]
    generate(together)
    got = [([*iter(a.pieces.get, None)], a.finish_reason, a.completion_tokens) for a in together]
    assert got == alone and {r for _, r, _ in alone} == {"stop", "length"}


def test_queued_requests_are_generated_in_one_batch(tuned, gate, workdir, tiny_model, tiny_adapter, monkeypatch):
    monkeypatch.chdir(workdir)
    with serving(tuned, max_batch=4) as url, ThreadPoolExecutor(5) as pool, gate.held():
        held = pool.submit(ask, url)
        assert gate.entered.wait(60)
        queued = {q: pool.submit(ask, url, q) for q in OTHERS}
        until(lambda: health(url)["waiting"] == 4, "four requests waiting")
        gate.open.set()
        assert held.result().status_code == 200
        for q, f in queued.items():
            assert f.result().json()["choices"][0]["message"]["content"].strip() == expected_answer(tiny_model, tiny_adapter, q, 12).strip()
    assert [size for size, _ in gate.calls] == [1, 4]
