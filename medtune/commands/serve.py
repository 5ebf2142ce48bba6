"""An OpenAI-compatible HTTP API for the fine-tuned model: `POST /v1/chat/completions` (streamed as server-sent
events with `"stream": true`, or whole), `GET /v1/models`, `GET /health`; FastAPI served by uvicorn.

    medtune serve --model models/merged --port 8000
    medtune serve --adapter models/adapter --exp my-exp --with-base    # also serves model "base"
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "tuned", "messages": [{"role": "user", "content": "What causes gout ?"}]}'

Model ids: "tuned" (the default when a request names none) and, with --with-base, "base". The model was
fine-tuned on single questions, so a request holds exactly one user message, rendered with the training
template; system messages and earlier turns are refused rather than silently dropped.
Limits: bodies over --max-request-bytes get 413; max_tokens over --max-new-tokens-cap, prompts over
--max-prompt-tokens and malformed requests get 400, in OpenAI's error format.
Load: one thread generates, up to --max-batch waiting requests (same model and sampling settings) at once; at most
--max-queue more wait, and a request beyond them is refused at once (429 + Retry-After). A request still waiting or
generating --request-timeout seconds after it came is ended (503 + Retry-After, or an error event once a stream
has begun). A client that disconnects, streaming or not, stops its generation. /health is answered on the event
loop, which generation never blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

import click
from fastapi import (
    Request,  # at module level: FastAPI resolves the endpoint's annotations from here
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medtune.assistant import (
    DISCLAIMER,
    Answer,
    ChatModel,
    Limits,
    RequestError,
    limit_options,
    load_base,
    load_tuned,
    model_folder,
    trust_option,
)
from medtune.console import MedtuneError, cli_errors, setup_logging
from medtune.serving import ClientGone, DisclaimerHeader, Scheduler, TimedOut, follow

log = logging.getLogger("medtune.serve")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request that this model can honour; other fields are refused."""
    model_config = ConfigDict(extra="forbid")
    model: str = "tuned"
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


