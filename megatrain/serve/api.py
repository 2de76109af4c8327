"""The OpenAI-compatible HTTP API over a Batcher (FastAPI; streaming as server-sent events).

    GET  /health                 ok, and the batcher's load (running, waiting, slots, forwards run)
    GET  /v1/models              the one model served
    POST /v1/completions         prompt (text, texts or token ids) -> text; n, max_tokens, temperature, top_p, seed,
                                 stop, logprobs, stream (+ stream_options.include_usage)
    POST /v1/chat/completions    messages through the tokenizer's chat template (or megatrain's plain chat format)

A bad request gets OpenAI's error body {"error": {"message", "type", "param", "code"}} with a 4xx status; the server
keeps serving. A client that goes away frees its slots at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from megatrain.serve.batcher import Batcher, Busy, Sampling, Sequence, Token


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Generation(BaseModel):
    """What both endpoints share (OpenAI's names and defaults)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatRequest(Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


@dataclass
class Served:
    """What the endpoints need: the batcher, the tokenizer, the chat format, and the limits."""
    batcher: Batcher
    tokenizer: Any
    chat_ids: Callable[[list[dict]], list[int]]  # messages -> the ids the assistant's turn follows (SFT.prompt_ids)
    model_id: str
    request_timeout: float
    created: int = 0


def sampling_of(req: Generation, prompt_tokens: int, max_len: int, default_max: int | None) -> Sampling:
    """The request's settings checked against OpenAI's ranges and the model's context."""
    if req.n < 1 or req.n > 16:
        raise ApiError(400, f"n {req.n}: must be 1 to 16", "n")
    if not 0 <= req.temperature <= 2:
        raise ApiError(400, f"temperature {req.temperature}: must be 0 to 2", "temperature")
    if not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p {req.top_p}: must be more than 0 and at most 1", "top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise ApiError(400, "stop: at most 4 texts, none empty", "stop")
    room = max_len - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model reads at most {max_len}, with room left "
                            f"to generate: shorten it", "messages" if isinstance(req, ChatRequest) else "prompt",
                       "context_length_exceeded")
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens {max_tokens}: must be at least 1", "max_tokens")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens}: this model reads at most {max_len} tokens; after a "
                            f"{prompt_tokens}-token prompt at most {room} new tokens fit", "max_tokens",
                       "context_length_exceeded")
    logprobs = getattr(req, "logprobs", None) if isinstance(req, CompletionRequest) else None
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise ApiError(400, f"logprobs {logprobs}: must be 0 to 20", "logprobs")
    return Sampling(max_tokens=max_tokens or min(default_max or room, room), temperature=req.temperature,
                    top_p=req.top_p, seed=req.seed, stop=tuple(stop), logprobs=logprobs)


# a sequence ended by the server, not by its text: the status and message its request gets
ENDED = {"timeout": (504, "the request ran past the server's --request-timeout"),
         "error": (500, "the model's batcher failed; see the server's log"),
         "cancelled": (499, "the client closed the request")}


class Choices:
    """A request's sequences (prompts x n) in the batcher, their tokens arriving on one asyncio queue."""

    def __init__(self, served: Served, prompts: list[list[int]], sampling: Sampling, n: int):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Token]] = asyncio.Queue()
        deadline = time.monotonic() + served.request_timeout
        decode = served.tokenizer.decode
        self.seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(n):
                index = p * n + i
                s = Sampling(**{**sampling.__dict__, "seed": None if sampling.seed is None else sampling.seed + i})
                send = (lambda index: lambda tok: loop.call_soon_threadsafe(self.queue.put_nowait, (index, tok)))(index)
                self.seqs.append(Sequence(prompt, s, send, deadline, decode))
        self.open = len(self.seqs)
        self.prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, whatever n
        if served.batcher.error is not None:
            raise ApiError(503, "the model's batcher failed; see the server's log (restart the server)",
                           code="server_error", kind="server_error")
        try:
            served.batcher.submit(self.seqs)
        except Busy as e:
            raise ApiError(429, str(e), code="server_busy", kind="rate_limit_error") from None

    async def events(self):
        """(choice index, Token) until every choice has finished."""
        while self.open:
            index, tok = await self.queue.get()
            if tok.finish is not None:
                self.open -= 1
                if tok.finish in ENDED:
                    self.cancel()
                    status, message = ENDED[tok.finish]
                    raise ApiError(status, message, code=tok.finish, kind="server_error")
            yield index, tok

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    def usage(self) -> dict:
        completion = sum(len(s.out) for s in self.seqs)
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                    total_tokens=self.prompt_tokens + completion)


