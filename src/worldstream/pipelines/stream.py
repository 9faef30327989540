"""The stream job: a causal student's checkpoint and a request -> an open `RealtimeSession` (shared by
`worldstream stream` and the web server), and the offline run that writes an MP4 as chunks are produced.

    request = prepare_stream(ckpt_dir, prompt, image=..., action_string="w-40,jw-40")   # checks, reads headers
    session = open_session(request, device="cuda", vae="tiny", taehv="taew2_1.pth")      # loads, plans
    session = open_session(request, decoder="tiny")      # the model folder's own decoder.safetensors
    student = load_student(request, sessions=2); a, b = student.session(), student.session()   # shared weights
    for chunk in run_stream(session, request, "out.mp4"): print(chunk.seconds)

Bad input fails in `prepare_stream` with one GenerationError naming the culprit, before anything is loaded.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..checkpoints.dit import Checkpoint, find_checkpoint, index_model_dir, validate
from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER
from ..checkpoints.tensors import CheckpointError
from ..checkpoints.tiny_decoder import DECODER_FILE, load_tiny_decoder, read_decoder_config
from ..checkpoints.vae import VAE_FILE, load_vae
from ..models import camera as cam
from ..runtime.planner import Workload
from ..runtime.runner import build_runner
from .conditioning import GenerationError, i2v_size, image_to_tensor, read_image, resize_image
from .prompts import PromptCache, encode_prompts
from .realtime import Chunk, ImageConditions, RealtimeSession
from .video import Mp4Stream, to_uint8_frames

MAX_STREAM_FRAMES = 100_000       # about 1 h 44 min at 16 fps: an offline request beyond this is refused


@dataclass
class StreamRequest:
    """A validated stream request; `open_session` builds it, `run_stream` runs it."""
    ckpt: Checkpoint
    prompt: str
    image: torch.Tensor                   # [3, H, W] in [-1, 1] at the output size
    height: int
    width: int
    frames: int                           # video frames to produce (whole chunks)
    keys: list[frozenset]                 # one per video frame
    intrinsics: np.ndarray
    camera: torch.Tensor | None = None    # whole-clip conditioning (--action_path: upstream's exact rule)
    seed: int | None = None
    steps: int | None = None
    window: int | None = -1               # -1: the student's own
    sink: int | None = None
    noise: str = "chunk"
    notices: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        rt, lat = self.ckpt.config.realtime, self.ckpt.config.latents
        return math.ceil(lat.latent_frames(self.frames) / rt.chunk)

    def describe(self) -> str:
        rt = self.ckpt.config.realtime
        window = "global" if self.window is None or (self.window == -1 and rt.window is None) else \
            f"window {rt.window if self.window == -1 else self.window}, sink {rt.sink if self.sink is None else self.sink}"
        return (f"{self.ckpt.config.name}: {self.frames} frames {self.width}x{self.height} in {self.chunks} chunks "
                f"of {rt.chunk} latent frames, {self.steps or len(rt.step_indices)} steps + refresh, KV cache {window}")


def check_student(ckpt_dir: str | Path) -> Checkpoint:
    """A causal student's checkpoint: DiT found and validated from headers, VAE and umt5 present."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise GenerationError(f"--ckpt_dir {root}: no such folder")
    try:
        ckpt = find_checkpoint(root, fast=True if any((root / d).is_dir() for d in
                                                      ("lingbot_world_fast", "transformers")) else None)
        for d in ckpt.experts.values():
            validate(ckpt.config, index_model_dir(d), d)
    except CheckpointError as e:
        raise GenerationError(f"checkpoint: {e}") from None
    if ckpt.config.realtime is None:
        raise GenerationError(f"{root}: {ckpt.config.name} is not a causal (real-time) student; `stream` runs "
                              "LingBot-World Fast v1 (lingbot_world_fast/), v2 causal-fast (transformers/) or the "
                              "v2 1.3B. Use `worldstream generate` for it")
    missing = [name for name, ok in [(VAE_FILE, (root / VAE_FILE).is_file()),
                                     (T5_CHECKPOINT, (root / T5_CHECKPOINT).is_file()),
                                     (T5_TOKENIZER + "/", (root / T5_TOKENIZER).is_dir())] if not ok]
    if missing:
        raise GenerationError(f"checkpoint {root} is incomplete: missing {', '.join(missing)} (the v2 1.3B ships "
                              "without them: copy or link them from the 14B checkpoint)")
    return ckpt