def error(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def question_of(req: ChatRequest) -> str:
    if len(req.messages) != 1 or req.messages[0].role != "user":
        roles = [m.role for m in req.messages]
        raise RequestError(f"messages must be exactly one user message (got roles {roles}): the model was fine-tuned on "
                           "single questions with a fixed system prompt (format.system_prompt)")
    return req.messages[0].content


def make_app(models: dict[str, ChatModel], cp: Limits, max_request_bytes: int, max_batch: int, max_queue: int,
             request_timeout: float):
    from fastapi import FastAPI
    from fastapi.responses import Response, StreamingResponse

    scheduler = Scheduler(max_batch, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="medtune", description=DISCLAIMER, lifespan=lifespan)
    app.add_middleware(DisclaimerHeader)

    @app.get("/health")
    async def health():  # on the event loop, never behind the model: it answers while generation runs
        return {"status": "ok", "models": list(models), "generating": scheduler.generating, "waiting": len(scheduler.waiting)}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": k, "object": "model", "created": 0, "owned_by": "medtune",
                                            "description": cm.label} for k, cm in models.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + request_timeout
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, f"request body of {int(declared):,} bytes is over --max-request-bytes ({max_request_bytes:,})")
        body = b""
        async for chunk in request.stream():  # chunked bodies declare no length: count as they arrive
            body += chunk
            if len(body) > max_request_bytes:
                return error(413, f"request body is over --max-request-bytes ({max_request_bytes:,})")
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "body"
            detail = "not valid JSON" if first["type"] == "json_invalid" else first["msg"]
            more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
            return error(400, f"{where}: {detail}{more}", param=where)
        if req.model not in models:
            return error(404, f"model {req.model!r} is not served here (served: {', '.join(models)})", "model", "model_not_found")
        cm = models[req.model]
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            answer = Answer(cm, question_of(req), cp, limit, req.temperature, req.top_p)
        except RequestError as e:
            return error(400, str(e))
        if not scheduler.admit(answer):
            return error(429, f"the server is busy: {scheduler.max_queue} requests are already waiting (--max-queue); "
                         "retry after Retry-After seconds", code="queue_full", headers={"Retry-After": scheduler.retry_after()})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        pieces = follow(answer, request, deadline)

        def ended(e: Exception | None):
            """However the request ended, its generation stops or it leaves the queue; the error response, if any."""
            queued = answer in scheduler.waiting
            answer.cancel()
            scheduler.withdraw(answer)
            if isinstance(e, ClientGone):
                log.info("%s: client went away after %d tokens; generation stopped", rid, answer.completion_tokens)
                return Response(status_code=499)  # nobody reads it
            if isinstance(e, TimedOut):
                where = "before its turn came" if queued else f"after {answer.completion_tokens} tokens"
                log.info("%s: ended by --request-timeout %s", rid, where)
                return error(503, f"the request ran past --request-timeout ({request_timeout:g} s), {where}: retry later, or "
                             "ask for fewer max_tokens", code="timeout", headers={"Retry-After": scheduler.retry_after()})
            return error(500, str(e)) if e is not None else None

        def usage():
            return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                    "total_tokens": answer.prompt_tokens + answer.completion_tokens}

        try:  # a stream begins with the first text, so one that ends while waiting still gets an HTTP error
            text = await anext(pieces, None) if req.stream else "".join([piece async for piece in pieces])
        except (ClientGone, TimedOut, MedtuneError) as e:
            return ended(e)
        if not req.stream:
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": answer.finish_reason}], "usage": usage()}

        def chunk(delta: dict, finish: str | None = None) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(obj)}\n\n"

        async def events():
            problem = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                if text is not None:
                    yield chunk({"content": text})
                    async for piece in pieces:
                        yield chunk({"content": piece})
            except (ClientGone, TimedOut, MedtuneError) as e:
                problem = e
            finally:  # also when the server stops sending because the client went away
                response = ended(problem)
            if response is not None:
                if response.status_code != 499:  # headers are sent: report in the stream, as OpenAI does
                    yield f"data: {response.body.decode()}\n\n"
                return
            yield chunk({}, answer.finish_reason)
            if req.stream_options and req.stream_options.include_usage:
                yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': req.model, 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), help="a merged model folder")
@click.option("--adapter", type=click.Path(file_okay=False, path_type=Path), help="a LoRA adapter folder")
@click.option("--exp", help="take the folder from this DVC experiment or git revision instead of the workspace")
@click.option("--with-base", is_flag=True, help='also serve the base model, as model "base"')
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-request-bytes", default=65536, show_default=True, type=click.IntRange(min=1024),
              help="larger request bodies are refused (413) before they are parsed")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="waiting requests for one model with the same sampling settings generated together")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(min=0),
              help="requests that may wait beyond the batch being generated; more are refused at once (429 + Retry-After)")
@click.option("--request-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a request may wait and generate; then it ends with 503 (an error event once streaming)")
@limit_options
@trust_option
def main(model_dir: Path | None, adapter: Path | None, exp: str | None, with_base: bool, host: str, port: int,
         max_request_bytes: int, max_batch: int, max_queue: int, request_timeout: float, limits: Limits, trust_remote_code: bool) -> None:
    """Serve the fine-tuned model over an OpenAI-compatible HTTP API."""
    import uvicorn

    setup_logging()
    path = model_folder(model_dir, adapter, exp)
    with cli_errors(kept=False):
        tuned, m = load_tuned(path, adapter is not None, exp, trust_remote_code)
        models = {"tuned": tuned} | ({"base": load_base(m, tuned.fmt)} if with_base else {})
    log.info("serving %s on http://%s:%d/v1", ", ".join(f"{k} = {cm.label}" for k, cm in models.items()), host, port)
    app = make_app(models, limits, max_request_bytes, max_batch, max_queue, request_timeout)
    uvicorn.run(app, host=host, port=port, log_level="info")


if __name__ == "__main__":
    main()