def completion_logprobs(tokens: list[Token], tokenizer) -> dict:
    texts = [tokenizer.decode([t.token]) for t in tokens]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return dict(tokens=texts, token_logprobs=[t.logprob for t in tokens], top_logprobs=[t.top for t in tokens],
                text_offset=offsets)


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="megatrain serve", docs_url=None, redoc_url=None)
    served.created = served.created or int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})").response()
        return ApiError(400, f"{where or 'body'}: {err.get('msg', 'invalid')}", where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return ApiError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return ApiError(500, f"internal error ({type(e).__name__}); see the server's log", kind="server_error").response()

    def check_model(name: str) -> None:
        if name != served.model_id:
            raise ApiError(404, f"model {name!r} is not served here; this server serves {served.model_id!r}",
                           "model", "model_not_found")

    def encode(text: str) -> list[int]:
        return served.tokenizer.encode(text) if text else [served.tokenizer.eod_id]

    @app.get("/health")
    async def health():
        b = served.batcher
        if b.error is not None:
            return JSONResponse({"status": "error", "error": repr(b.error)}, status_code=503)
        return {"status": "ok", **b.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": served.created,
                                            "owned_by": "megatrain"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if isinstance(req.prompt, str):
            prompts = [encode(req.prompt)]
        elif req.prompt and all(isinstance(x, int) for x in req.prompt):
            vocab = served.batcher.vocab_limit
            if any(not 0 <= x < vocab for x in req.prompt):
                raise ApiError(400, f"prompt: token ids must be 0 to {vocab - 1}", "prompt")
            prompts = [list(req.prompt)]
        elif req.prompt:
            prompts = [encode(p) for p in req.prompt]
        else:
            raise ApiError(400, "prompt: empty list", "prompt")
        sampling = sampling_of(req, max(len(p) for p in prompts), served.batcher.max_len, 16)
        choices = Choices(served, prompts, sampling, req.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = dict(id=rid, object="text_completion", created=created, model=served.model_id)

        if req.stream:
            async def chunks():
                async for index, tok in choices.events():
                    lp = completion_logprobs([tok], served.tokenizer) if sampling.logprobs is not None and \
                        tok.token is not None else None
                    yield json.dumps({**head, "choices": [dict(index=index, text=tok.text, logprobs=lp,
                                                               finish_reason=tok.finish)]})
                if (req.stream_options or {}).get("include_usage"):
                    yield json.dumps({**head, "choices": [], "usage": choices.usage()})
                yield "[DONE]"
            return stream(chunks(), choices)

        texts, tokens, finish = await collect(choices, request)
        out = []
        for i in range(len(choices.seqs)):
            lp = completion_logprobs([t for t in tokens[i] if t.token is not None], served.tokenizer) \
                if sampling.logprobs is not None else None
            out.append(dict(index=i, text=texts[i], logprobs=lp, finish_reason=finish[i]))
        return {**head, "choices": out, "usage": choices.usage()}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        if req.logprobs:
            raise ApiError(400, "logprobs: served on /v1/completions only", "logprobs")
        roles = {"system", "user", "assistant"}
        if not req.messages or any(m.role not in roles for m in req.messages):
            raise ApiError(400, "messages: a non-empty list of {role: system|user|assistant, content}", "messages")
        prompt = served.chat_ids([m.model_dump() for m in req.messages])
        sampling = sampling_of(req, len(prompt), served.batcher.max_len, None)
        choices = Choices(served, [prompt], sampling, req.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = dict(id=rid, object="chat.completion.chunk", created=created, model=served.model_id)

        if req.stream:
            async def chunks():
                for i in range(req.n):
                    yield json.dumps({**head, "choices": [dict(index=i, delta=dict(role="assistant", content=""),
                                                               finish_reason=None)]})
                async for index, tok in choices.events():
                    delta = dict(content=tok.text) if tok.text or tok.finish is None else {}
                    yield json.dumps({**head, "choices": [dict(index=index, delta=delta, finish_reason=tok.finish)]})
                if (req.stream_options or {}).get("include_usage"):
                    yield json.dumps({**head, "choices": [], "usage": choices.usage()})
                yield "[DONE]"
            return stream(chunks(), choices)

        texts, _, finish = await collect(choices, request)
        return {**head, "object": "chat.completion",
                "choices": [dict(index=i, message=dict(role="assistant", content=texts[i]), finish_reason=finish[i])
                            for i in range(len(texts))], "usage": choices.usage()}

    return app


async def collect(choices: Choices, request: Request) -> tuple[list[str], list[list[Token]], list[str]]:
    """Every choice's whole text; a client that disconnects meanwhile cancels them."""
    n = len(choices.seqs)
    texts, tokens, finish = [""] * n, [[] for _ in range(n)], [""] * n
    events = choices.events().__aiter__()
    while True:
        nxt = asyncio.ensure_future(events.__anext__())
        while True:
            done, _ = await asyncio.wait({nxt}, timeout=1.0)
            if done:
                break
            if await request.is_disconnected():
                nxt.cancel()
                choices.cancel()
                raise ApiError(499, ENDED["cancelled"][1])
        try:
            index, tok = nxt.result()
        except StopAsyncIteration:
            return texts, tokens, finish
        texts[index] += tok.text
        tokens[index].append(tok)
        if tok.finish:
            finish[index] = tok.finish


def stream(chunks, choices: Choices) -> EventSourceResponse:
    """Server-sent events; an error after the first chunk is an error event, and a client that goes away (the
    generator is cancelled) cancels the request's sequences."""
    async def events():
        try:
            async for data in chunks:
                yield {"data": data}
        except ApiError as e:
            yield {"data": json.dumps(error_body(e.message, e.kind, e.param, e.code))}
        finally:
            choices.cancel()
    return EventSourceResponse(events(), ping=15)
