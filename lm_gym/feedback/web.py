"""The FastAPI application: the JSON API, the pages, static files and the security headers around them."""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from lm_gym.feedback import api, pages
from lm_gym.feedback.auth import Settings
from lm_gym.feedback.group_commit import GroupCommit
from lm_gym.feedback.store import FeedbackStore, hash_token

MAX_BODY_BYTES = 1_000_000
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC_TYPES = {"rate.js": "text/javascript", "style.css": "text/css"}


def create_app(store: FeedbackStore, admin_token: str | None = None, ratings_per_item: int = 3) -> FastAPI:
    """The rating app over ``store``.

    :param store: the feedback store.
    :param admin_token: the admin secret (at least 16 characters); default: the admin token whose hash the
        database keeps (``lm-gym feedback serve`` makes one, or stores the one it is given).
    :param ratings_per_item: judgements wanted per item (>= 1) before it leaves the queue.
    """
    if ratings_per_item < 1:
        raise ValueError(f"ratings_per_item must be >= 1, got {ratings_per_item}")
    if admin_token is not None and len(admin_token) < 16:
        raise ValueError("the admin token must be at least 16 characters")
    admin_hash = store.admin_token_hash() if admin_token is None else hash_token(admin_token)
    if admin_hash is None:
        raise ValueError("the database has no admin token yet: pass admin_token (lm-gym feedback serve makes one)")
    app = FastAPI(title="lm-gym feedback", version="1", description="Rate and compare model responses; "
                  "the ratings feed lm-gym's FeedbackReward, load_feedback and load_preferences.")
    app.state.settings = Settings(store, admin_hash, ratings_per_item)
    app.state.group_commit = GroupCommit(store)
    app.include_router(api.router)
    app.include_router(pages.router)
    app.add_middleware(Guard)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in STATIC_TYPES:
            return JSONResponse({"detail": f"no static file {name!r}"}, status_code=404)
        return Response(pages.static_file(name), media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def home():
        return pages.render("error.html", 200, message="Open your personal invitation link to rate.")

    return app


WORKER_ENVIRONMENT = ("LM_GYM_FEEDBACK_DB", "LM_GYM_FEEDBACK_RATINGS_PER_ITEM")


def app_from_environment() -> FastAPI:
    """The app configured by the environment variables :data:`WORKER_ENVIRONMENT` (database URL, ratings per
    item) and the database's admin token: the factory each uvicorn worker process calls under
    ``serve --workers N``."""
    missing = [name for name in WORKER_ENVIRONMENT if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"app_from_environment needs the environment variables {missing}")
    db, per_item = (os.environ[name] for name in WORKER_ENVIRONMENT)
    return create_app(FeedbackStore(db), None, int(per_item))


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY")]


class Guard:
    """ASGI middleware: refuse bodies over :data:`MAX_BODY_BYTES` with a 413 (by their Content-Length, or, for
    a body streamed without one, as it arrives) and add the security headers to every answer (the
    Content-Security-Policy everywhere but Swagger UI's ``/docs``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return await _too_large(f"request body of {length.decode(errors='replace')} bytes")(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive)
            if body is None:
                return await _too_large("request body (streamed without Content-Length) over the limit")(
                    scope, receive, send)
            receive = _replay(body, receive)
        extra = SECURITY_HEADERS
        if not scope["path"].startswith("/docs"):  # Swagger UI loads its own scripts
            extra = extra + [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _too_large(what: str) -> JSONResponse:
    return JSONResponse({"detail": f"{what}; the limit is {MAX_BODY_BYTES} bytes"}, status_code=413)


async def _read_body(receive) -> bytes | None:
    """The whole body of a request streamed without Content-Length (chunked), or None as soon as it passes
    :data:`MAX_BODY_BYTES` (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: the app sees an empty body
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY_BYTES:
            return None
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives the app ``body`` in one message, then defers to ``receive``."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed
