"""`worldstream serve` on the tiny built-in causal student (CPU), over loopback only.

1. A real headless Chromium (Debian's, /usr/bin/chromium, driven by Playwright; no browser is downloaded) loads
   the page: frames arrive, holding W moves the server's camera forward and lights the W key cap, releasing it
   stops the camera, a drag on the look pad turns it, a second tab beyond the session cap is refused with a
   message, a malformed message gets an error frame and the stream goes on. A screenshot is saved.
2. The safety rules with a plain WebSocket client: token, Origin, Host (DNS rebinding), message size cap, image
   validation (format whitelist, byte and pixel limits before decoding, undecodable data), bad messages.
3. Session controls: pause / resume, reset, prompt change through the text encoder, record to MP4 (atomic).
4. Faults: a client that disconnects mid-chunk leaves no thread behind; SIGTERM stops the command cleanly.

No timing assertions (the machine is shared); waits are generous deadlines, not measurements.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from worldstream.pipelines.video import read_mp4
from worldstream.serve import Engine, ServeConfig, Server
from worldstream.serve.protocol import BadMessage, Input, check_image, parse_frame, parse_text
from worldstream.serve.worker import Batch, Controls, Mailbox

websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT = 90.0                   # seconds: a deadline for things that take a chunk or two (~1 s each, alone)
SRC = Path(__file__).resolve().parent.parent / "src"


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The serving machinery on a toy causal student (random weights, 112x64: ~1 s a chunk); the built-in
    tiny world student is what `worldstream serve` runs by default (test_sigterm_... below)."""
    from worldstream.testing.checkpoint import demo_image, write_tiny_checkpoint

    root = write_tiny_checkpoint(tmp_path_factory.mktemp("student"), "lingbot-fast-v2-tiny", seed=0)
    e = Engine.load(root, image=demo_image(), prompt="A walk through a sunny field.", prompt_cache=None)
    yield e
    e.close()


@pytest.fixture
def serve(engine, tmp_path):
    """start(**config) -> a running Server on a free loopback port (stopped at the end)."""
    servers = []

    def start(**kw):
        kw.setdefault("port", 0)
        kw.setdefault("max_sessions", 1)
        kw.setdefault("outputs", tmp_path / "outputs")
        s = Server(engine, ServeConfig(**kw)).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


class Client:
    """A plain WebSocket client speaking the page's protocol."""

    def __init__(self, server, *, origin: str | None = "auto", token: str | None = None, host="127.0.0.1"):
        url = f"ws://{host}:{server.port}/ws" + (f"?token={token}" if token else "")
        origin = f"http://{host}:{server.port}" if origin == "auto" else origin
        self._cm = connect(url, origin=origin, proxy=None, max_size=None, open_timeout=WAIT)
        self.ws = self._cm.__enter__()
        self.status: dict | None = None
        self.frames: list[dict] = []
        self.hello = self.until(lambda m: m["type"] in ("hello", "error"))

    def send(self, msg) -> None:
        self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    def until(self, pred, timeout: float = WAIT) -> dict:
        """Read (keeping frames and the latest status) until a JSON message satisfies `pred`."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message in {timeout} s (last status {self.status})")
            m = self.ws.recv(timeout=left)
            if isinstance(m, bytes):
                self.frames.append(parse_frame(m)[0])
                self.send({"type": "ack", "frame": self.frames[-1]["number"]})
                continue
            msg = json.loads(m)
            if msg["type"] == "status":
                self.status = msg
            if pred(msg):
                return msg

    def chunk_done(self, n: int) -> dict:
        """Wait for the status after the session's n-th chunk."""
        return self.until(lambda m: m["type"] == "status" and m["chunk"] >= n and "latency_ms" in m)

    def alive(self) -> None:
        """The session answers (a ping) and keeps generating (another chunk)."""
        self.send({"type": "ping", "id": 99})
        self.until(lambda m: m["type"] == "pong" and m["id"] == 99)
        n = self.status["chunk"] if self.status else 0
        self.chunk_done(n + 1)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


def wait_for(pred, timeout: float = WAIT, what: str = "condition"):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not met in {timeout} s")
        time.sleep(0.05)