def stream_size(cfg, size: str | None) -> tuple[int, int]:
    """`--size` W*H (or WxH) -> (width, height), each side from 16 to 2048. Default: the size a small trained
    student was trained at, else 112*64 for a tiny variant, else 832*480 (the students' size)."""
    default = f"{cfg.trained_size[0]}*{cfg.trained_size[1]}" if cfg.trained_size else \
        ("112*64" if cfg.is_tiny else "832*480")
    text = (size or default).replace("x", "*")
    try:
        w, h = (int(v) for v in text.split("*"))
    except ValueError:
        raise GenerationError(f"--size {size!r}: expected WIDTH*HEIGHT, e.g. 832*480") from None
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise GenerationError(f"--size {size}: each side between 16 and 2048")
    return w, h


def check_steps(cfg, steps: int | None) -> None:
    """A student runs its own number of denoising steps, or 1 (`--steps 1`)."""
    n = len(cfg.realtime.step_indices)
    if steps is not None and steps not in (1, n):
        raise GenerationError(f"--steps {steps}: {cfg.name} runs {n} steps, or 1")


def check_window(rt, window: int | None, sink: int | None) -> None:
    """A KV window (-1: the student's own, None: global) must hold a chunk plus the sink; the sink is >= 0."""
    if window is not None and window != -1:
        chunk = rt.chunk
        s = rt.sink if sink is None else sink
        if window < chunk or (s and window < s + chunk):
            raise GenerationError(f"--window {window}: must hold a chunk ({chunk} latent frames) plus the sink "
                                  f"({s}): at least {s + chunk}")
    if sink is not None and sink < 0:
        raise GenerationError(f"--sink {sink}: must be >= 0")


