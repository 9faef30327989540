"""One WebSocket connection on the event loop: messages in, frames and status out.

The loop never computes: input messages become `Controls` state, the generator and encoder threads
(serve/worker.py) do the work, and their results come back through `call_soon_threadsafe` into three small
outboxes, sent by one task in this order: replies (errors, notices, pongs; at most 64 waiting), the latest
status (a newer one replaces it; one that came before a reply goes out before it), then frames. Frames are sent while fewer than one chunk of them is unacknowledged by the page (its
"ack" messages); the outbox holds one chunk's frames, so when the page reads slower than the generator makes
frames, the oldest unsent ones fall out (counted in the status as dropped) and what the page gets is always
the newest. Without the acks, the kernel's socket buffers alone would hold seconds of frames for a page that
stopped reading.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from .protocol import BadMessage, check_image, error, parse_frame, parse_text
from .worker import Controls, Worker

log = logging.getLogger(__name__)

INTERNAL_ERROR = 1011


class Connection:
    def __init__(self, ws: WebSocket, engine, config, name: str):
        self.ws, self.engine, self.config, self.name = ws, engine, config, name
        self.loop = asyncio.get_running_loop()
        self.controls = Controls()
        self.worker = Worker(engine, self.controls, self, name=name, outputs=config.outputs,
                             jpeg_quality=config.jpeg_quality)
        cfg = engine.student.config
        per_chunk = cfg.latents.stride[0] * cfg.realtime.chunk        # video frames of a chunk (after the first)
        self._replies: collections.deque = collections.deque(maxlen=64)
        self._status: dict | None = None
        self._last_status: dict | None = None
        self._frames: collections.deque = collections.deque(maxlen=max(1, per_chunk))
        self._in_flight = max(1, per_chunk)        # frames sent and not yet acknowledged, at most
        self._acked = -1                           # the highest frame number acknowledged
        self._last_sent = -1                       # the number of the last frame sent
        self._chunk_starts: collections.deque = collections.deque(maxlen=5)   # (time, frames sent before it)
        self._wake = asyncio.Event()
        self._fatal: str | None = None
        self._threads_left = len(self.worker.threads)
        self.frames_sent = 0
        self.dropped = 0
        self.finished: asyncio.Future = self.loop.create_future()      # both threads have ended

    # ---- the threads' side (any thread) ----------------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:            # the loop is gone (server stopped): nobody to tell
            pass

    def json(self, msg: dict) -> None:
        self._call(self._put_reply, msg)

    def status(self, msg: dict) -> None:
        self._call(self._put_status, msg)

    def frame(self, data: bytes) -> None:
        self._call(self._put_frame, data)

    def fatal(self, text: str) -> None:
        self._call(self._put_fatal, text)

    def thread_done(self) -> None:
        self._call(self._thread_done)

    # ---- the loop's side -------------------------------------------------------------------------------------
    def _put_reply(self, msg: dict) -> None:
        if self._status is not None:          # keep the order things happened in: that status came first
            self._replies.append(self._stamped(self._status))
            self._status = None
        self._replies.append(msg)
        self._wake.set()

    def _stamped(self, status: dict) -> dict:
        msg = dict(status)
        msg.update(delivered_fps=self.delivered_fps(), frames_sent=self.frames_sent,
                   dropped=self.dropped + msg.pop("encoder_dropped", 0))
        return msg

    def _put_status(self, msg: dict) -> None:
        self._status = self._last_status = msg
        self._wake.set()

    def _put_frame(self, data: bytes) -> None:
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(data)
        self._wake.set()

    def _put_fatal(self, text: str) -> None:
        self._fatal = text
        self._wake.set()

    def _thread_done(self) -> None:
        self._threads_left -= 1
        if self._threads_left == 0 and not self.finished.done():
            self.finished.set_result(None)

    def summary(self) -> dict:
        """For /health: where this session is and what it sent (the last status it made)."""
        st = self._last_status or {}
        return {"session": self.name, "chunk": st.get("chunk", 0), "pose": st.get("pose"),
                "frames_sent": self.frames_sent, "dropped": self.dropped + st.get("encoder_dropped", 0)}

    def delivered_fps(self) -> float | None:
        """Frames sent per second over the last few chunks (from the first frame of the oldest to the first of
        the newest: frames come in bursts, one per chunk)."""
        if len(self._chunk_starts) < 2:
            return None
        (t0, n0), (t1, n1) = self._chunk_starts[0], self._chunk_starts[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    async def run(self) -> None:
        """Accept, greet, generate until the page leaves; returns once both threads have ended. The session
        slot is freed only when `finished` resolves, also when the page left before the threads started."""
        try:
            await self.ws.accept()
            await self._hello()
        except Exception:                  # gone during the handshake: no thread was started
            self.finished.set_result(None)
            return
        self.worker.start()
        tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._send())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.worker.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # The chunk in progress finishes, then both threads end and the session is dropped; the session
            # slot is freed only then (the done-callback in server.py), so a new session never overlaps it.
            await asyncio.shield(self.finished)

    async def _hello(self) -> None:
        e = self.engine
        await self.ws.send_json({
            "type": "hello", "session": self.name, "model": e.name, "device": str(e.device), "width": e.width,
            "height": e.height, "fps": 16, "chunk_frames": self._frames.maxlen, "window": e.window,
            "steps": e.student.request.steps or len(e.student.config.realtime.step_indices),
            "limits": {"text_bytes": self.config.max_text_bytes, "image_bytes": self.config.max_image_bytes,
                       "image_pixels": self.config.max_image_pixels, "message_bytes": self.config.max_message_bytes},
            "outputs": str(self.config.outputs.resolve())})

    async def _receive(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                if message.get("text") is not None:
                    self._on_text(message["text"])
                elif message.get("bytes") is not None:
                    self._on_image(message["bytes"])
            except BadMessage as e:
                self._put_reply(error(e.code, str(e)))

    def _on_text(self, text: str) -> None:
        kind, value = parse_text(text, self.config.max_text_bytes)
        if kind == "input":
            self.controls.set_input(value)
        elif kind == "ack":
            self._acked = max(self._acked, min(value, self._last_sent))
            self._wake.set()
        elif kind == "ping":
            self._put_reply({"type": "pong", "id": value})
        elif kind in ("prompt", "record"):
            self.controls.command(kind, value)
        else:
            self.controls.command(kind)

    def _on_image(self, data: bytes) -> None:
        c = self.config
        fmt, w, h = check_image(data, c.max_image_bytes, c.max_image_pixels, c.max_image_side)
        self.controls.command("image", (fmt, bytes(data)))
        self._put_reply({"type": "notice", "message": f"image accepted ({fmt} {w}x{h}); the stream restarts "
                                                      "from it after the chunk in progress"})

    async def _send(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while True:
                    if self._replies:
                        await self.ws.send_text(json.dumps(self._replies.popleft()))
                    elif self._fatal is not None:
                        await self.ws.send_text(json.dumps(error("internal", self._fatal)))
                        await self.ws.close(code=INTERNAL_ERROR)
                        return
                    elif self._status is not None:
                        msg, self._status = self._stamped(self._status), None
                        await self.ws.send_text(json.dumps(msg))
                    elif self._frames and self._last_sent - self._acked < self._in_flight:
                        data = self._frames.popleft()
                        header = parse_frame(data)[0]
                        if header["index"] == 0:
                            self._chunk_starts.append((time.perf_counter(), self.frames_sent))
                        await self.ws.send_bytes(data)
                        self._last_sent = header["number"]
                        self.frames_sent += 1
                    else:
                        break
        except (WebSocketDisconnect, RuntimeError, OSError) as e:     # the page went away mid-send
            log.debug("%s: send ended: %s", self.name, e)
