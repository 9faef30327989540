"""The WebSocket protocol between the page and the server, and the checks every message passes.

Page -> server, text (JSON objects, at most `max_text_bytes`):
    {"type": "input", "keys": "wd", "look": [yaw, pitch], "seq": 17}   keys held now (any of wasdijkl); look:
                                            mouse degrees since the last input (right / up positive), added up
                                            until the next chunk starts; seq: the page's counter, echoed back
    {"type": "prompt", "text": "..."}       a new prompt from the next chunk on (the frames seen stay)
    {"type": "pause"} / {"type": "resume"} / {"type": "reset"}
    {"type": "record", "on": true|false}    start / finish an MP4 of the session (written atomically)
    {"type": "ping", "id": 3}               answered with a pong (the page measures round trips)
    {"type": "ack", "frame": 41}            frames up to this number have arrived. The server keeps at most one
                                            chunk of frames unacknowledged in flight; the rest wait in its outbox,
                                            where newer frames push out older ones. So a page that falls behind
                                            (or stops reading) gets the newest frames, never a backlog that
                                            sockets and buffers would otherwise hold for seconds
Page -> server, binary: an image (PNG, JPEG or WebP) to restart the stream from; checked before decoding.

Server -> page, text: {"type": "hello" | "status" | "notice" | "error" | "recorded" | "pong", ...}.
Server -> page, binary: one video frame: a 16-byte little-endian header (chunk u32, index in chunk u16, frames
in chunk u16, input seq u32, frame number u32) and a JPEG.

A message that breaks these rules gets {"type": "error", "code": ..., "message": ...}; the session goes on.
"""
from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass

KEYS = "wasdijkl"
FRAME_HEADER = struct.Struct("<IHHII")
MAX_LOOK_DEG = 90.0          # one input message's mouse motion (the page sends ~30 a second)
MAX_PROMPT_CHARS = 2000
IMAGE_FORMATS = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}   # WEBP: RIFF....WEBP, below


class BadMessage(ValueError):
    """A message the server refuses; `code` goes to the page with the text."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Input:
    keys: frozenset
    look: tuple[float, float]
    seq: int


def error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}


def parse_text(text: str, max_bytes: int):
    """A text message -> ("input", Input) | ("prompt", str) | ("record", bool) | ("ping", id) | ("ack", n)
    | (kind, None)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadMessage("too_large", f"text message of {size} bytes; the limit is {max_bytes}")
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        raise BadMessage("bad_message", "not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise BadMessage("bad_message", 'expected a JSON object with a "type"')
    kind = msg["type"]
    if kind == "input":
        return kind, _input(msg)
    if kind == "prompt":
        text = msg.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadMessage("bad_message", "prompt: text must be a non-empty string")
        if len(text) > MAX_PROMPT_CHARS:
            raise BadMessage("too_large", f"prompt of {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        return kind, text
    if kind == "record":
        if not isinstance(msg.get("on"), bool):
            raise BadMessage("bad_message", "record: on must be true or false")
        return kind, msg["on"]
    if kind == "ping":
        ident = msg.get("id")
        if not (ident is None or (isinstance(ident, int) and not isinstance(ident, bool) and abs(ident) < 2**53)):
            raise BadMessage("bad_message", "ping: id must be an integer")
        return kind, ident
    if kind == "ack":
        frame = msg.get("frame")
        if not isinstance(frame, int) or isinstance(frame, bool) or not 0 <= frame < 2**32:
            raise BadMessage("bad_message", "ack: frame must be an integer in [0, 2^32)")
        return kind, frame
    if kind in ("pause", "resume", "reset"):
        return kind, None
    raise BadMessage("bad_message", f"unknown message type {kind[:40]!r}")


def _input(msg: dict) -> Input:
    keys = msg.get("keys", "")
    if not isinstance(keys, str) or len(keys) > len(KEYS) or any(k not in KEYS for k in keys.lower()):
        raise BadMessage("bad_message", f"input: keys must be a string of {KEYS}")
    look = msg.get("look", [0, 0])
    if (not isinstance(look, list) or len(look) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in look)
            or any(abs(v) > MAX_LOOK_DEG for v in look)):
        raise BadMessage("bad_message", f"input: look must be [yaw, pitch] degrees, each within ±{MAX_LOOK_DEG:g}")
    seq = msg.get("seq", 0)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**32:
        raise BadMessage("bad_message", "input: seq must be an integer in [0, 2^32)")
    return Input(frozenset(keys.lower()), (float(look[0]), float(look[1])), seq)


def check_image(data: bytes, max_bytes: int, max_pixels: int, max_side: int) -> tuple[str, int, int]:
    """(format, width, height) of an uploaded image, from its header only: a whitelisted format (PNG, JPEG,
    WebP, by magic bytes and by the one decoder allowed to read it), within the byte and pixel limits. Nothing
    is decoded here; `decode_image` does that afterwards."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise BadMessage("too_large", f"image of {len(data)} bytes; the limit is {max_bytes}")
    fmt = next((f for f, magic in IMAGE_FORMATS.items() if data.startswith(magic)), None)
    if fmt is None and len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt = "WEBP"
    if fmt is None:
        raise BadMessage("bad_image", "images must be PNG, JPEG or WebP")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:     # reads the header, decodes nothing
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadMessage("bad_image", f"unreadable {fmt} header ({type(e).__name__})") from None
    if w < 1 or h < 1 or w > max_side or h > max_side or w * h > max_pixels:
        raise BadMessage("too_large", f"image of {w}x{h} pixels; the limits are {max_side} per side and "
                                      f"{max_pixels} in all")
    return fmt, w, h


def decode_image(data: bytes, fmt: str):
    """The checked image, decoded: PIL RGB (first frame of an animation)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadMessage("bad_image", f"cannot decode the {fmt} image ({type(e).__name__}: {e})") from None


def frame_message(chunk: int, index: int, count: int, input_seq: int, number: int, jpeg: bytes) -> bytes:
    return FRAME_HEADER.pack(chunk & 0xFFFFFFFF, index, count, input_seq & 0xFFFFFFFF, number & 0xFFFFFFFF) + jpeg


def parse_frame(data: bytes) -> tuple[dict, bytes]:
    """A frame message -> (header dict, JPEG bytes): for clients written in Python (tests, the load test)."""
    chunk, index, count, seq, number = FRAME_HEADER.unpack_from(data)
    return dict(chunk=chunk, index=index, count=count, input_seq=seq, number=number), data[FRAME_HEADER.size:]