def get(server, path: str, host: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        c.putrequest("GET", path, skip_host=True)
        c.putheader("Host", host or f"127.0.0.1:{server.port}")
        for k, v in (headers or {}).items():
            c.putheader(k, v)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def png_bytes(w: int, h: int, color=(200, 80, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h, and whose pixel data is garbage."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"garbage, not zlib") + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------- 1. browser

def _launch(playwright, profile: Path):
    if not Path(CHROMIUM).exists():
        return None, f"{CHROMIUM} is not installed (Debian package chromium; .ci/run installs it)"
    try:
        ctx = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 860})
        return ctx, None
    except Exception as e:                     # noqa: BLE001 (any launch failure: report it loudly)
        return None, f"Chromium at {CHROMIUM} could not start: {type(e).__name__}: {str(e)[:500]}"


def until(page, expression: str, timeout: float = WAIT):
    """Poll a JS expression until it is truthy. (Playwright's wait_for_function evaluates its predicate with
    eval(), which the page's Content-Security-Policy forbids, rightly; page.evaluate is not subject to it.)"""
    end = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > end:
            raise TimeoutError(f"{expression} still false after {timeout} s; "
                               f"status {page.evaluate('window.worldstream && window.worldstream.status')}")
        time.sleep(0.1)


def _skip_loudly(why: str):
    msg = f"BROWSER TEST SKIPPED: {why}"
    print("\n" + "!" * 100 + f"\n{msg}\n" + "!" * 100, file=sys.stderr)
    warnings.warn(msg)
    pytest.skip(msg)


def test_the_page_in_chromium_walks_the_world(serve, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    server = serve(max_sessions=1)
    with sync_api.sync_playwright() as p:
        ctx, why = _launch(p, tmp_path / "chromium-profile")
        if ctx is None:
            _skip_loudly(why)
        try:
            page = ctx.new_page()
            console = []
            page.on("console", lambda m: console.append(m.text))
            js = "window.worldstream"
            t0 = time.monotonic()
            page.goto(server.url)
            until(page, f"{js} && {js}.shown > 0 && {js}.status && {js}.status.pose")
            print(f"\nfirst frame on the page {time.monotonic() - t0:.2f} s after loading it "
                  f"({page.evaluate(js + '.firstFrameMs') / 1e3:.2f} s after its WebSocket opened)")
            status = lambda: page.evaluate(f"{js}.status")                      # noqa: E731
            z0 = status()["pose"]["z"]

            # hold W: the camera moves forward, the key cap lights up
            page.keyboard.down("w")
            time.sleep(1.0)
            until(page, f"{js}.status.pose.z > {z0} + 0.2")
            assert "held" in page.locator('.cap[data-key="w"]').get_attribute("class")
            assert page.evaluate(f"{js}.frames") > 0 and page.evaluate(f"{js}.shown") > 0
            until(page, f"{js}.keyToPixelMs !== null")
            page.screenshot(path=str(tmp_path / "serve.png"))
            # release: once the chunks that started while it was held are done, the camera stands still
            page.keyboard.up("w")
            assert "held" not in page.locator('.cap[data-key="w"]').get_attribute("class")
            c = status()["chunk"]
            until(page, f"{js}.status.chunk >= {c + 2}")
            z1 = status()["pose"]["z"]
            until(page, f"{js}.status.chunk >= {c + 3}")
            s = status()
            assert z1 > z0 and s["pose"]["z"] == pytest.approx(z1, abs=1e-9), (z0, z1, s["pose"])

            # a drag to the right on the look pad turns the camera right (positive yaw)
            yaw0 = s["pose"]["yaw"]
            box = page.locator("#lookpad").bounding_box()
            cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(cx - 50, cy)
            page.mouse.down()
            page.mouse.move(cx + 50, cy, steps=10)
            page.mouse.up()
            until(page, f"{js}.status.pose.yaw > {yaw0} + 5")

            # a second tab beyond the cap (1) is refused with a message; the first one goes on
            page2 = ctx.new_page()
            page2.goto(server.url)
            until(page2, f"{js}.errors.some(e => e.code === 'busy') && {js}.closed")
            assert page2.evaluate(f"{js}.closed.code") == 1013
            assert "Refused" in page2.locator("#overlay").inner_text()
            page2.close()

            # a malformed message: an error frame, and the stream goes on
            n = page.evaluate(f"{js}.frames")
            page.evaluate(f"{js}.ws.send('{{not json')")
            until(page, f"{js}.errors.some(e => e.code === 'bad_message')")
            until(page, f"{js}.frames > {n} + 16")
            assert page.evaluate(f"{js}.ws.readyState") == 1 and page.evaluate(f"{js}.closed") is None
            assert "bad_message" in page.locator("#log").inner_text()
            assert not [m for m in console if "Content Security Policy" in m], console   # the page obeys its CSP
        finally:
            ctx.close()
    shot = tmp_path / "serve.png"
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")


# ---------------------------------------------------------------------------------------------- 2. safety

def test_token_origin_and_host_checks(serve):
    ws_exc = websockets.exceptions.InvalidStatus
    server = serve(token="s3cret")
    for kw in (dict(), dict(token="wrong"), dict(token="s3cret", origin=None),
               dict(token="s3cret", origin="http://evil.example"),
               dict(token="s3cret", origin=f"http://127.0.0.1:{server.port + 1}")):
        with pytest.raises(ws_exc) as e:
            Client(server, **kw)
        assert e.value.response.status_code == 403, kw
    c = Client(server, token="s3cret")
    assert c.hello["type"] == "hello" and c.hello["width"] == 112 and c.hello["height"] == 64
    c.close()
    # /health needs the token too; the page itself carries no secret
    assert get(server, "/health")[0] == 401
    code, body = get(server, "/health?token=s3cret")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert get(server, "/health", headers={"Authorization": "Bearer s3cret"})[0] == 200
    code, body = get(server, "/")
    assert code == 200 and b"worldstream" in body
    # a name re-pointed at 127.0.0.1 (DNS rebinding) is refused, page and WebSocket alike
    assert get(server, "/", host=f"evil.example:{server.port}")[0] == 400
    s = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    s.sendall((f"GET /ws?token=s3cret HTTP/1.1\r\nHost: evil.example:{server.port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Sec-WebSocket-Version: 13\r\nOrigin: http://evil.example:{server.port}\r\n\r\n").encode())
    assert s.recv(200).split(b"\r\n")[0].split()[1] == b"403"
    s.close()


def test_off_loopback_a_token_is_made_and_the_page_is_not_cached():
    cfg = ServeConfig(host="0.0.0.0")
    assert cfg.token and len(cfg.token) >= 24 and cfg.url(7860).endswith(f"?token={cfg.token}")
    assert ServeConfig().token is None and ServeConfig(host="::1").token is None
    assert not cfg.token_ok(None) and not cfg.token_ok("x") and cfg.token_ok(cfg.token)
    h = {"host": "10.1.2.3:7860", "origin": "http://10.1.2.3:7860"}
    assert cfg.host_ok(h) and cfg.origin_ok(h)
    assert not cfg.origin_ok({"host": "10.1.2.3:7860", "origin": "http://10.1.2.3:7861"})
    assert ServeConfig(allow_origins=("https://proxy.example/",)).origin_ok(
        {"host": "127.0.0.1:7860", "origin": "https://proxy.example"})


def test_bad_messages_get_error_frames_and_the_session_lives(serve):
    server = serve()
    c = Client(server)
    c.chunk_done(1)
    bad = ["{not json", "[]", '{"type": 3}', '{"type": "fly"}', '{"type": "input", "keys": "wxz"}',
           '{"type": "input", "keys": "w", "look": [NaN, 0]}', '{"type": "input", "look": [500, 0]}',
           '{"type": "input", "seq": -1}', '{"type": "record"}', '{"type": "prompt", "text": ""}',
           json.dumps({"type": "prompt", "text": "x" * 3000}), json.dumps({"type": "input", "pad": "x" * 5000})]
    for msg in bad:
        c.send(msg)
        e = c.until(lambda m: m["type"] == "error")
        assert e["code"] in ("bad_message", "too_large"), (msg, e)
    c.alive()
    c.close()


def test_image_uploads_are_checked_before_decoding(serve, engine):
    server = serve(max_image_bytes=200_000, max_image_pixels=1_000_000)
    c = Client(server)
    c.chunk_done(1)
    gif = b"GIF89a" + b"\x00" * 100
    for data, code in [(b"not an image at all", "bad_image"), (gif, "bad_image"),
                       (png_header_only(2000, 1000), "too_large"),              # pixels: from the header alone
                       (png_header_only(64, 64), "bad_image"),                  # a header, no pixels: decode fails
                       (b"\x89PNG\r\n\x1a\n" + os.urandom(220_000), "too_large")]:   # bytes
        c.send(data)
        e = c.until(lambda m: m["type"] == "error")
        assert e["code"] == code, (data[:16], e)
    c.alive()
    # a good image restarts the stream from it
    c.send(png_bytes(300, 200))
    c.until(lambda m: m["type"] == "notice" and "new first frame" in m["message"])
    s = c.chunk_done(1)
    assert s["chunk"] == 1 and s["pose"]["z"] == 0.0
    # past the transport's cap the connection is closed before the message is buffered
    with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
        c.send(b"\x89PNG\r\n\x1a\n" + b"\x00" * server.config.max_message_bytes)
        c.until(lambda m: False)
    assert e.value.rcvd is None or e.value.rcvd.code == 1009      # (the close frame may be lost mid-send)
    wait_for(lambda: server.state.health()["sessions"] == 0, what="the session to end")


def test_a_session_beyond_the_cap_is_refused_with_a_message(serve):
    server = serve(max_sessions=1)
    a = Client(server)
    b = Client(server)
    assert b.hello["type"] == "error" and b.hello["code"] == "busy" and "at most 1 session" in b.hello["message"]
    with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
        b.ws.recv(timeout=WAIT)
    assert e.value.rcvd.code == 1013
    a.chunk_done(1)
    a.close()
    wait_for(lambda: server.state.health()["sessions"] == 0, what="the slot to free")
    c = Client(server)                         # the slot is free again
    assert c.hello["type"] == "hello"
    c.close()


# ---------------------------------------------------------------------------------------------- 3. controls

def test_keys_look_pause_reset_prompt_and_record(serve, tmp_path):
    server = serve(outputs=tmp_path / "rec")
    c = Client(server)
    c.send({"type": "record", "on": True})
    c.until(lambda m: m["type"] == "notice" and "recording to" in m["message"])
    # (wait for the first chunk made with each input, not for a chunk count: under load an input can miss the
    # chunk that starts next)
    with_input = lambda seq: lambda m: m["type"] == "status" and "latency_ms" in m and m["input_seq"] == seq  # noqa: E731
    c.send({"type": "input", "keys": "w", "look": [0, 0], "seq": 1})
    s = c.until(with_input(1))
    assert s["pose"]["z"] > 0 and s["recording"] and s["window"]["size"] == 18 and s["keys"] == "w"
    c.send({"type": "input", "keys": "", "look": [30, 0], "seq": 2})
    s = c.until(with_input(2))
    assert s["pose"]["yaw"] > 10 and s["keys"] == ""
    # pause: no chunk starts; resume: they do again
    c.send({"type": "pause"})
    s = c.until(lambda m: m["type"] == "status" and m["paused"])
    paused_at = s["chunk"]
    time.sleep(2.5)
    c.send({"type": "ping", "id": 1})
    c.until(lambda m: m["type"] == "pong")
    assert c.status["chunk"] == paused_at
    c.send({"type": "resume"})
    c.chunk_done(paused_at + 1)
    # a new prompt goes through the text encoder; the frames seen stay
    c.send({"type": "prompt", "text": "A snowy mountain pass at dawn."})
    c.until(lambda m: m["type"] == "notice" and "prompt set" in m["message"])
    s = c.chunk_done(c.status["chunk"] + 1)
    assert s["chunk"] > paused_at
    # finish the recording: an MP4 under the outputs folder, with every frame generated while recording
    c.send({"type": "record", "on": False})
    r = c.until(lambda m: m["type"] == "recorded")
    path = Path(r["path"])
    assert path.parent == (tmp_path / "rec").resolve() and path.suffix == ".mp4"
    video = read_mp4(path)
    assert video.shape[1:] == (64, 112, 3) and len(video) == r["frames"] >= 13 + 16 * 3
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]     # no temp file left
    # reset: back to the first frame and the start pose
    c.send({"type": "reset"})
    c.until(lambda m: m["type"] == "notice" and "reset" in m["message"])
    s = c.chunk_done(1)
    assert s["chunk"] == 1 and s["pose"]["yaw"] == 0.0
    c.close()


def test_controls_latest_state_wins_and_taps_count_once():
    c = Controls()
    c.set_input(Input(frozenset("w"), (1.0, 0.0), 1))
    c.set_input(Input(frozenset(), (2.0, -1.0), 2))             # W tapped and released before the chunk
    c.set_input(Input(frozenset("d"), (0.0, 0.0), 3))
    got = c.take_input()
    assert got.keys == frozenset("wd") and got.look == (3.0, -1.0) and got.seq == 3
    got = c.take_input()
    assert got.keys == frozenset("d") and got.look == (0.0, 0.0)
    for _ in range(1000):                                        # a storm: bounded, the sum is clamped
        c.set_input(Input(frozenset("a"), (90.0, 0.0), 4))
    assert c.take_input().look == (180.0, 0.0)
    c.command("prompt", "a")
    c.command("prompt", "b")
    c.command("reset")
    c.command("image", ("PNG", b""))
    assert c.wait_for_work() == {"prompt": "b", "image": ("PNG", b"")}
    m = Mailbox()
    m.put(Batch(0, 0, np.zeros((13, 2, 2, 3), np.uint8), 0))
    m.put(Batch(1, 0, np.zeros((16, 2, 2, 3), np.uint8), 13))
    assert m.take().chunk == 1 and m.dropped == 13


def test_protocol_parsing():
    assert parse_text('{"type":"input","keys":"WD","look":[1.5,-2],"seq":7}', 4096)[1] == \
        Input(frozenset("wd"), (1.5, -2.0), 7)
    assert parse_text('{"type":"ping","id":3}', 4096) == ("ping", 3)
    with pytest.raises(BadMessage, match="limit"):
        parse_text(" " * 5000, 4096)
    assert check_image(png_bytes(40, 30), 10**6, 10**6, 100) == ("PNG", 40, 30)
    with pytest.raises(BadMessage):
        check_image(png_bytes(200, 30), 10**6, 10**6, 100)      # a side over the limit


# ---------------------------------------------------------------------------------------------- 4. faults

def test_a_page_that_stops_reading_gets_the_newest_frames_not_a_backlog(serve):
    server = serve()
    c = Client(server)
    active = lambda: server.state.health()["active"][0]                   # noqa: E731
    # the client reads (and acks) nothing: one chunk goes in flight, then frames are dropped, not sent
    wait_for(lambda: active()["dropped"] >= 2 * 16, what="two chunks of frames dropped")
    a = active()
    assert a["frames_sent"] == 16 and a["chunk"] >= 3, a
    # reading again: after what was in flight, the frames come from the newest chunks
    c.until(lambda m: len(c.frames) >= 16 + 8)
    assert {f["chunk"] for f in c.frames[16:]} <= set(range(a["chunk"] - 1, a["chunk"] + 3)), \
        ([f["chunk"] for f in c.frames], a)
    c.close()


def test_a_client_leaving_mid_chunk_leaks_no_threads(serve):
    server = serve(max_sessions=1)
    c = Client(server)
    c.chunk_done(1)
    c.close()
    wait_for(lambda: server.state.health()["sessions"] == 0, what="the first session to end")
    baseline = threading.active_count()
    names = lambda: sorted(t.name for t in threading.enumerate())   # noqa: E731
    before = names()
    for i in range(3):
        c = Client(server)
        c.send({"type": "input", "keys": "wl", "seq": 1})
        c.until(lambda m: m["type"] == "status" and "latency_ms" in m)     # a chunk done, the next under way
        c.ws.close()                                                      # gone mid-chunk
        wait_for(lambda: server.state.health()["sessions"] == 0, what="the session to end")
        wait_for(lambda: threading.active_count() == baseline, timeout=30,
                 what=f"threads back to {baseline} (now {names()})")
    assert names() == before


def test_sigterm_stops_the_server_and_frees_the_model(tmp_path):
    """`worldstream serve` with no checkpoint: the built-in tiny world student streams; SIGTERM stops it."""
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "worldstream.cli", "serve", "--port", "0", "--no_prompt_cache",
                             "--outputs", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    try:
        url = None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("open http://"):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        port = int(url.split(":")[2].split("/")[0])
        ws = connect(f"ws://127.0.0.1:{port}/ws", origin=f"http://127.0.0.1:{port}", proxy=None,
                     max_size=None).__enter__()
        ws.send(json.dumps({"type": "record", "on": True}))
        end = time.monotonic() + WAIT
        while not isinstance(ws.recv(timeout=max(1, end - time.monotonic())), bytes):
            pass                                                # until a frame: a session is generating
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.exceptions.ConnectionClosed):
            while True:
                ws.recv(timeout=WAIT)
        out, _ = proc.communicate(timeout=WAIT)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "stopped by SIGTERM" in text and "model freed" in text and "1 session(s) served" in text, text
    assert "lingbot-fast-world on cpu, 160x96" in text, text
    assert len(list((tmp_path / "out").glob("serve_*.mp4"))) == 1     # the recording in progress was finished
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- 5. random weights

