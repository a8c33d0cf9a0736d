"""The HTTP side of ``saekit serve``: a Starlette app on uvicorn over one ``serve.Explorer``.

Pages: ``/features`` (``/api/features``), ``/feature/{id}`` (``/api/feature/{id}``),
``/search?text=...&q=...`` (``/api/search``), ``/steer`` (``POST /api/steer``: JSON, or with
``"stream": true`` server-sent events ``queued`` / ``token`` / ``done`` / ``error``; ``POST
/api/sweep``: one feature's steering curve; each stops at its next token once its client
disconnects), and
``/static/{serve.css,serve.js}``, held in memory: no path reaches the file system. A refused
request gets a 4xx with the message (JSON ``{"error": ...}`` under ``/api/``, else a page).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (HTMLResponse, JSONResponse, RedirectResponse, Response,
                                 StreamingResponse)
from starlette.routing import Route

from saekit import serve_pages as pages
from saekit.errors import SaekitError
from saekit.serve import Explorer, ServeConfig
from saekit.serve_requests import (Limits, ServeError, feature_query, steer_request,
                                   sweep_request)

log = logging.getLogger("saekit.serve")
MAX_BODY = 64 * 1024
POLL_S = 0.2  # how often a waiting request checks that its client is still there


def build_explorer(config: ServeConfig) -> Explorer:
    """Load what ``config`` names (explanations first, so a bad file fails before the model
    loads), capturing ``--dataset`` when no cache is given."""
    from saekit.analyse import model_hook
    from saekit.cache import ActivationCache
    from saekit.capture import CaptureConfig, capture_activations
    from saekit.formats import load_foreign_sae
    from saekit.model import DEFAULT_MODEL, cache_dir, load_model
    from saekit.search import by_feature, load_explanations

    explanations = None if config.explanations is None else \
        by_feature(load_explanations(config.explanations), sae=config.sae)
    sae = load_foreign_sae(config.sae, device=config.device)
    name = sae.cfg.metadata.model_name or DEFAULT_MODEL
    model = load_model(name, device=config.device)
    if config.activations:
        cache = ActivationCache.open(config.activations)
        folder = Path(config.cache_dir or Path(config.activations) / ".saekit-serve")
    else:
        folder = Path(config.cache_dir or cache_dir() / "serve")
        capture = CaptureConfig(model=name, hooks=[model_hook(sae)], dataset=config.dataset,
                                tokens=config.tokens, context=sae.cfg.metadata.context_size or 128)
        tag = f"{capture.dataset}-{capture.tokens}-{capture.context}-{capture.hooks[0]}"
        out = folder / ("activations-" + "".join(c if c.isalnum() else "_" for c in tag))
        cache = ActivationCache.open(capture_activations(capture, out, model=model))
    return Explorer(model, sae, cache, folder, explanations, Limits.of(config), config.max_rows,
                    config.n_examples)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- requests ---------------------------------------------------------------------------------

def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def refusal(request: Request, message: str, status: int) -> Response:
    if is_api(request):
        return JSONResponse({"error": message}, status)
    return HTMLResponse(pages.error_page(message), status)


async def saekit_error(request: Request, err: Exception) -> Response:
    return refusal(request, str(err), getattr(err, "status", 400))


async def http_error(request: Request, err: HTTPException) -> Response:
    message = "No such page." if err.status_code == 404 else str(err.detail)
    return refusal(request, message, err.status_code)


async def server_error(request: Request, err: Exception) -> Response:
    log.exception("saekit serve: %s %s failed", request.method, request.url.path)
    return refusal(request, "Internal error (the server's log has the details).", 500)


async def read_json(request: Request) -> object:
    """The JSON body; only ``Content-Type: application/json``, which a page of another site
    cannot send here without a CORS preflight this server never grants."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ServeError(f"Send the request body as JSON (Content-Type: application/json), "
                         f"not {kind or 'no content type'}.", 415)
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ServeError(f"The request body has {len(body)} bytes; at most {MAX_BODY}.", 413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ServeError(f"The request body is not valid JSON ({err}).") from None


def feature_id(request: Request) -> int:
    return int(request.path_params["feature"])


# --- the app ------------------------------------------------------------------------------------

def create_app(explorer: Explorer, hosts: list[str] | None = None) -> Starlette:
    """The explorer's web app (every route runs on ``explorer``); ``hosts``: the Host headers
    it answers (default: loopback names only, which stops DNS-rebinding pages; ``["*"]``:
    any)."""
    title = f"SAE features at {explorer.hook} ({explorer.sae.d_sae:,} features)"
    explained = explorer.explanations is not None

    def features(request: Request) -> Response:
        query = feature_query(request.query_params)
        total, rows = explorer.features(query)
        if is_api(request):
            return JSONResponse({"total": total, "page": query.page, "per_page": query.per_page,
                                 "rows": rows})
        return HTMLResponse(pages.features_page(rows, total, query, explorer.sae.d_sae,
                                                explained, title))

    def feature(request: Request) -> Response:
        start = time.perf_counter()
        data = explorer.feature(explorer.check_feature(feature_id(request)))
        if is_api(request):
            return JSONResponse(data)
        record = explorer.explanation(data["feature"]) if explained else False
        return HTMLResponse(pages.feature_page(data, record, time.perf_counter() - start))

    def search(request: Request) -> Response:
        text = request.query_params.get("text", "")
        query = request.query_params.get("q", "")
        result = explorer.search_text(text) if text.strip() or is_api(request) else None
        if is_api(request):
            return JSONResponse(result)
        matches = None
        if query.strip() and explained:
            from saekit.search import search_features

            matches = search_features(explorer.explanations.values(), query[:200], top=100)
        return HTMLResponse(pages.search_page(text, result, query, matches, explained))

    def steer_form(request: Request) -> Response:
        params = request.query_params
        edits = [{"feature": f, "mode": m, "value": v} for f, m, v in zip(
            params.getlist("feature"), params.getlist("mode") or ["clamp"] * 64,
            params.getlist("value") or [""] * 64)]
        prompt = params.get("prompt", "I think that")[:explorer.limits.max_prompt_chars]
        concept = params.get("concept", "")[:200]
        return HTMLResponse(pages.steer_page(edits, explorer.limits, prompt, concept))

    async def steer(request: Request) -> Response:
        body = await read_json(request)
        plan = steer_request(body, explorer.limits, explorer.sae.d_sae)
        deadline = time.monotonic() + explorer.limits.request_timeout
        if isinstance(body, dict) and body.get("stream"):
            return StreamingResponse(steer_events(explorer, plan, deadline),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await until_done(request, explorer,
                                lambda: explorer.steer(plan, deadline=deadline), deadline)

    async def sweep(request: Request) -> Response:
        plan = sweep_request(await read_json(request), explorer.limits, explorer.sae.d_sae)
        deadline = time.monotonic() + explorer.limits.request_timeout
        return await until_done(request, explorer, lambda: explorer.sweep(plan), deadline)

    def status(request: Request) -> Response:
        return JSONResponse({"queued": explorer.worker.queued, "cancelled": explorer.cancelled,
                             "forward_passes": explorer.forward_passes,
                             "d_sae": explorer.sae.d_sae, "hook": explorer.hook,
                             "limits": explorer.limits.__dict__})

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in pages.STATIC:
            raise ServeError("No such file.", 404)
        kind, text = pages.STATIC[name]
        return Response(text, media_type=kind)

    routes = [Route("/", lambda request: RedirectResponse("/features")),
              Route("/features", features), Route("/api/features", features),
              Route("/feature/{feature:int}", feature),
              Route("/api/feature/{feature:int}", feature),
              Route("/search", search), Route("/api/search", search),
              Route("/steer", steer_form), Route("/api/steer", steer, methods=["POST"]),
              Route("/api/sweep", sweep, methods=["POST"]),
              Route("/api/status", status), Route("/static/{name}", static)]
    handlers = {SaekitError: saekit_error, HTTPException: http_error, Exception: server_error}
    allowed = hosts or ["127.0.0.1", "localhost", "[::1]"]
    app = Starlette(routes=routes, exception_handlers=handlers,
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)])
    app.state.explorer = explorer
    return app


