"""The HTTP API: native routes (/v1/ask, /v1/documents, /v1/bank), OpenAI-compatible routes (/v1/models,
/v1/chat/completions), /health, /ready and /metrics. docs/serve.md documents every route.

Handlers validate and bound the request, hand one `Job` to the engine loop and await it; they never
touch the engine. Every refusal is `{"error": {"message", "type", "field"}}` with a status code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from msabank.errors import (BankLockedError, BankReadOnlyError, DocumentNotFoundError, InputError, MsabankError)
from msabank.serve.loop import EngineLoop, Job, NotReady, QueueFull

MAX_ID_BYTES = 500  # the bank's key limit (LMDB)


@dataclass
class Limits:
    """Per-request caps; each refusal names the field at fault."""

    max_body_bytes: int = 8 << 20
    max_question_tokens: int = 2048
    max_documents: int = 256
    max_rounds: int = 8
    max_new_tokens: int = 512
    min_version_wait_s: float = 10.0


@dataclass
class ServeConfig:
    api_keys: list[str] = field(default_factory=list)
    """Bearer tokens allowed to read and write."""
    read_keys: list[str] = field(default_factory=list)
    """Bearer tokens allowed to read only (writes get 403)."""
    limits: Limits = field(default_factory=Limits)
    model_id: str = "msabank"
    """The model id the OpenAI-compatible routes report and accept."""
    bank: str = ""


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.field, self.headers = status, message, type, field, headers


def error_body(message: str, type: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "field": field}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.field), status_code=err.status, headers=err.headers)


def _from_msabank(err: MsabankError) -> ApiError:
    msg = str(err) + (f" ({err.hint})" if err.hint else "")
    if isinstance(err, QueueFull):
        return ApiError(429, msg, "queue_full", headers={"Retry-After": "1"})
    if isinstance(err, NotReady):
        return ApiError(503, msg, "not_ready", headers={"Retry-After": "1"})
    if isinstance(err, DocumentNotFoundError):
        return ApiError(404, str(err), "not_found", "id")
    if isinstance(err, InputError):
        return ApiError(400, msg, "invalid_request_error")
    if isinstance(err, (BankReadOnlyError, BankLockedError)):
        return ApiError(409, msg, "bank_unavailable")
    return ApiError(500, msg, type(err).__name__)


# ---------------------------------------------------------------------------------------------------
# Request bodies (pydantic; a ValidationError names the field)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AskBody(_Strict):
    question: str
    max_rounds: Optional[int] = None  # default: 4, or the server's cap when lower
    max_new_tokens: Optional[int] = None  # default: 128, or the server's cap when lower
    token_budget: int = 8192
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    min_version: Optional[int] = None
    stream: bool = False
    transcript: bool = False


class RetrieveBody(_Strict):
    question: str
    min_version: Optional[int] = None


class DocumentIn(_Strict):
    id: Union[str, int]
    text: str


class UpsertBody(_Strict):
    documents: list[DocumentIn]


class DeleteBody(_Strict):
    ids: list[Union[str, int]]


class UpdateBody(_Strict):
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields msabank has no use for
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    # msabank extensions (extra_body in the openai client)
    min_version: Optional[int] = None
    max_rounds: Optional[int] = None


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        raise ApiError(400, f"{loc or 'body'}: {e['msg']}", "invalid_request_error", loc or "body") from None


# ---------------------------------------------------------------------------------------------------
# JSON for results


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def hit_json(h: Any) -> dict[str, Any]:
    return {"id": h.id, "number": h.number, "score": _num(h.score),
            "layers": {str(k): _num(v) for k, v in h.layers.items()}}


def answer_json(a: Any, version: int, *, transcript: bool = False) -> dict[str, Any]:
    out = {
        "question": a.question, "answer": a.answer, "outcome": getattr(a, "outcome", "answer"),
        "no_answer_reason": getattr(a, "no_answer_reason", None), "finish": a.finish, "version": version,
        "rounds": [{"index": r.index, "documents": [hit_json(h) for h in r.documents], "generated": r.generated,
                    "requested": list(r.requested), "injected": list(r.injected), "seconds": r.seconds}
                   for r in a.rounds],
        "evidence": [hit_json(h) for h in a.evidence],
        "timings": dict(a.timings),
    }
    if transcript:
        out["transcript"] = a.transcript
    return out


def record_json(r: Any, *, text: bool = True) -> dict[str, Any]:
    out = {"id": r.user_id, "number": r.number, "version": r.version, "tokens": r.n_tokens, "chunks": r.num_chunks,
           "content_hash": r.content_hash, "created_at": r.created_at, "updated_at": r.updated_at}
    if text:
        out["text"] = r.text
    return out


def report_json(r: Any) -> dict[str, Any]:
    return {"added": r.added, "updated": r.updated, "unchanged": r.unchanged, "deleted": r.deleted,
            "version": r.version}


# ---------------------------------------------------------------------------------------------------
# Auth (pure ASGI, so it covers every route, unknown ones included)

OPEN_PATHS = frozenset({"/health"})
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})


def is_write(method: str, path: str) -> bool:
    return method in WRITE_METHODS and (path == "/v1/documents" or path.startswith("/v1/documents/"))


class AuthMiddleware:
    """Bearer token on every route but /health: deny by default when a key is configured. Tokens are
    compared in constant time; a read-only key gets 403 on writes."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Any) -> None:
        self.app = app
        self.write_keys = [k.encode() for k in config.api_keys]
        self.read_keys = [k.encode() for k in config.read_keys]
        self.metrics = metrics

    @staticmethod
    def _matches(token: bytes, keys: list[bytes]) -> bool:
        ok = False
        for k in keys:  # every key compared: the time does not say which one matched
            ok |= hmac.compare_digest(token, k)
        return ok

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        status_seen: list[int] = []

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        try:
            refusal = self._check(scope, path, method)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, counting_send)
                return
            await self.app(scope, receive, counting_send)
        finally:
            route = path if path in _KNOWN_PATHS else ("/v1/documents/{id}" if path.startswith("/v1/documents/")
                                                       else "other")
            self.metrics.inc("msabank_http_requests_total", route=route, method=method,
                             code=status_seen[0] if status_seen else 0)

    def _check(self, scope: dict[str, Any], path: str, method: str) -> ApiError | None:
        if path in OPEN_PATHS or not (self.write_keys or self.read_keys):
            return None
        auth = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                auth = v
                break
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != b"bearer" or not token:
            return ApiError(401, "missing bearer token: send the header 'Authorization: Bearer KEY'",
                            "authentication_error", "Authorization", challenge)
        if self._matches(token, self.write_keys):
            return None
        if self._matches(token, self.read_keys):
            if is_write(method, path):
                return ApiError(403, f"{method} {path} writes to the bank; this key is read-only",
                                "permission_error", "Authorization")
            return None
        return ApiError(401, "invalid bearer token", "authentication_error", "Authorization", challenge)