def prepare_stream(ckpt_dir, prompt: str, *, image, size: str | None = None, frame_num: int | None = None,
                   action_string: str | None = None, action_path: str | Path | None = None,
                   seed: int | None = None, steps: int | None = None, window: int | None = -1,
                   sink: int | None = None, noise: str = "chunk",
                   notice: Callable[[str], None] | None = None) -> StreamRequest:
    """Validate a stream request (headers and small files only). size: W*H pixel budget (default 832*480,
    the students' size; a small trained student its own, e.g. 160*96); the aspect ratio comes from the image, as
    in `generate`."""
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if notice:
            notice(msg)

    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("--prompt is required")
    ckpt = check_student(ckpt_dir)
    cfg, rt = ckpt.config, ckpt.config.realtime
    if image is None:
        raise GenerationError("--image is required: the stream starts from a first frame")
    pil = image if hasattr(image, "convert") else read_image(image)
    w, h = stream_size(cfg, size)
    image_t = image_to_tensor(pil)
    h, w = i2v_size(image_t.shape[1], image_t.shape[2], w * h, cfg)
    image_t = resize_image(image_t, h, w)
    check_steps(cfg, steps)
    if noise not in ("chunk", "upstream"):
        raise GenerationError(f"--noise {noise!r}: chunk or upstream")
    check_window(rt, window, sink)

    keys: list[frozenset] = []
    intrinsics = cam.DEFAULT_INTRINSICS.astype(np.float64)
    camera = None
    lat = cfg.latents
    if action_string is not None:
        try:
            keys = cam.parse_action_string(action_string)
        except ValueError as e:
            raise GenerationError(f"--action_string: {e}") from None
    if action_path is not None:
        try:
            poses, intr, _ = cam.load_action_dir(Path(action_path), mode="cam")
        except (FileNotFoundError, ValueError) as e:
            raise GenerationError(f"--action_path: {e}") from None
        intrinsics = np.asarray(intr, dtype=np.float64)[0]
        if action_string is None:
            frames_avail = cam.usable_frames(len(poses), frame_num or 10**9)
            lat_f = lat.latent_frames(frames_avail) // rt.chunk * rt.chunk
            if lat_f < rt.chunk:
                raise GenerationError(f"--action_path: {len(poses)} poses make less than one chunk")
            # upstream: poses over the usable frames, interpolated onto the (chunk-truncated) latent frames
            c2w = torch.from_numpy(cam.interpolate_poses(poses[:frames_avail], lat_f))
            camera = cam.plucker_frames(cam.relative_framewise(c2w).float(), intrinsics, h, w)
            frame_num = lat.video_frames(lat_f)
    frames = frame_num if frame_num is not None else max(len(keys), lat.video_frames(rt.chunk))
    if frames < 1 or frames > MAX_STREAM_FRAMES:
        raise GenerationError(f"--frame_num {frames}: between 1 and {MAX_STREAM_FRAMES}")
    latent = math.ceil((frames - 1) / lat.stride[0]) + 1                 # latent frames covering `frames`
    whole = lat.video_frames(math.ceil(latent / rt.chunk) * rt.chunk)     # whole chunks: 4kn - 3 frames
    if whole != frames:
        note(f"{frames} frames is not a whole number of chunks; streaming {whole}")
        frames = whole
    keys = keys[:frames] + [frozenset()] * (frames - len(keys[:frames]))
    return StreamRequest(ckpt, prompt, image_t, h, w, frames, keys, intrinsics, camera, seed, steps, window, sink,
                         noise, notes)


@dataclass
class Student:
    """A causal student loaded once (runner, VAE, decoder, the request's prompt embedding), from which sessions
    are opened: `open_session` opens one; the web server opens one per connection on the same weights.

    Sessions opened here share the runner: their forwards must not overlap (the caller serializes them), and
    closing one of them closes the runner for all (drop a session instead, and `close()` the student at the
    end)."""
    request: StreamRequest
    runner: object
    vae: object
    decoder: object
    context: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    conditions: ImageConditions = field(default_factory=ImageConditions)   # shared by its sessions

    @property
    def config(self):
        return self.request.ckpt.config

    def session(self, *, image: torch.Tensor | None = None, context: torch.Tensor | None = None,
                window: int | None = -1, sink: int | None = None, timing: bool = False) -> RealtimeSession:
        """A new stream from the request's first frame and prompt (or `image` [3, H, W] at the request's size,
        `context` from `encode_prompt`). window / sink default to the request's."""
        r = self.request
        return RealtimeSession(self.runner, self.config, self.vae, self.decoder,
                               self.context if context is None else context,
                               r.image if image is None else image, r.height, r.width,
                               intrinsics=r.intrinsics, device=self.device, dtype=self.dtype, seed=r.seed,
                               steps=r.steps, window=r.window if window == -1 else window,
                               sink=r.sink if sink is None else sink, noise=r.noise, total_frames=r.frames,
                               camera=r.camera, timing=timing, conditions=self.conditions)

    def encode_prompt(self, prompt: str, *, prompt_cache: PromptCache | None = None,
                      placement: str | None = None) -> torch.Tensor:
        """A prompt's embedding for `session(context=...)` / `RealtimeSession.set_prompt`, through the
        checkpoint's text encoder (loaded, used, freed; a cached prompt loads nothing). placement: "gpu", "cpu"
        or "stream" (default: "stream" on CUDA, where the student already holds the GPU; "cpu" on the CPU)."""
        cuda = self.device.type == "cuda"
        try:
            return encode_prompts([prompt], self.request.ckpt.root, cache=prompt_cache,
                                  placement=placement or ("stream" if cuda else "cpu"), device=self.device,
                                  dtype=torch.bfloat16 if cuda else self.dtype,
                                  text_len=self.config.text_len)[0]
        except (ValueError, FileNotFoundError) as e:
            raise GenerationError(f"text encoder: {e}") from None

    def close(self) -> None:
        """Free the weights (the runner's experts and engine)."""
        self.runner.close()


