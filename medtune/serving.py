"""Serving many requests with one model: one thread generates, batching waiting requests that share settings,
behind a bounded queue; each request follows its answer's text, and gives it up when its client leaves or its
time runs out. medtune serve's HTTP layer (medtune/commands/serve.py) is built on these."""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time

from medtune.assistant import DISCLAIMER, Answer, generate
from medtune.console import MedtuneError

POLL_S = 0.25  # how often a request with no new text checks its client and its time limit


class Scheduler:
    """The one thread that generates: it takes the oldest waiting answer and up to max_batch - 1 more with its
    batch_key, and generates them together. At most max_queue answers wait beyond those; more are refused."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: list[Answer] = []
        self.generating = 0
        self.last_batch_s = 1.0
        self.closed = False
        self.cond = threading.Condition()
        threading.Thread(target=self.run, name="medtune-generate", daemon=True).start()

    def admit(self, answer: Answer) -> bool:
        with self.cond:
            room = self.max_queue + (0 if self.generating else self.max_batch)  # an idle thread takes a batch at once
            if len(self.waiting) >= room:
                return False
            self.waiting.append(answer)
            self.cond.notify()
            return True

    def withdraw(self, answer: Answer) -> None:
        """An answer whose request ended before its turn (client gone, time limit) frees its place."""
        with self.cond:
            if answer in self.waiting:
                self.waiting.remove(answer)

    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.last_batch_s)))  # about when the running batch ends and frees places

    def run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.waiting or self.closed)
                if self.closed:
                    return
                key = self.waiting[0].batch_key
                batch = [a for a in self.waiting if a.batch_key == key][: self.max_batch]
                self.waiting = [a for a in self.waiting if a not in batch]
                self.generating = len(batch)
            start = time.monotonic()
            generate(batch)
            with self.cond:
                self.generating = 0
                self.last_batch_s = time.monotonic() - start

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class DisclaimerHeader:
    """Puts the disclaimer on every response. Plain ASGI: FastAPI's @app.middleware("http") hides a client's
    disconnect from request.is_disconnected(), and non-streaming generation then ran on for nobody."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-medical-disclaimer", DISCLAIMER.encode())]
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


class ClientGone(Exception):
    pass


class TimedOut(Exception):
    pass


async def follow(answer: Answer, request, deadline: float):
    """The answer's text pieces as the generating thread makes them. Between pieces, and every POLL_S while none
    comes, checks that the client is still there and the time limit has not passed; else cancels the answer."""
    loop, wake = asyncio.get_running_loop(), asyncio.Event()

    def woken():
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is stopping
            loop.call_soon_threadsafe(wake.set)

    answer.on_piece = woken
    while True:
        with contextlib.suppress(queue.Empty):
            while True:
                piece = answer.pieces.get_nowait()
                if piece is None:
                    if answer.error is not None:
                        raise MedtuneError(f"generation failed: {type(answer.error).__name__}: {answer.error}")
                    return
                yield piece
        if await request.is_disconnected():
            answer.cancel()
            raise ClientGone
        if time.monotonic() > deadline:
            answer.cancel("timeout")
            raise TimedOut
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), POLL_S)
        wake.clear()