_KNOWN_PATHS = frozenset({"/health", "/ready", "/metrics", "/v1/ask", "/v1/retrieve", "/v1/models",
                          "/v1/chat/completions", "/v1/documents", "/v1/bank"})


# ---------------------------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, counted while it is read: a Content-Length over `limit` or a chunked body that
    grows past it is refused with 413 before the rest is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared)} bytes; this server takes at most {limit}",
                       "request_too_large", "body")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"the body is over {limit} bytes (this server's --max-body-bytes)",
                           "request_too_large", "body")
    if not buf:
        raise ApiError(400, "the body is empty; send a JSON object", "invalid_json", "body")
    try:
        data = json.loads(bytes(buf))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}", "invalid_json", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}", "invalid_json", "body")
    return data


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


def create_app(loop: EngineLoop, config: ServeConfig) -> FastAPI:
    """The ASGI app serving `loop`'s engine under `config` (auth, limits)."""
    limits = config.limits
    metrics = loop.metrics
    idempotency: OrderedDict[str, tuple[str, asyncio.Future[Any]]] = OrderedDict()
    IDEMPOTENCY_KEEP = 10_000

    app = FastAPI(title="msabank", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuthMiddleware, config=config, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        if err.status >= 400 and err.type in ("queue_full", "not_ready", "request_too_large"):
            metrics.inc("msabank_rejected_total", reason=err.type)
        return _error_response(err)

    @app.exception_handler(MsabankError)
    async def _msabank_error(_: Request, err: MsabankError) -> JSONResponse:
        return _error_response(_from_msabank(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(error_body(str(err.detail), kind, None), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _query_error(_: Request, err: RequestValidationError) -> JSONResponse:
        e = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body")]
        name = ".".join(loc) or None
        return JSONResponse(error_body(f"{name or 'request'}: {e.get('msg')}", "invalid_request_error", name),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        metrics.inc("msabank_errors_total", type=type(err).__name__)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "internal_error", None),
                            status_code=500)

    # ---- running jobs ---------------------------------------------------------------------------

    async def run(request: Request, job: Job) -> Any:
        """Queue `job` and wait for it; a client that disconnects first cancels it (if not yet running)."""
        loop.submit(job)
        fut = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if fut not in done:
            job.cancel()
            raise ClientGone()
        return fut.result()

    async def wait_version(min_version: Optional[int]) -> None:
        if min_version is None or loop.state.version >= min_version:
            return
        deadline = time.monotonic() + limits.min_version_wait_s
        while loop.state.version < min_version:  # the loop publishes each committed version
            if time.monotonic() > deadline:
                raise ApiError(409, f"min_version {min_version} was not reached within "
                               f"{limits.min_version_wait_s:g} s (the bank is at version {loop.state.version})",
                               "version_not_reached", "min_version")
            await asyncio.sleep(0.005)

    def check_question(q: str, field: str) -> str:
        if not q.strip():
            raise ApiError(400, f"{field} is empty", "invalid_request_error", field)
        tok = loop.tokenizer
        if tok is None:
            raise NotReady("the server is still loading the model", hint="wait until GET /ready answers 200")
        n = len(tok.encode(q))
        if n > limits.max_question_tokens:
            raise ApiError(400, f"{field} is {n} tokens; this server takes at most {limits.max_question_tokens}",
                           "limit_exceeded", field)
        return q

    def check_generation(max_rounds: int, max_new_tokens: int, prefix: str = "") -> None:
        for name, value, cap, low in (("max_rounds", max_rounds, limits.max_rounds, 0),
                                      ("max_new_tokens", max_new_tokens, limits.max_new_tokens, 1)):
            if value < low:
                raise ApiError(400, f"{prefix}{name} must be >= {low}, got {value}", "invalid_request_error",
                               prefix + name)
            if value > cap:
                raise ApiError(400, f"{prefix}{name} is {value}; this server allows at most {cap}", "limit_exceeded",
                               prefix + name)

    def ask_options(max_rounds: int, max_new_tokens: int, token_budget: int, temperature: float, top_p: float,
                    seed: Optional[int]) -> tuple[tuple[str, Any], ...]:
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ApiError(400, f"temperature must be a finite number >= 0, got {temperature}", "invalid_request_error",
                           "temperature")
        if not 0 <= top_p <= 1:
            raise ApiError(400, f"top_p must be in [0, 1], got {top_p}", "invalid_request_error", "top_p")
        if token_budget < 1:
            raise ApiError(400, f"token_budget must be >= 1, got {token_budget}", "invalid_request_error",
                           "token_budget")
        return (("max_rounds", max_rounds), ("max_new_tokens", max_new_tokens), ("token_budget", token_budget),
                ("temperature", float(temperature)), ("top_p", float(top_p)), ("seed", seed))

    # ---- liveness, readiness, metrics ------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        st = loop.state
        if not st.ready:
            reason = (f"the engine failed to start: {st.failed}" if st.failed
                      else "loading the model and the routing index")
            return JSONResponse({"ready": False, **error_body(reason, "not_ready", None)}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse(served_json())

    def served_json() -> dict[str, Any]:
        st = loop.state
        s = st.stats
        return {"ready": st.ready, "bank": config.bank, "version": st.version, "documents": s.get("documents", 0),
                "tokens": s.get("tokens", 0), "chunks": s.get("live_chunks", 0), "index_rows": st.index_rows,
                "index_documents": st.index_docs, "bytes_on_disk": s.get("bytes_on_disk", 0),
                "model": config.model_id, "device": st.device, "load_seconds": st.load_seconds, "load": st.load,
                "queue_depth": loop.queue.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.set("msabank_ready", 1 if loop.state.ready else 0)
        metrics.set("msabank_queue_depth", loop.queue.qsize())
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- native API --------------------------------------------------------------------------------

    @app.post("/v1/ask")
    async def ask(request: Request) -> Response:
        body: AskBody = _validate(AskBody, await read_json(request, limits.max_body_bytes))
        q = check_question(body.question, "question")
        max_rounds = min(4, limits.max_rounds) if body.max_rounds is None else body.max_rounds
        max_new = min(128, limits.max_new_tokens) if body.max_new_tokens is None else body.max_new_tokens
        check_generation(max_rounds, max_new)
        opts = ask_options(max_rounds, max_new, body.token_budget, body.temperature, body.top_p,
                           body.seed)
        await wait_version(body.min_version)
        if body.stream:
            job = loop.submit(Job("ask", q, opts))
            return StreamingResponse(_sse_ask(job, body.transcript), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            res = await run(request, Job("ask", q, opts))
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(_ask_result(res, body.transcript))

    def _ask_result(res: dict[str, Any], transcript: bool) -> dict[str, Any]:
        out = answer_json(res["answer"], res["version"], transcript=transcript)
        out["timings"]["queue"] = res["queue_s"]
        out["batch_size"] = res["batch_size"]
        return out

    async def _sse_ask(job: Job, transcript: bool) -> AsyncIterator[str]:
        """Round events, then the answer. The engine reports a question when it is done (no token hook
        yet), so the rounds arrive together just before the answer."""
        try:
            yield _sse("queued", {"version": loop.state.version})
            res = await asyncio.wrap_future(job.future)
            out = _ask_result(res, transcript)
            for r in out["rounds"]:
                yield _sse("round", {**r, "version": out["version"]})
            yield _sse("answer", out)
        except MsabankError as err:
            e = _from_msabank(err)
            yield _sse("error", error_body(e.message, e.type, e.field))
        finally:
            job.cancel()  # the client went away before the engine took it: drop it

    @app.post("/v1/retrieve")
    async def retrieve(request: Request) -> Response:
        body: RetrieveBody = _validate(RetrieveBody, await read_json(request, limits.max_body_bytes))
        q = check_question(body.question, "question")
        await wait_version(body.min_version)
        try:
            hits, version = await run(request, Job("retrieve", q))
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({"question": q, "version": version, "documents": [hit_json(h) for h in hits]})

    # ---- documents ----------------------------------------------------------------------------------

    def check_id(doc_id: Any, field: str) -> str:
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id:
            raise ApiError(400, f"{field} is empty", "invalid_request_error", field)
        if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:
            raise ApiError(400, f"{field} is {len(doc_id.encode('utf-8'))} bytes; ids are at most {MAX_ID_BYTES} "
                           "bytes (UTF-8)", "limit_exceeded", field)
        return doc_id

    def check_text(text: str, field: str) -> str:
        if not text.strip():
            raise ApiError(400, f"{field} is empty", "invalid_request_error", field)
        return text

    async def write(request: Request, kind: str, payload: Any, fingerprint: str) -> Response:
        """Run a write once per Idempotency-Key: a retry with the same key and body gets the first reply
        (same committed version), with a different body 422."""
        key = request.headers.get("idempotency-key")
        if key is not None:
            if not key or len(key) > 255:
                raise ApiError(400, "Idempotency-Key must be 1 to 255 characters", "invalid_request_error",
                               "Idempotency-Key")
            seen = idempotency.get(key)
            if seen is not None:
                if seen[0] != fingerprint:
                    raise ApiError(422, f"Idempotency-Key {key!r} was used for a different request",
                                   "idempotency_conflict", "Idempotency-Key")
                report = await asyncio.shield(seen[1])
                return JSONResponse(report_json(report), headers={"Idempotent-Replayed": "true"})
        job = loop.submit(Job(kind, payload))
        fut = asyncio.wrap_future(job.future)
        if key is not None:
            idempotency[key] = (fingerprint, fut)
            while len(idempotency) > IDEMPOTENCY_KEEP:
                idempotency.popitem(last=False)
        try:
            report = await asyncio.shield(fut)  # a write is never cancelled once queued: it commits or fails
        except BaseException:
            if key is not None and idempotency.get(key, (None, None))[1] is fut:
                del idempotency[key]  # failed: a retry runs it again
            raise
        return JSONResponse(report_json(report))

    @app.post("/v1/documents")
    async def upsert(request: Request) -> Response:
        data = await read_json(request, limits.max_body_bytes)
        docs = data.get("documents")
        if isinstance(docs, list) and len(docs) > limits.max_documents:
            raise ApiError(413, f"{len(docs)} documents in one request; this server takes at most "
                           f"{limits.max_documents}", "limit_exceeded", "documents")
        body: UpsertBody = _validate(UpsertBody, data)
        if not body.documents:
            raise ApiError(400, "documents is empty", "invalid_request_error", "documents")
        items: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for i, d in enumerate(body.documents):
            doc_id = check_id(d.id, f"documents[{i}].id")
            if doc_id in seen:
                raise ApiError(400, f"documents[{i}].id {doc_id!r} repeats documents[{seen[doc_id]}].id",
                               "invalid_request_error", f"documents[{i}].id")
            seen[doc_id] = i
            items.append((doc_id, check_text(d.text, f"documents[{i}].text")))
        return await write(request, "put", items, _fingerprint("put", items))

    @app.get("/v1/documents")
    async def list_documents(request: Request, limit: int = 0, text: bool = True) -> Response:
        if limit < 0:
            raise ApiError(400, f"limit must be >= 0, got {limit}", "invalid_request_error", "limit")
        try:
            recs, version = await run(request, Job("list", limit))
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({"version": version, "documents": [record_json(r, text=text) for r in recs]})

    @app.get("/v1/documents/{doc_id:path}")
    async def get_document(request: Request, doc_id: str) -> Response:
        doc_id = check_id(doc_id, "id")
        try:
            rec, versions = await run(request, Job("get", doc_id))
        except ClientGone:
            return Response(status_code=499)
        out = record_json(rec)
        out["versions"] = [{"version": v.version, "kind": v.kind, "bank_version": v.bank_version,
                            "committed_at": v.committed_at} for v in versions]
        return JSONResponse(out)

    @app.put("/v1/documents/{doc_id:path}")
    async def update_document(request: Request, doc_id: str) -> Response:
        doc_id = check_id(doc_id, "id")
        body: UpdateBody = _validate(UpdateBody, await read_json(request, limits.max_body_bytes))
        text = check_text(body.text, "text")
        return await write(request, "update", (doc_id, text), _fingerprint("update", [(doc_id, text)]))

    @app.delete("/v1/documents/{doc_id:path}")
    async def delete_document(request: Request, doc_id: str) -> Response:
        doc_id = check_id(doc_id, "id")
        return await write(request, "delete", [doc_id], _fingerprint("delete", [(doc_id, "")]))

    @app.post("/v1/documents/delete")
    async def delete_documents(request: Request) -> Response:
        """Delete several documents in one commit (all live, or nothing is deleted)."""
        body: DeleteBody = _validate(DeleteBody, await read_json(request, limits.max_body_bytes))
        if not body.ids:
            raise ApiError(400, "ids is empty", "invalid_request_error", "ids")
        if len(body.ids) > limits.max_documents:
            raise ApiError(413, f"{len(body.ids)} ids in one request; this server takes at most "
                           f"{limits.max_documents}", "limit_exceeded", "ids")
        ids = list(dict.fromkeys(check_id(d, f"ids[{i}]") for i, d in enumerate(body.ids)))
        return await write(request, "delete", ids, _fingerprint("delete", [(i, "") for i in ids]))

    @app.get("/v1/bank")
    async def bank_stats() -> Response:
        if not loop.state.ready:
            raise NotReady("the server is still loading the model and the routing index")
        return JSONResponse({**served_json(), "stats": loop.state.stats})

    # ---- OpenAI-compatible ------------------------------------------------------------------------------

    def model_json() -> dict[str, Any]:
        return {"id": config.model_id, "object": "model", "created": 0, "owned_by": "msabank"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_json()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_id:
            raise ApiError(404, f"model {model_id!r} is not served here (this server serves {config.model_id!r})",
                           "not_found", "model")
        return model_json()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: ChatBody = _validate(ChatBody, await read_json(request, limits.max_body_bytes))
        if body.model != config.model_id:
            raise ApiError(404, f"model {body.model!r} is not served here (GET /v1/models lists "
                           f"{config.model_id!r})", "not_found", "model")
        if body.n not in (None, 1):
            raise ApiError(400, "n must be 1: msabank answers once per question", "invalid_request_error", "n")
        q = check_question(_last_user_text(body), "messages")
        max_new = body.max_completion_tokens or body.max_tokens or min(128, limits.max_new_tokens)
        max_rounds = min(4, limits.max_rounds) if body.max_rounds is None else body.max_rounds
        check_generation(max_rounds, max_new)
        opts = ask_options(max_rounds, max_new, 8192, 0.0 if body.temperature is None else body.temperature,
                           1.0 if body.top_p is None else body.top_p, body.seed)
        await wait_version(body.min_version)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            job = loop.submit(Job("ask", q, opts))
            return StreamingResponse(_sse_chat(job, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            res = await run(request, Job("ask", q, opts))
        except ClientGone:
            return Response(status_code=499)
        a = res["answer"]
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": config.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": a.answer},
                         "finish_reason": _finish(a.finish), "logprobs": None}],
            "usage": _usage(a), "msabank": _ask_result(res, False),
        })

    def _usage(a: Any) -> dict[str, int]:
        from msabank import prompt as P

        prompt_tokens = len(P.question_prompt(loop.tokenizer, a.question).ids)
        completion = sum(len(r.tokens) for r in a.rounds)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def _sse_chat(job: Job, cid: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": config.model_id,
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                       "logprobs": None}], **extra}) + "\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            res = await asyncio.wrap_future(job.future)
            a = res["answer"]
            if a.answer:
                yield chunk({"content": a.answer}, None)
            yield chunk({}, _finish(a.finish), usage=_usage(a), msabank=_ask_result(res, False))
            yield "data: [DONE]\n\n"
        except MsabankError as err:
            e = _from_msabank(err)
            yield "data: " + json.dumps(error_body(e.message, e.type, e.field)) + "\n\n"
        finally:
            job.cancel()

    return app


def _fingerprint(kind: str, items: list[tuple[str, str]]) -> str:
    import hashlib

    h = hashlib.sha256(kind.encode())
    for i, t in items:
        h.update(b"\0" + i.encode() + b"\0" + t.encode())
    return h.hexdigest()


def _finish(finish: str) -> Literal["stop", "length"]:
    return "length" if finish in ("round_limit", "token_budget") else "stop"


def _last_user_text(body: ChatBody) -> str:
    for i in range(len(body.messages) - 1, -1, -1):
        m = body.messages[i]
        if m.role != "user":
            continue
        if isinstance(m.content, str):
            return m.content
        if isinstance(m.content, list):
            parts = [p.get("text", "") for p in m.content if isinstance(p, dict) and p.get("type") == "text"]
            return "\n".join(t for t in parts if isinstance(t, str))
        raise ApiError(400, f"messages[{i}].content is empty", "invalid_request_error", f"messages[{i}].content")
    raise ApiError(400, "messages has no user message: the last user message is the question",
                   "invalid_request_error", "messages")


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