def load_student(request: StreamRequest, *, device=None, dtype=None, vram: float | None = None,
                 ram: float | None = None, quant: str | None = None, attention: str = "sdpa", vae: str = "wan",
                 taehv: str | Path | None = None, prompt_cache: PromptCache | None = None,
                 sessions: int = 1, parallel=None, decoder: str = "vae", cuda_graphs: bool = False) -> Student:
    """Load what streams need: prompt embedding (the encoder loaded, used, freed), the student planned under
    the VRAM / RAM budgets with the KV caches of `sessions` concurrent sessions budgeted beside it (weights
    load at the first forward), the Wan VAE (first frame; decoding unless `vae="tiny"`: the TAEHV decoder from
    `taehv`, or `decoder="tiny"`: the model folder's own tiny decoder, `decoder.safetensors`, checked before the
    student is planned).

    `parallel` (runtime/parallel.py, one per process of `torchrun ... stream --ulysses N`): every process loads
    its student; rank 0 alone encodes the prompt (sent to the others) and loads the VAE and the decoder.
    `cuda_graphs`: replay the chunk forwards of resident weights as CUDA graphs (runtime/graphs.py; same
    numbers, fewer host launches)."""
    from ..checkpoints.taehv import load_taehv

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    cfg, rt = request.ckpt.config, request.ckpt.config.realtime
    if vae not in ("wan", "tiny"):
        raise GenerationError(f"--vae {vae!r}: wan or tiny")
    if vae == "tiny" and taehv is None:
        raise GenerationError("--vae tiny needs --taehv FILE (taew2_1.pth or .safetensors from madebyollin/taehv; "
                              "nothing is downloaded)")
    tiny_file = check_decoder_option(request, decoder, vae)
    window = rt.window if request.window == -1 else request.window
    held = window if window is not None else math.ceil(cfg.latents.latent_frames(request.frames) / rt.chunk) * rt.chunk
    workload = Workload(frames=cfg.latents.video_frames(rt.chunk), height=request.height, width=request.width,
                        guidance=False, keys=cfg.tokens(cfg.latents.video_frames(held), request.height, request.width),
                        cache_bytes=max(1, sessions) * cfg.kv_cache_bytes(held, request.height, request.width,
                                                                          torch.finfo(dtype).bits // 8))
    runner = build_runner(request.ckpt, device, dtype, workload, vram=vram, ram=ram, quant=quant,
                          attention=attention, graphs=cuda_graphs,
                          **({} if parallel is None else {"parallel": parallel}))
    once = (lambda fn: fn()) if parallel is None else parallel.from_first    # rank 0 computes, all receive

    def encode():
        try:
            return encode_prompts([request.prompt], request.ckpt.root, cache=prompt_cache,
                                  placement="gpu" if cuda else "cpu", device=device,
                                  dtype=torch.bfloat16 if cuda else dtype, text_len=cfg.text_len)[0]
        except (ValueError, FileNotFoundError) as e:
            raise GenerationError(f"text encoder: {e}") from None
    context = once(encode).to(device)
    wan = frames_decoder = None

    def load_decoders() -> None:
        nonlocal wan, frames_decoder
        try:
            wan = load_vae(request.ckpt.root / VAE_FILE, device=device)
            if tiny_file is not None:
                frames_decoder = load_tiny_decoder(tiny_file, device=device, latent_channels=cfg.latents.channels,
                                                   dtype=torch.float16 if cuda else torch.float32)
            elif vae == "wan":
                frames_decoder = wan
            else:
                frames_decoder = load_taehv(taehv, device=device, dtype=torch.float16 if cuda else torch.float32)
        except (ValueError, OSError) as e:
            raise GenerationError(f"VAE: {e}") from None
    once(load_decoders)
    return Student(request, runner, wan, frames_decoder, context, device, dtype)


def check_decoder_option(request: StreamRequest, decoder: str, vae: str = "wan") -> Path | None:
    """The `--decoder` choice checked before anything is loaded: "vae" (the default: the Wan VAE, exact, or
    TAEHV with `--vae tiny`) -> None; "tiny" -> the model folder's `decoder.safetensors`, its header validated
    (format, keys, shapes, latent channels). GenerationError naming the file otherwise."""
    if decoder not in ("vae", "tiny"):
        raise GenerationError(f"--decoder {decoder!r}: vae or tiny")
    if decoder == "vae":
        return None
    if vae != "wan":
        raise GenerationError("--decoder tiny and --vae tiny are two different decoders: choose one")
    path = request.ckpt.root / DECODER_FILE
    if not path.is_file():
        raise GenerationError(f"--decoder tiny: no {DECODER_FILE} in {request.ckpt.root} (train one with "
                              "`worldstream train decoder`, then copy it there)")
    try:
        cfg = read_decoder_config(path)
    except (ValueError, OSError) as e:
        raise GenerationError(f"--decoder tiny: {e}") from None
    channels = request.ckpt.config.latents.channels
    if cfg.latent_channels != channels:
        raise GenerationError(f"--decoder tiny: {path} decodes {cfg.latent_channels}-channel latents, "
                              f"{request.ckpt.config.name} makes {channels}")
    return path


def open_session(request: StreamRequest, *, device=None, dtype=None, vram: float | None = None,
                 ram: float | None = None, quant: str | None = None, attention: str = "sdpa", vae: str = "wan",
                 taehv: str | Path | None = None, prompt_cache: PromptCache | None = None,
                 timing: bool = False, parallel=None, decoder: str = "vae", cuda_graphs: bool = False
                 ) -> RealtimeSession:
    """Load what the stream needs (`load_student`) and open its session; `session.close()` frees it all."""
    return load_student(request, device=device, dtype=dtype, vram=vram, ram=ram, quant=quant, attention=attention,
                        vae=vae, taehv=taehv, prompt_cache=prompt_cache, parallel=parallel,
                        decoder=decoder, cuda_graphs=cuda_graphs).session(timing=timing)


def run_stream(session: RealtimeSession, request: StreamRequest, save_file: str | Path | None = None
               ) -> Iterator[Chunk]:
    """Every chunk of the request, in order, each written to the MP4 as it comes (the file appears complete at
    the end, or not at all). Yields the chunks (their `seconds`, and `wall` since the step began)."""
    frames_done = 0
    with (Mp4Stream(save_file) if save_file is not None else _NoFile()) as out:
        for _ in range(request.chunks):
            t0 = time.perf_counter()
            n = session.video_frames_per_chunk - (3 if frames_done == 0 else 0)
            chunk = session.step(keys=request.keys[frames_done:frames_done + n])
            video = to_uint8_frames(chunk.frames)
            chunk.seconds["wall"] = time.perf_counter() - t0
            out.write(video)
            frames_done += video.shape[0]
            yield chunk


class _NoFile:
    def __enter__(self):
        return self

    def write(self, frames) -> None:
        pass

    def __exit__(self, *exc) -> bool:
        return False


def format_chunk(chunk: Chunk, frames: int) -> str:
    s = chunk.seconds
    wall = s.get("wall", sum(s.values()))
    return (f"chunk {chunk.index}: {frames} frames in {wall:.3f} s ({frames / wall:.1f} FPS); "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in s.items() if k != "wall"))