def test_random_weights_engine_serves_frames_and_prompts(tmp_path):
    """`serve --random_weights` (benchmarks/serve_gpu.py): a causal student with random weights and no checkpoint
    folder streams frames through the same server; a prompt becomes a random embedding; v1 gets serve's window."""
    engine = Engine.random("lingbot-fast-tiny", size="48*32", device="cpu")
    try:
        assert (engine.name, engine.width, engine.height, engine.window, engine.sink) == \
            ("lingbot-fast-tiny", 48, 32, 18, 6)
        server = Server(engine, ServeConfig(port=0, max_sessions=1, outputs=tmp_path / "out")).start()
        try:
            c = Client(server)
            assert c.hello["model"] == "lingbot-fast-tiny" and c.hello["chunk_frames"] == 12
            c.send({"type": "input", "keys": "w", "seq": 7})
            c.chunk_done(2)
            assert c.frames and {"chunk", "index", "input_seq"} <= set(c.frames[0])
            assert any(f["input_seq"] == 7 for f in c.frames) or c.until(
                lambda m: m["type"] == "status" and m.get("input_seq") == 7)
            c.send({"type": "prompt", "text": "a different world"})
            c.until(lambda m: m["type"] == "notice" and "prompt set" in m["message"])
            c.alive()
            c.close()
        finally:
            server.stop()
    finally:
        engine.close()


def test_random_weights_flag_checks_its_arguments(capsys, tmp_path):
    """Bad arguments fail before anything is made: the flags it cannot take (the command's error line), and a
    variant, size or window that cannot stream (GenerationError, called directly: nothing can start serving)."""
    from worldstream.cli import main
    from worldstream.pipelines.conditioning import GenerationError

    for extra, needle in [(["--ckpt_dir", str(tmp_path)], "takes no --ckpt_dir"),
                          (["--image", "x.png", "--vram", "8GB"], "takes no --image, --vram")]:
        code = main(["serve", "--random_weights", "lingbot-fast-tiny", "--port", "0", "--device", "cpu",
                     "--outputs", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.strip().splitlines()[-1].startswith("worldstream: error: ") and needle in err, err
    for variant, kw, needle in [("wan2.1-t2v-1.3b-tiny", {}, "not a causal"), ("nope", {}, "unknown variant"),
                                ("lingbot-fast-tiny", {"size": "50*32"}, "multiple of 16"),
                                ("lingbot-fast-tiny", {"window": 2}, "--window 2"),
                                ("lingbot-fast-tiny", {"steps": 3}, "--steps 3")]:
        with pytest.raises(GenerationError, match=needle):
            Engine.random(variant, device="cpu", **kw)
