"""One connection's generation, off the event loop: two threads and the small state between them.

    page --input/commands--> Controls --(latest state, taken when a chunk starts)--> generator thread
    generator thread: session.step (holding engine.compute) -> uint8 frames -> [MP4 if recording] -> Mailbox
    Mailbox (one chunk at most: a newer chunk replaces an unencoded one) -> encoder thread: JPEG per frame
    encoder thread -> Outlet (the connection, on the event loop) -> the WebSocket

Nothing here grows with the client's speed or the number of messages: keys are a set replaced by each input
message (keys pressed and released between two chunks still count once, so a short tap is never lost), mouse
motion is one (yaw, pitch) sum, commands keep the latest of each kind, the mailbox holds one chunk, and the
connection keeps only the newest unsent frames. Stopping (the page left, the server shuts down) lets the chunk
in progress finish, then both threads end and the session's memory is dropped.
"""
from __future__ import annotations

import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pipelines.conditioning import GenerationError
from ..pipelines.video import Mp4Stream, to_uint8_frames
from .protocol import BadMessage, Input, decode_image, error, frame_message

log = logging.getLogger(__name__)

LOOK_PER_CHUNK_DEG = 180.0          # mouse motion applied to one chunk at most (the rest is dropped)


class Controls:
    """The page's latest input and pending commands, shared by the event loop (writer) and the generator
    thread (reader)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._held: frozenset = frozenset()
        self._tapped: set = set()
        self._look = [0.0, 0.0]
        self._seq = 0
        self._commands: dict = {}
        self.paused = False
        self.stopped = False

    def set_input(self, inp: Input) -> None:
        with self._cv:
            self._held = inp.keys
            self._tapped |= inp.keys
            self._look = [max(-LOOK_PER_CHUNK_DEG, min(LOOK_PER_CHUNK_DEG, a + b))
                          for a, b in zip(self._look, inp.look)]
            self._seq = inp.seq

    def take_input(self) -> Input:
        """For the chunk about to start: keys held now or pressed since the last chunk; the mouse motion since."""
        with self._cv:
            out = Input(frozenset(self._held | self._tapped), (self._look[0], self._look[1]), self._seq)
            self._tapped, self._look = set(), [0.0, 0.0]
            return out

    def command(self, kind: str, payload=None) -> None:
        """pause / resume act at once; others (reset, prompt, image, record) wait for the chunk in progress;
        a newer one of a kind replaces an older one."""
        with self._cv:
            if kind in ("pause", "resume"):
                self.paused = kind == "pause"          # at once; the command only makes the thread report it
            if kind == "image":
                self._commands.pop("reset", None)      # the image restarts the stream anyway
            self._commands[kind] = payload
            self._cv.notify_all()

    def wait_for_work(self) -> dict | None:
        """The pending commands (maybe none) when there is something to do; None once stopped."""
        with self._cv:
            while not self.stopped and self.paused and not self._commands:
                self._cv.wait()
            if self.stopped:
                return None
            out, self._commands = self._commands, {}
            return out

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()


@dataclass
class Batch:
    chunk: int
    input_seq: int
    frames: np.ndarray              # uint8 [F, H, W, 3]
    first_number: int


class Mailbox:
    """At most one chunk waiting for the encoder; a newer one replaces it (its frames counted as dropped)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._batch: Batch | None = None
        self._closed = False
        self.dropped = 0

    def put(self, batch: Batch) -> None:
        with self._cv:
            if self._batch is not None:
                self.dropped += len(self._batch.frames)
            self._batch = batch
            self._cv.notify_all()

    def take(self) -> Batch | None:
        with self._cv:
            while self._batch is None and not self._closed:
                self._cv.wait()
            batch, self._batch = self._batch, None
            return batch

    def newer_waiting(self) -> bool:
        return self._batch is not None

    def drop(self, frames: int) -> None:
        with self._cv:
            self.dropped += frames

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class Recorder:
    """The session's frames to an MP4 under `outputs`, appearing atomically when recording stops."""

    def __init__(self, outputs: Path, name: str):
        self.path = (outputs / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.mp4").resolve()
        self._mp4 = Mp4Stream(self.path)
        self._mp4.__enter__()

    def write(self, frames: np.ndarray) -> None:
        self._mp4.write(frames)

    def finish(self) -> tuple[Path | None, int]:
        """(path, frames) of the finished file; (None, 0) when nothing was recorded (no file is left)."""
        frames = self._mp4.frames
        if frames == 0:
            err = ValueError("no frames were recorded")
            self._mp4.__exit__(ValueError, err, None)
            return None, 0
        self._mp4.__exit__(None, None, None)
        return self.path, frames


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def pose_of(session) -> dict:
    """Where the session's camera is: position, yaw (degrees, right positive) and pitch (degrees, up)."""
    pose = session.camera.pose
    yaw = math.degrees(math.atan2(pose[0, 2], pose[2, 2]))
    return {"x": float(pose[0, 3]), "y": float(pose[1, 3]), "z": float(pose[2, 3]), "yaw": yaw,
            "pitch": math.degrees(session.camera.pitch)}


class Worker:
    """The two threads of one connection. `outlet` is the connection's thread-safe side: `json(msg)`,
    `status(msg)`, `frame(bytes)`, `fatal(msg)`, `thread_done()`."""

    def __init__(self, engine, controls: Controls, outlet, *, name: str, outputs: Path, jpeg_quality: int):
        self.engine, self.controls, self.outlet = engine, controls, outlet
        self.name, self.outputs, self.jpeg_quality = name, outputs, jpeg_quality
        self.mailbox = Mailbox()
        self.threads = [threading.Thread(target=self._generate, name=f"{name}-generate", daemon=True),
                        threading.Thread(target=self._encode, name=f"{name}-encode", daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.controls.stop()

    # ---- the generator thread -----------------------------------------------------------------------------
    def _generate(self) -> None:
        session = recorder = None
        frames_out = 0
        try:
            session = self.engine.open_session()
            while True:
                commands = self.controls.wait_for_work()
                if commands is None:
                    break
                recorder = self._apply(session, commands, recorder)
                if self.controls.paused:
                    self._status(session, None, recorder)
                    continue
                inp = self.controls.take_input()
                t0 = time.perf_counter()
                with self.engine.compute:     # the frames go out before the chunk's refresh forward runs
                    chunk = session.step(keys=inp.keys, look=inp.look, defer_refresh=True)
                    frames = to_uint8_frames(chunk.frames).numpy()
                    del chunk
                latency = time.perf_counter() - t0
                self.mailbox.put(Batch(session.chunk_index - 1, inp.seq, frames, frames_out))
                with self.engine.compute:     # then the refresh, and only then are the next keys read
                    session.refresh()
                if recorder is not None:      # (host work while the GPU runs the refresh)
                    recorder.write(frames)
                frames_out += len(frames)
                # On a GPU the refresh is only queued: without this wait the next keys were read a refresh
                # early, before the page had this chunk's first frame (BENCHMARKS.md, "The live server").
                self.engine.finish_work()
                wall = time.perf_counter() - t0
                self._status(session, dict(latency_ms=latency * 1e3, gen_fps=len(frames) / wall,
                                           frames=len(frames), input_seq=inp.seq, keys="".join(sorted(inp.keys))),
                             recorder)
        except Exception as e:          # a bug or a device error: tell the page, end this session only
            log.exception("session %s failed", self.name)
            self.outlet.fatal(f"generation failed: {type(e).__name__}: {e}")
        finally:
            if recorder is not None:
                self._finish(recorder)
            self.mailbox.close()
            session = None
            self.engine.release_memory()
            self.outlet.thread_done()

    def _apply(self, session, commands: dict, recorder):
        if "image" in commands:
            fmt, data = commands["image"]
            try:
                image = self.engine.image_tensor(decode_image(data, fmt))
                with self.engine.compute:
                    session.reset(image=image)
                self.outlet.json({"type": "notice", "message": "new first frame: the stream restarts from it"})
            except BadMessage as e:
                self.outlet.json(error(e.code, str(e)))
        if "reset" in commands:
            with self.engine.compute:
                session.reset()
            self.outlet.json({"type": "notice", "message": "reset: back to the first frame"})
        if "prompt" in commands:
            try:
                session.set_prompt(self.engine.encode_prompt(commands["prompt"]))
                self.outlet.json({"type": "notice", "message": "prompt set: it applies from the next chunk"})
            except GenerationError as e:
                self.outlet.json(error("prompt_failed", str(e)))
        if "record" in commands:
            if commands["record"] and recorder is None:
                recorder = Recorder(self.outputs, f"serve_{self.name}")
                self.outlet.json({"type": "notice", "message": f"recording to {recorder.path}"})
            elif not commands["record"] and recorder is not None:
                self._finish(recorder)
                recorder = None
        return recorder

    def _finish(self, recorder: Recorder) -> None:
        try:
            path, frames = recorder.finish()
        except Exception as e:
            log.exception("recording failed")
            self.outlet.json(error("record_failed", f"the MP4 could not be written: {e}"))
            return
        if path is None:
            self.outlet.json({"type": "notice", "message": "nothing was recorded (no frames while recording)"})
        else:
            self.outlet.json({"type": "recorded", "path": str(path), "frames": frames})

    def _status(self, session, chunk: dict | None, recorder) -> None:
        msg = {"type": "status", "chunk": session.chunk_index, "paused": self.controls.paused,
               "recording": recorder is not None, "pose": pose_of(session),
               "window": {"held": session.cache.held, "size": session.window},
               "encoder_dropped": self.mailbox.dropped, **self.engine.memory()}
        if chunk:
            msg.update(chunk)
        self.outlet.status(msg)

    # ---- the encoder thread -------------------------------------------------------------------------------
    def _encode(self) -> None:
        try:
            while (batch := self.mailbox.take()) is not None:
                n = len(batch.frames)
                for i, frame in enumerate(batch.frames):
                    if self.controls.stopped:
                        return
                    if self.mailbox.newer_waiting():          # the page wants the newest frames: skip the rest
                        self.mailbox.drop(n - i)
                        break
                    jpeg = encode_jpeg(frame, self.jpeg_quality)
                    self.outlet.frame(frame_message(batch.chunk, i, n, batch.input_seq, batch.first_number + i,
                                                    jpeg))
        except Exception as e:
            log.exception("encoder of %s failed", self.name)
            self.outlet.fatal(f"frame encoding failed: {type(e).__name__}: {e}")
        finally:
            self.outlet.thread_done()

