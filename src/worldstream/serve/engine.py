"""The model a server streams from, loaded once and shared by its sessions.

`Engine.load` validates and loads a causal student (`pipelines.stream.load_student`), or puts the built-in
student of the tiny world (`lingbot-fast-world`, assets/tiny_world_fast with the tiny world's VAE and umt5) in a
temp folder it owns. Sessions are opened per connection on the same weights;
every piece of model work (a chunk, a session's first-frame encode, a prompt encode) holds `engine.compute`,
so forwards never overlap on the shared runner; sessions beyond the first take turns.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import torch

from ..pipelines.conditioning import image_to_tensor, resize_image
from ..pipelines.prompts import PromptCache
from ..pipelines.realtime import RealtimeSession
from ..pipelines.stream import Student, load_student, prepare_stream
from ..runtime.memory import rss_bytes, trim_host_memory

SERVE_WINDOW, SERVE_SINK = 18, 6     # for a student trained with a global cache (v1): a live stream needs a window


class Engine:
    def __init__(self, student: Student, *, prompt_cache: PromptCache | None = None, tiny_dir: str | None = None,
                 window: int | None = None, sink: int | None = None):
        self.student = student
        self.prompt_cache = prompt_cache
        self.compute = threading.Lock()
        self._tiny_dir = tiny_dir
        rt = student.config.realtime
        req_window = rt.window if student.request.window == -1 else student.request.window
        self.window = window if window is not None else (req_window if req_window is not None else SERVE_WINDOW)
        default_sink = student.request.sink if student.request.sink is not None else rt.sink
        self.sink = sink if sink is not None else (default_sink if req_window is not None else SERVE_SINK)
        self.closed = False

    @classmethod
    def load(cls, ckpt_dir=None, *, prompt: str | None = None, image=None, size: str | None = None,
             device=None, dtype=None, vram=None, ram=None, quant=None, attention="sdpa", vae="wan", taehv=None,
             decoder="vae", steps=None, window=None, sink=None, seed=None, prompt_cache: PromptCache | None = None,
             sessions: int = 1, notice=None, cuda_graphs: bool = False) -> "Engine":
        """Validate and load. No `ckpt_dir`: the built-in tiny world student, put together in a temp folder
        removed by `close()`, starting from the world demo's first frame and prompt. Raises GenerationError /
        CheckpointError / PlanError on bad input."""
        tiny_dir = None
        if ckpt_dir is None:
            from ..testing.world import DEMO_PROMPT, demo_first_frame, student_checkpoint

            tiny_dir = tempfile.mkdtemp(prefix="worldstream-serve-")
            ckpt_dir = student_checkpoint(Path(tiny_dir))
            image = image if image is not None else demo_first_frame()
            prompt = prompt or DEMO_PROMPT
        try:
            request = prepare_stream(ckpt_dir, prompt or "", image=image, size=size, seed=seed, steps=steps,
                                     window=-1 if window is None else window, sink=sink, notice=notice)
            student = load_student(request, device=device, dtype=dtype, vram=vram, ram=ram, quant=quant,
                                   attention=attention, vae=vae, taehv=taehv, prompt_cache=prompt_cache,
                                   sessions=sessions, decoder=decoder, cuda_graphs=cuda_graphs)
        except BaseException:
            if tiny_dir:
                shutil.rmtree(tiny_dir, ignore_errors=True)
            raise
        return cls(student, prompt_cache=prompt_cache, tiny_dir=tiny_dir, window=window, sink=sink)

    @classmethod
    def random(cls, variant: str, *, size: str | None = None, device=None, dtype=None, quant=None,
               attention="sdpa", vae="wan", steps=None, window=None, sink=None, seed=None,
               cuda_graphs: bool = False) -> "Engine":
        """A causal student with random full-size weights and no checkpoint folder (`worldstream serve
        --random_weights VARIANT`, for benchmarks/serve_gpu.py): everything resident on the device (no VRAM /
        RAM plan), a random first frame, prompts turned into random embeddings (testing/random_models.py).
        Raises GenerationError on bad arguments."""
        from ..testing.random_models import random_student

        student = random_student(variant, device=device, dtype=dtype, size=size, quant=quant, attention=attention,
                                 vae=vae, steps=steps, window=-1 if window is None else window, sink=sink,
                                 seed=seed, cuda_graphs=cuda_graphs)
        return cls(student, window=window, sink=sink)

    # ---- facts -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.student.device

    @property
    def width(self) -> int:
        return self.student.request.width

    @property
    def height(self) -> int:
        return self.student.request.height

    @property
    def name(self) -> str:
        return self.student.config.name

    def default_sessions(self) -> int:
        """1 on a GPU (the plan holds one KV cache beside the weights), 2 on the CPU (they take turns)."""
        return 1 if self.device.type == "cuda" else 2

    def memory(self) -> dict:
        out = {"rss": rss_bytes(), "vram": None, "vram_reserved": None, "vram_total": None}
        if self.device.type == "cuda":
            out.update(vram=torch.cuda.memory_allocated(self.device),
                       vram_reserved=torch.cuda.memory_reserved(self.device),
                       vram_total=torch.cuda.get_device_properties(self.device).total_memory)
        return out

    # ---- work (each call holds `compute`) ------------------------------------------------------------------
    def open_session(self, image: torch.Tensor | None = None) -> RealtimeSession:
        with self.compute:
            return self.student.session(image=image, window=self.window, sink=self.sink)

    def encode_prompt(self, text: str) -> torch.Tensor:
        with self.compute:
            return self.student.encode_prompt(text, prompt_cache=self.prompt_cache)

    def image_tensor(self, pil) -> torch.Tensor:
        """An uploaded image at the stream's size: centre-cropped to its aspect ratio, then resized as the
        first frame of a run is (bicubic)."""
        h, w = self.height, self.width
        iw, ih = pil.size
        if iw * h > ih * w:              # wider than the stream: crop the sides
            cw = max(1, round(ih * w / h))
            box = ((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih)
        else:
            ch = max(1, round(iw * h / w))
            box = (0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch)
        crop = pil.crop(box)
        factor = min(crop.size[0] // (4 * w), crop.size[1] // (4 * h))
        if factor >= 2:                  # a large photo: box-filter it down to ~4x first (bounded memory)
            crop = crop.reduce(factor)
        return resize_image(image_to_tensor(crop), h, w).clamp_(-1, 1)

    def finish_work(self) -> None:
        """Wait until the device has run the work queued so far (a no-op on the CPU, where ops run as called)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def release_memory(self) -> None:
        """After a session is dropped: hand its cached GPU blocks back, and the freed host heap to the OS."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_host_memory()

    def close(self) -> None:
        """Free the weights and the GPU; remove the tiny model's temp folder. Idempotent."""
        if self.closed:
            return
        self.closed = True
        with self.compute:
            self.student.close()
            self.student.vae = self.student.decoder = self.student.context = None
        self.release_memory()
        if self._tiny_dir:
            shutil.rmtree(self._tiny_dir, ignore_errors=True)
