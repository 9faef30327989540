"""What a server allows: where it listens, who may connect, how much they may send.

Safe by default:
  * it listens on 127.0.0.1; any other `--host` needs a token (generated and printed at start unless given),
    which the page passes on (`/?token=...` -> the WebSocket URL) and `/health` asks for too;
  * a request's Host header must name this machine's loopback when bound to loopback (so a page whose name
    was re-pointed to 127.0.0.1, DNS rebinding, is refused), and a WebSocket's Origin must be the page's own
    (the Origin equals the Host the browser connected to) or one given with `--allow_origin`; a request with no
    Origin (not a browser) is refused too;
  * at most `max_sessions` connections generate at once (default 1 on a GPU: the model and one KV cache are
    planned into its memory; 2 on the CPU, where sessions take turns at one compute lock and each runs at
    about half speed); one more is accepted only to be told why it is refused;
  * a text message is at most `max_text_bytes`, an image upload at most `max_image_bytes` and
    `max_image_pixels` (checked from the header before anything is decoded); larger messages get an error frame,
    and one larger than the transport cap (`max_message_bytes`) closes the connection before it is buffered.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None                 # required from clients when set (always set off loopback)
    allow_origins: tuple[str, ...] = ()      # extra page origins allowed to open the WebSocket
    max_sessions: int | None = None          # None: 1 on a GPU, 2 on the CPU (Engine.default_sessions)
    max_text_bytes: int = 4096
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 16_000_000
    max_image_side: int = 8192
    jpeg_quality: int = 85
    outputs: Path = field(default_factory=lambda: Path("outputs"))

    def __post_init__(self):
        self.outputs = Path(self.outputs)
        if not is_loopback(self.host) and not self.token:
            self.token = new_token()
        self.allow_origins = tuple(o.rstrip("/").lower() for o in self.allow_origins)
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg quality {self.jpeg_quality}: between 1 and 95")

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def max_message_bytes(self) -> int:
        """The transport's cap: a message past it closes the connection (1009) before it is buffered."""
        return self.max_image_bytes + 64 * 1024

    def url(self, port: int | None = None) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port or self.port}/" + (f"?token={self.token}" if self.token else "")

    # ---- checks (headers as a case-insensitive mapping, as Starlette gives them) -------------------------------
    def host_ok(self, headers) -> bool:
        """The Host header names a loopback address when we listen on loopback (DNS rebinding); else any."""
        host = headers.get("host")
        if not host:
            return False
        if not self.loopback:
            return True
        name = urlsplit("//" + host).hostname or ""
        return name.lower() in LOOPBACK_NAMES

    def origin_ok(self, headers) -> bool:
        """The WebSocket comes from our own page: Origin == http(s)://<Host>, or an --allow_origin."""
        origin, host = headers.get("origin"), headers.get("host")
        if not origin or not host:
            return False
        origin = origin.rstrip("/").lower()
        if origin in self.allow_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.lower() and not parts.path

    def token_ok(self, given: str | None) -> bool:
        if not self.token:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())