async def until_done(request: Request, explorer: Explorer, job: Callable[[], dict],
                     deadline: float) -> Response:
    """``job()``'s JSON, run in turn on the model's thread (``Explorer.guarded``). Every
    ``POLL_S`` while it waits or runs, the client is checked: when it has left, or past
    ``deadline`` (``time.monotonic()``), the job stops at its next token (or is skipped when
    its turn comes), so an abandoned request neither runs on nor holds up the queue."""
    loop = asyncio.get_running_loop()
    finished = asyncio.Event()
    cancelled = threading.Event()
    future, _ = explorer.worker.submit(lambda: explorer.guarded(job, cancelled))
    future.add_done_callback(lambda _: call_soon(loop, finished.set))
    try:
        while not future.done():
            try:
                await asyncio.wait_for(finished.wait(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({"error": "The client left."}, 499)
                if time.monotonic() > deadline:
                    raise ServeError(f"The request ran past --request-timeout "
                                     f"({explorer.limits.request_timeout:g} s); try again.", 504)
    finally:
        cancelled.set()  # a no-op once the job is done
    result = future.result()
    if result is None:
        return JSONResponse({"error": "The request was stopped."}, 499)
    return JSONResponse(result)


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """``callback()`` on ``loop`` from another thread; nothing once the loop has closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


def event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def outcome(future: Future) -> dict:
    """The last event of a steering job: its texts, or the error."""
    if future.cancelled():
        return {"type": "error", "error": "The request was cancelled."}
    err = future.exception()
    if err is None:
        result = future.result()
        return {"type": "done", **result} if result else {"type": "error", "error": "stopped"}
    if isinstance(err, SaekitError):
        return {"type": "error", "error": str(err)}
    log.error("saekit serve: steering failed", exc_info=err)
    return {"type": "error", "error": "Internal error (the server's log has the details)."}


async def steer_events(explorer: Explorer, plan, deadline: float):
    """Server-sent events of one steering job: its place in the queue while it waits, the
    text so far after each token, then ``done`` (or ``error``). The job stops when the client
    leaves (the generator is closed)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def emit(data: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, data)
        except RuntimeError:  # the server's loop has closed
            cancelled.set()

    def job() -> dict | None:
        if time.monotonic() > deadline:
            raise ServeError("The request waited past --request-timeout; try again.", 504)
        return explorer.steer(plan, emit, cancelled, deadline)

    future, ticket = explorer.worker.submit(lambda: explorer.guarded(job, cancelled))
    future.add_done_callback(lambda f: emit(outcome(f)))
    try:
        position = explorer.worker.position(ticket)
        if position is not None:
            yield event({"type": "queued", "position": position})
        while True:
            try:
                data = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                position = explorer.worker.position(ticket)
                if position is None:
                    continue
                data = {"type": "queued", "position": position}
            yield event(data)
            if data["type"] in ("done", "error"):
                return
    finally:
        cancelled.set()


# --- running it -------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_server(explorer: Explorer, host: str, port: int):
    """A ``uvicorn.Server`` for the explorer (``.run()`` blocks; ``.should_exit = True`` stops)."""
    import uvicorn

    hosts = None if is_loopback(host) else ["*"]
    config = uvicorn.Config(create_app(explorer, hosts), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    return uvicorn.Server(config)


def start_in_thread(explorer: Explorer, host: str = "127.0.0.1", port: int | None = None,
                    timeout: float = 30.0):
    """``(server, url)``: the explorer served from a background thread, once it accepts
    connections (for tests and notebooks); stop it with ``server.should_exit = True``."""
    port = port or free_port(host)
    server = make_server(explorer, host, port)
    threading.Thread(target=server.run, daemon=True, name="saekit-serve").start()
    stop = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > stop:
            raise ServeError(f"The server did not start on {host}:{port} within {timeout:g} s.",
                             500)
        time.sleep(0.05)
    return server, f"http://{host}:{port}"
