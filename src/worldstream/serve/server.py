"""The web server: a Starlette app (the page, /health, the /ws WebSocket) on uvicorn, and its lifetime.

Routes:
    GET /         the page (serve/static/index.html, one file: HTML, CSS and plain JS; nothing from a CDN)
    GET /health   {"status": "ok", model, device, size, sessions, max_sessions, memory, threads}
    WS  /ws       one generation session per connection (serve/connection.py; protocol in serve/protocol.py)

All state lives in the app made by `create_app` (no module-level state): the engine, the config, the open
connections. `Server` binds one socket (port 0: a free one), runs uvicorn until SIGINT / SIGTERM, lets the
open sessions finish their chunk, and leaves the engine to its owner (`worldstream serve` closes it, freeing
the GPU).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from importlib import resources

import uvicorn

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .config import ServeConfig
from .connection import Connection
from .protocol import error

log = logging.getLogger(__name__)

POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013


class _State:
    """Everything the app knows, made per app."""

    def __init__(self, engine, config: ServeConfig):
        self.engine, self.config = engine, config
        self.max_sessions = config.max_sessions or engine.default_sessions()
        self.active: set[Connection] = set()
        self.served = 0
        self.page = resources.files("worldstream.serve").joinpath("static/index.html").read_bytes()

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": e.name, "device": str(e.device), "size": [e.width, e.height],
                "sessions": len(self.active), "max_sessions": self.max_sessions, "served": self.served,
                "memory": e.memory(), "threads": threading.active_count(),
                "active": [c.summary() for c in self.active]}


def _security_headers(host: str) -> dict:
    return {
        "Content-Security-Policy": (f"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                    f"img-src blob: data:; connect-src 'self' ws://{host} wss://{host}; "
                                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def create_app(engine, config: ServeConfig) -> Starlette:
    state = _State(engine, config)

    async def index(request: Request):
        if not config.host_ok(request.headers):
            return PlainTextResponse("invalid Host header", status_code=400)
        return HTMLResponse(state.page, headers=_security_headers(request.headers["host"]))

    async def health(request: Request):
        if not config.host_ok(request.headers):
            return PlainTextResponse("invalid Host header", status_code=400)
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.query_params.get("token")
        if not config.token_ok(given):
            return JSONResponse({"status": "unauthorized"}, status_code=401)
        return JSONResponse(state.health(), headers={"Cache-Control": "no-store"})

    async def ws(websocket: WebSocket):
        h = websocket.headers
        if not (config.host_ok(h) and config.origin_ok(h) and config.token_ok(websocket.query_params.get("token"))):
            log.warning("refused a WebSocket (Host %r, Origin %r, token %s)", h.get("host"), h.get("origin"),
                        "given" if websocket.query_params.get("token") else "missing")
            await websocket.close(code=POLICY_VIOLATION)          # before accept: the handshake gets HTTP 403
            return
        if len(state.active) >= state.max_sessions:
            await websocket.accept()
            await websocket.send_json(error("busy", f"this server runs at most {state.max_sessions} session(s) at "
                                                    "once and they are all in use; close another tab or try "
                                                    "again later"))
            await websocket.close(code=TRY_AGAIN_LATER, reason="session limit")
            return
        state.served += 1
        conn = Connection(websocket, engine, config, name=f"session{state.served}")
        state.active.add(conn)
        conn.finished.add_done_callback(lambda _: state.active.discard(conn))   # the slot frees with the GPU
        await conn.run()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for conn in list(state.active):      # server stopping: let each session finish its chunk and end
            conn.worker.stop()
        pending = [c.finished for c in state.active]
        if pending:
            await asyncio.wait(pending, timeout=120)

    app = Starlette(routes=[Route("/", index), Route("/health", health), WebSocketRoute("/ws", ws)],
                    lifespan=lifespan)
    app.state.serve = state
    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, with signal handling that stops it and returns (uvicorn's own re-raises the signal
    after shutting down, which would kill the process before the engine frees the GPU)."""

    signal: str | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handle(sig, frame):
            self.signal = signal.Signals(sig).name
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True            # a second Ctrl-C: stop waiting for sessions
            self.should_exit = True

        old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Server:
    """One server on one socket. `run()` blocks until SIGINT / SIGTERM (main thread) or `stop()`;
    `start()` runs it in a thread (tests, benchmarks) and returns once it accepts connections."""

    def __init__(self, engine, config: ServeConfig | None = None, log_level: str = "warning"):
        self.engine, self.config = engine, config or ServeConfig()
        self.app = create_app(engine, self.config)
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((self.config.host.strip("[]"), self.config.port))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.uvicorn = _Uvicorn(uvicorn.Config(
            self.app, log_level=log_level, access_log=False, lifespan="on", ws="websockets-sansio",
            ws_max_size=self.config.max_message_bytes, ws_per_message_deflate=False, ws_ping_interval=20,
            ws_ping_timeout=20, timeout_graceful_shutdown=120))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.config.url(self.port)

    @property
    def state(self) -> _State:
        return self.app.state.serve

    def run(self) -> str | None:
        """Serve until stopped; returns the signal's name if one stopped it."""
        self.uvicorn.run(sockets=[self.socket])
        return self.uvicorn.signal

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self.run, name="worldstream-serve", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 120.0) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
