"""HTTP plumbing of ``mmrerank serve``: the request-body limit (pure ASGI middleware) and error bodies that
never echo the input (``message`` for Cohere's and Jina's SDKs, ``detail`` in FastAPI's shape).
:func:`install` puts both on an app, before ``serve.ingress`` freezes a pickled copy of it."""

import json
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException


def max_body_bytes() -> int:
    try:  # this replica's settings: serve.ingress(api) pickled a copy of `api`, so api.state is not ours
        return int(serve.get_replica_context().servable_object.settings.max_body_bytes)
    except Exception:  # noqa: BLE001 - outside a replica (tests of the bare app)
        return 8 << 20


class BodyLimit:
    """Pure ASGI middleware (no BaseHTTPMiddleware task/stream per request): 413 over max_body_bytes,
    by Content-Length up front, or counted while a chunked body streams in."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = max_body_bytes()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            too_big = f"request body over {limit} bytes"
            return await JSONResponse(status_code=413, content=error_body(too_big, too_big))(
                scope, receive, send)
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:  # FastAPI re-raises HTTPException from the body read -> a 413 response
                    raise HTTPException(status_code=413, detail=f"request body over {limit} bytes")
            return msg

        return await self.app(scope, counted, send)



class SafeJSON(JSONResponse):
    """Error bodies that always encode: ASCII escapes (a lone surrogate in an echoed id or field name)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(detail: Any, message: str) -> dict[str, Any]:
    """Every error body: ``message`` (what Cohere's and Jina's SDKs show) and ``detail`` (FastAPI's shape)."""
    return {"message": message, "detail": detail}


async def invalid_request(request: Any, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input: it can be huge, NaN/inf (not JSON) or not text."""
    detail = [{"type": str(e.get("type", "")), "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
               "msg": str(e.get("msg", ""))} for e in exc.errors()]
    parts = [f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail[:3]]
    more = f" (+{len(detail) - 3} more)" if len(detail) > 3 else ""
    return SafeJSON(status_code=422, content=error_body(detail, "invalid request: " + "; ".join(parts) + more))


async def http_error(request: Any, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, ensure_ascii=True)
    return SafeJSON(status_code=exc.status_code, content=error_body(exc.detail, message),
                     headers=getattr(exc, "headers", None))


def install(api: FastAPI) -> None:
    """The body limit and the error handlers on ``api``."""
    api.add_middleware(BodyLimit)
    api.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    api.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
