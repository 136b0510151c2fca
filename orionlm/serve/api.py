"""The HTTP routes: thin handlers that hand each request to the Server (serving.py) the app holds, and turn
its mistakes into OpenAI's error body.

With an API key, every route needs it but /health (as vLLM: probes of load balancers and orchestrators carry
no key, and it tells only liveness and load); /openapi.json needs it like the API it describes, and /metrics
(request counts, the model's name) too: Prometheus sends it with `authorization: {credentials: KEY}`.
"""

from __future__ import annotations

import contextlib
import hmac
import traceback
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import CONTENT_TYPE, CountRequests
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from .serving import APIError, Server, create_chat_completion, create_completion, sse


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]
router = APIRouter(responses={401: {"model": ErrorResponse, "description": "missing or wrong API key"}})
# what a request body can be refused with (the spec says so, for clients and schema-driven fuzzers)
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "an invalid request"},
    413: {"model": ErrorResponse, "description": "a body over --max-request-bytes"},
}
GENERATION_REFUSALS = REFUSALS | {404: {"model": ErrorResponse, "description": "no model of that name"}}


def generation_responses(response: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A generation route's answers: the response as JSON, or with stream: true its chunks as Server-Sent Events."""
    data = {"type": "string", "description": "a chunk's JSON, an error's JSON, or the closing [DONE]"}
    events = {
        "text/event-stream": {"itemSchema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}
    }
    return GENERATION_REFUSALS | {200: {"model": response, "content": events, "description": "JSON, or events"}}


def respond(result: BaseModel | AsyncIterator[str]) -> BaseModel | StreamingResponse:
    """A whole response as JSON, a stream as Server-Sent Events."""
    if isinstance(result, BaseModel):
        return result
    return StreamingResponse(ending_with_error(result), media_type="text/event-stream")


async def ending_with_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events; a failure after the response started (its status is sent) ends it with an error
    event in OpenAI's body, which clients raise as an API error rather than a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        traceback.print_exc()
        info = ErrorInfo(message=f"the server failed: {type(e).__name__}: {e}", type="server_error")
        yield sse(ErrorResponse(error=info))
        yield sse("[DONE]")


@router.get("/health")
async def health(server: ServerDep) -> Health:
    return server.health()


@router.get("/v1/models")
async def models(server: ServerDep) -> ModelList:
    return server.models()


@router.post("/v1/completions", response_model=None, responses=generation_responses(CompletionResponse))
async def completions(body: CompletionRequest, raw: Request, server: ServerDep) -> BaseModel | StreamingResponse:
    return respond(await create_completion(server, body, raw))


@router.post("/v1/chat/completions", response_model=None, responses=generation_responses(ChatCompletionResponse))
async def chat_completions(
    body: ChatCompletionRequest, raw: Request, server: ServerDep
) -> BaseModel | StreamingResponse:
    return respond(await create_chat_completion(server, body, raw))


@router.post("/tokenize", responses=REFUSALS)
async def tokenize(body: TokenizeRequest, server: ServerDep) -> TokenizeResponse:
    return await run_in_threadpool(server.tokenize, body)


@router.post("/detokenize", responses=REFUSALS)
async def detokenize(body: DetokenizeRequest, server: ServerDep) -> DetokenizeResponse:
    return server.detokenize(body)


@router.get("/tokenizer_info")
async def tokenizer_info(server: ServerDep) -> TokenizerInfo:
    return server.tokenizer_info()


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(server: ServerDep) -> PlainTextResponse:
    """Prometheus' text format: HTTP requests, tokens, the engine's queues, latency histograms (metrics.py)."""
    return PlainTextResponse(server.metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> dict:
    # a route of the router rather than FastAPI's own, so that it needs the key
    return request.app.openapi()


async def authenticate(request: Request) -> None:
    # a dependency rather than an HTTP middleware: Starlette's middleware wrapper hides disconnects
    api_key = request.app.state.api_key
    if api_key and request.url.path != "/health":
        # constant time (no timing leak of the key); headers arrive as latin-1, the key as given
        sent = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(sent, f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code)


async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    return error_response(400, f"{where}: {message}" if where else message, where or None)


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    response = error_response(e.status_code, str(e.detail))
    response.headers.update(e.headers or {})  # a 405's Allow
    return response


async def server_error(_: Request, e: Exception) -> JSONResponse:
    # a bug, not a client mistake: still OpenAI's body (Starlette prints the traceback after this answer)
    return error_response(500, f"the server failed: {type(e).__name__}: {e}")


class BodyLimit:
    """ASGI middleware that refuses a request body over `limit` bytes with a 413 before it is read whole: at once
    by its Content-Length, or, sent in chunks without one, as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is over this server's limit of {self.limit:,} bytes (--max-request-bytes)"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await error_response(413, too_large)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise StarletteHTTPException(413, too_large)  # answered by http_error, before any response starts
            return message

        await self.app(scope, counted, send)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Starts and stops the engine thread."""
    app.state.server.engine.start()
    yield
    app.state.server.engine.stop()


def create_app(server: Server, api_key: str | None = None, max_request_bytes: int = 2**23) -> FastAPI:
    """The FastAPI app over `server`; with `api_key`, every route but /health needs 'Authorization: Bearer KEY'
    (/openapi.json and /metrics included); request bodies over max_request_bytes (default 8 MiB) are refused;
    every request is counted in the server's metrics, refusals included."""
    app = FastAPI(title="orionlm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  dependencies=[Depends(authenticate)])  # fmt: skip
    app.state.server, app.state.api_key = server, api_key
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    paths = {route.path for route in router.routes}
    app.add_middleware(CountRequests, counter=server.metrics.http_requests, paths=paths)  # outermost: sees 413s
    return app
