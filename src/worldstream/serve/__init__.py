"""`worldstream serve`: a local web page to walk through a generated world in real time.

    engine = Engine.load(ckpt_dir=None)                       # the student, loaded once (tiny built-in model here)
    server = Server(engine, ServeConfig(port=7860))           # Starlette app on uvicorn, one socket
    server.run()                                              # until SIGINT / SIGTERM; then engine.close()

One generation session per WebSocket connection (serve/connection.py), each run by its own two threads
(serve/worker.py: the chunk loop, and the JPEG encoder) so the event loop only moves messages. The page is one
static file, serve/static/index.html. The safety rules (loopback by default, token, Origin and Host checks,
session cap, message and image limits) are in serve/config.py and serve/protocol.py.
"""
from .config import ServeConfig
from .engine import Engine
from .server import Server, create_app

__all__ = ["Engine", "ServeConfig", "Server", "create_app"]
