"""The real-time chunk loop of a causal student (LingBot-World Fast v1, v2 causal-fast 14B / 1.3B): one copy,
shared by `worldstream stream`, the web server and the trainer.

A `RealtimeSession` takes the first frame, the prompt and the camera intrinsics once; then every `step(keys)`
turns the keys held during the next chunk into that chunk's video frames:

    camera  <- poses advanced frame by frame by the keys / mouse (W/A/S/D move, I/K/J/L or mouse look); per
               latent frame the motion since the previous one, as Plücker rays (models/camera.py)
    y       <- mask + VAE latents of [image, black frames...] for the chunk's latent frames
    x       <- noise for the chunk                                     (spec: no CFG, one forward per step)
    for each timestep t_k of the schedule (pipelines/schedulers.py CausalSchedule):
        v  = DiT(x, t_k, y, camera; KV cache of earlier frames)       # the chunk's K/V written, then attended
        x0 = x - sigma_k * v                                           # float64, as upstream
        if not the last step: x = (1 - sigma') x0 + sigma' * fresh noise   # re-noise to t_{k+1}
    frames <- decode x0, carrying the decoder's causal state from chunk to chunk
    DiT(x0, t = 0)                                                     # refresh: the clean chunk's K/V go in the
                                                                       # cache; its output is not used

The refresh is only needed by the next chunk, so a live caller may hand the frames out first:
`step(..., defer_refresh=True)` returns once the frames are decoded and leaves the refresh pending; `refresh()`
runs it (the next `step` does, if the caller did not). The same forwards run in the same order, so the numbers
are the same; what changes is when the frames exist: after 4 of the chunk's 5 forwards. The server calls
`refresh()` after sending the frames and only then reads the keys for the next chunk.

Everything that changes from chunk to chunk is this session's data (the KV cache, the prompt's cross K/V,
the decoder and encoder states, the pose, the noise generator), never a module's.

Several GPUs (the runner's `parallel`, runtime/parallel.py): every process runs the session; each holds the KV
cache of its share of the heads; rank 0 alone holds the VAE and the decoder: it computes the chunk's first-frame
latents and sends them to the others, and it alone decodes (the others' chunks carry no frames).

Upstream's semantics are the default; differences are named options:
  * noise: upstream draws the whole clip's initial noise first, then 3 re-noise draws per chunk, from one
    generator. A live session does not know the clip's length: by default ("chunk") each chunk draws its
    initial noise, then its re-noise draws. Given `total_frames`, "upstream" order is reproduced. Noise is drawn
    on the CPU (as `generate`), so a seed gives the same stream on every device, not upstream's CUDA draws.
  * camera: upstream divides translations by the largest step of the whole clip (not causal). Live, each
    latent frame's translation is divided by the largest one seen so far in the session (at least one
    straight-ahead step); for constant-speed keys that is upstream's result. Offline, a whole clip's
    conditioning can be given up front (`camera=`), computed exactly as upstream does.
  * the cache: upstream's clone-shift buffer is a ring here (models/kv_cache.py): the same frames, no copies;
    RoPE angles exist for any position (upstream stops at latent frame 1024).
  * y: upstream VAE-encodes [image, zeros] for the whole clip. Here the black frames are encoded chunk by
    chunk through the encoder's causal stream (identical numbers) until the encoder's causal state stops
    changing, after which the last latents are reused (bit-identical from then on: the same state and the same
    input give the same output; ~30 latent frames at 160x96). Sessions given the same `ImageConditions` share
    the latents of a first frame they start from (the server's sessions, resets).
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import camera as cam
from ..models.configs import CausalSampling, DiTConfig
from ..models.kv_cache import CrossKV, KVCache
from ..runtime.runner import Forward, Schedule
from .conditioning import first_frame_mask
from .schedulers import CausalSchedule

EXPERT = "fast"            # the runner's name for the one causal expert
Y_STEADY_CAP = 64          # latent frames of black-frame latents encoded at most before the last is reused


# ---------------------------------------------------------------------------------------------- camera

class LiveCamera:
    """Camera poses advanced one video frame at a time by keys and mouse, and the conditioning of each latent
    frame from them (the motion since the previous latent frame, normalized as the module docstring says)."""

    def __init__(self, intrinsics, height: int, width: int):
        self.intrinsics = np.asarray(intrinsics, dtype=np.float64).reshape(-1, 4)[0]
        self.height, self.width = height, width
        self.pose, self.pitch = np.eye(4), 0.0
        self.latent_poses: list[np.ndarray] = [self.pose.copy()]    # pose at each latent frame so far
        self.max_step = cam.MOVE_SPEED * cam.TEMPORAL_STRIDE        # one latent frame straight ahead

    def advance(self, keys, look=(0.0, 0.0)) -> None:
        """One video frame with `keys` held and `look` (yaw, pitch degrees) of mouse motion."""
        self.pose, self.pitch = cam.step_pose(self.pose, self.pitch, keys, look)

    def mark_latent_frame(self) -> None:
        self.latent_poses.append(self.pose.copy())

    def condition(self, latent_frames: list[int]) -> torch.Tensor:
        """[C·64, n, H/8, W/8] for the given latent frames (each needs its pose and the one before)."""
        rel = []
        for i in latent_frames:
            if i == 0:
                rel.append(torch.eye(4, dtype=torch.float64))
                continue
            prev, cur = (torch.from_numpy(self.latent_poses[j]) for j in (i - 1, i))
            d = cam.se3_inverse(prev) @ cur
            self.max_step = max(self.max_step, float(d[:3, 3].norm()))
            d[:3, 3] /= self.max_step
            rel.append(d)
        return cam.plucker_frames(torch.stack(rel), self.intrinsics, self.height, self.width)


# ---------------------------------------------------------------------------------------------- image

class ImageCondition:
    """y = cat(mask, VAE latents of [image, black, black, ...]) per latent frame, made as the stream needs it."""

    def __init__(self, vae, image: torch.Tensor):
        """`image` [3, H, W] in [-1, 1] at the output size."""
        self.vae = vae
        self.state = {}
        first, self.state = vae.encode_chunk(image[None, :, None], self.state)
        self.latents = [first[0, :, 0]]                      # [z, h, w] per latent frame
        self.black = torch.zeros(1, 3, vae.cfg.latent_space.stride[0], *image.shape[1:])
        self.steady = False

    def latent(self, i: int) -> torch.Tensor:
        while len(self.latents) <= i and not self.steady:
            before = dict(self.state)             # (the encoder replaces its state's tensors, never edits them)
            z, self.state = self.vae.encode_chunk(self.black, self.state)
            self.latents.append(z[0, :, 0])
            # the encoder's causal state came out as it went in: every later black frame meets the same state,
            # so its latents are these, exactly
            self.steady = _same_tensors(before, self.state) or len(self.latents) >= Y_STEADY_CAP
        return self.latents[min(i, len(self.latents) - 1)]

    def chunk(self, start: int, n: int) -> torch.Tensor:
        """[20, n, h, w]: mask (ones on latent frame 0) and latents for latent frames start..start+n-1."""
        z = torch.stack([self.latent(i) for i in range(start, start + n)], dim=1)
        mask = first_frame_mask(start + n, z.shape[2], z.shape[3])[:, start:]
        return torch.cat([mask, z.cpu()], dim=0)


def _same_tensors(a: dict, b: dict) -> bool:
    """Whether two causal states hold equal tensors under the same keys (other entries, counters, ignored)."""
    ta = {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}
    tb = {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}
    return ta.keys() == tb.keys() and all(torch.equal(v, tb[k]) for k, v in ta.items())


class ImageConditions:
    """The first frames' conditioning, shared by the sessions that start from the same image with the same VAE
    (the web server's sessions, and every `reset()`, start from one first frame): its latents, encoded once,
    extended by whichever session needs the next one. The same encoder calls on the same inputs in the same
    order, so every session sees exactly the numbers it would have made itself. Keeps the `capacity` most
    recently used images. Not thread-safe: the sessions' work is serialized (the server's `compute` lock)."""

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._held: OrderedDict[tuple, ImageCondition] = OrderedDict()

    def get(self, vae, image: torch.Tensor) -> ImageCondition:
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        key = (id(vae), tuple(pixels.shape), hashlib.sha256(pixels.numpy().tobytes()).hexdigest())
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        made = self._held[key] = ImageCondition(vae, image)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)
        return made

    def __len__(self) -> int:
        return len(self._held)


# ---------------------------------------------------------------------------------------------- session

@dataclass
class Chunk:
    """What one step produced: the chunk's frames and latents, and where its time went."""
    index: int
    frames: torch.Tensor | None          # float32 [3, n, H, W] in [-1, 1] (on the decoder's device); None in a
                                         # process without a decoder (ranks other than 0 of a parallel run)
    latents: torch.Tensor                # float32 [16, lat, h, w]
    seconds: dict[str, float] = field(default_factory=dict)


class RealtimeSession:
    """One stream of a causal student (see the module docstring).

    runner: a DiTRunner (runtime/runner.py) for the student (expert "fast"); it is told the endless schedule
    of `len(schedule) + 1` forwards per chunk. decoder: anything with `decoder_state()` and
    `decode_chunk(latents, state) -> (frames, state)` (the Wan VAE, or the tiny TAEHV decoder). vae: the Wan
    VAE for the first frame's latents (y). context: the prompt's embedding [len, text_dim]. In a parallel run
    (the runner's `parallel`), processes other than rank 0 pass `vae=None, decoder=None`.
    """

    def __init__(self, runner, cfg: DiTConfig, vae, decoder, context: torch.Tensor, image: torch.Tensor,
                 height: int, width: int, *, intrinsics=None, device="cpu", dtype=torch.float32,
                 seed: int | None = None, steps: int | None = None, window: int | None = -1, sink: int | None = None,
                 noise: str = "chunk", total_frames: int | None = None, camera: torch.Tensor | None = None,
                 timing: bool = False, conditions: ImageConditions | None = None):
        rt: CausalSampling = cfg.realtime
        if rt is None:
            raise ValueError(f"{cfg.name} is not a causal student: it has no chunk loop")
        self.cfg, self.rt = cfg, rt
        self.runner, self.vae, self.decoder = runner, vae, decoder
        self.parallel = getattr(runner, "parallel", None)      # runtime.parallel.SequenceParallel or None
        if vae is None and (self.parallel is None or self.parallel.first):
            raise ValueError("the session needs the Wan VAE for the first frame's latents")
        self.device, self.dtype = torch.device(device), dtype
        self.height, self.width = height, width
        self.schedule = CausalSchedule(_step_indices(rt, steps), rt.shift)
        self.timing = timing
        self.context = context
        self.image = image
        self.intrinsics = cam.DEFAULT_INTRINSICS if intrinsics is None else intrinsics

        lat_h, lat_w = height // cfg.latents.stride[1], width // cfg.latents.stride[2]
        self.latent_hw = (lat_h, lat_w)
        frame_tokens = (lat_h // cfg.patch_size[1]) * (lat_w // cfg.patch_size[2])
        self.window = rt.window if window == -1 else window
        self.sink = rt.sink if sink is None else sink
        max_frames = None
        if self.window is None:
            if total_frames is None:
                raise ValueError("a global KV cache (no window) needs total_frames: give a window to stream "
                                 "without end")
            max_frames = _round_up(cfg.latents.latent_frames(total_frames), rt.chunk)
        heads = cfg.num_heads if self.parallel is None else self.parallel.kv_heads(cfg.num_heads)
        self.cache = KVCache.empty(cfg.num_layers, 1, frame_tokens, heads, cfg.head_dim, dtype,
                                   self.device, window=self.window, sink=self.sink, max_frames=max_frames)
        self.cross = CrossKV(cfg.num_layers)

        if noise not in ("chunk", "upstream"):
            raise ValueError(f"noise must be 'chunk' or 'upstream', got {noise!r}")
        if noise == "upstream" and total_frames is None:
            raise ValueError("noise='upstream' draws the whole clip's noise first: it needs total_frames")
        self.noise_rule, self.total_frames, self.seed = noise, total_frames, rt.seed if seed is None else seed
        self.fixed_camera = camera
        self.conditions = conditions                 # first frames' conditioning shared with other sessions
        self._refresh_inputs: dict | None = None     # the last chunk's refresh, when deferred and not yet run
        self.reset()
        self.runner.start(Schedule.repeat([Forward(EXPERT, 1)] * (len(self.schedule) + 1)))

    # ---- control ----------------------------------------------------------------------------------------
    def reset(self, image: torch.Tensor | None = None) -> None:
        """Start the stream again from the first frame (a new one if given): cache, pose, noise, decoder."""
        if image is not None:
            self.image = image
        self._refresh_inputs = None                          # (the cache it would write is emptied)
        self.cache.reset()
        self.cross.reset()
        self.chunk_index, self.frame = 0, 0                   # chunks done, next latent frame
        self.generator = torch.Generator().manual_seed(int(self.seed))
        self.clip_noise = None
        if self.noise_rule == "upstream":
            lat_f = _round_up(self.cfg.latents.latent_frames(self.total_frames), self.rt.chunk)
            self.clip_noise = torch.randn(self.cfg.latents.channels, lat_f, *self.latent_hw,
                                          generator=self.generator)
        if self.vae is None:
            self.y = None
        elif self.conditions is not None:
            self.y = self.conditions.get(self.vae, self.image)
        else:
            self.y = ImageCondition(self.vae, self.image)
        self.camera = LiveCamera(self.intrinsics, self.height, self.width)
        self.decoder_state = self.decoder.decoder_state() if self.decoder is not None else None

    def set_prompt(self, context: torch.Tensor) -> None:
        """A new prompt from the next chunk on: its cross-attention K/V are recomputed, the frames seen (the
        self-attention cache) are kept."""
        self.refresh()                                       # the last chunk's refresh attends the old prompt
        self.context = context
        self.cross.reset()

    # ---- one chunk --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, keys=None, look=None, *, defer_refresh: bool = False) -> Chunk:
        """The next chunk. `keys`: one set of held keys per video frame of the chunk (or one set for all of
        them, or None); `look`: (yaw, pitch) degrees of mouse motion per video frame, or one pair for the chunk
        spread evenly. `defer_refresh`: return before the chunk's refresh forward (module docstring)."""
        seconds: dict[str, float] = {}
        if self._refresh_inputs is not None:
            seconds["refresh (previous chunk)"] = self.refresh()
        n, start = self.rt.chunk, self.frame
        clock = self._clock()

        video_frames = self.cfg.latents.video_frames(start + n) - self.cfg.latents.video_frames(start) \
            if start else self.cfg.latents.video_frames(n)
        camera = self._camera_chunk(start, n, video_frames, keys, look)
        y = self._image_chunk(start, n)
        seconds["camera"] = clock()

        x = self._initial_noise(start, n).to(self.device)
        inputs = dict(t=None, context=self.context.to(self.device)[None], y=y[None], camera=camera,
                      cache=self.cache, cross=self.cross, start_frame=start)
        s = self.schedule
        for k, t in enumerate(s.timesteps):
            v = self.runner(EXPERT, **dict(inputs, x=x[None], t=torch.tensor([t], dtype=torch.int64,
                                                                             device=self.device)))[0]
            x0 = s.x0(x, v, s.sigma_x0[k])
            seconds[f"forward {k}"] = clock()
            if k + 1 < len(s):
                x = s.renoise(x0, self._draw(x0.shape).to(self.device), s.sigma_noise[k + 1])

        frames = None
        if self.decoder is not None:
            frames, self.decoder_state = self.decoder.decode_chunk(x0[None], self.decoder_state)
            frames = frames[0]
        seconds["decode"] = clock()
        self.frame += n
        self.chunk_index += 1
        self._refresh_inputs = dict(inputs, x=x0[None], t=torch.zeros(1, device=self.device))
        if not defer_refresh:
            seconds["refresh"] = self.refresh()
        return Chunk(self.chunk_index - 1, frames, x0, seconds)

    @torch.no_grad()
    def refresh(self) -> float:
        """Run the last chunk's pending refresh (the clean chunk's K/V into the cache); seconds it took (0 when
        none was pending)."""
        if self._refresh_inputs is None:
            return 0.0
        clock = self._clock()
        inputs, self._refresh_inputs = self._refresh_inputs, None
        self.runner(EXPERT, **inputs)
        return clock()

    # ---- pieces -----------------------------------------------------------------------------------------
    def _camera_chunk(self, start: int, n: int, video_frames: int, keys, look) -> torch.Tensor:
        if self.fixed_camera is not None:
            if start + n > self.fixed_camera.shape[1]:
                raise ValueError(f"the camera given up front covers {self.fixed_camera.shape[1]} latent frames; "
                                 f"chunk {self.chunk_index} needs {start + n}")
            return self.fixed_camera[None, :, start:start + n].to(self.device, self.dtype)
        per_frame = _per_frame(keys, video_frames, frozenset())
        looks = _per_frame(look, video_frames, (0.0, 0.0), spread=True)
        stride = self.cfg.latents.stride[0]
        frames_done = 0 if start == 0 else self.cfg.latents.video_frames(start)
        for j in range(video_frames):
            if start == 0 and j == 0:
                continue                                    # the first frame is the start pose
            self.camera.advance(per_frame[j], looks[j])
            if (frames_done + j) % stride == 0:
                self.camera.mark_latent_frame()
        cond = self.camera.condition(list(range(start, start + n)))
        return cond[None].to(self.device, self.dtype)

    def _image_chunk(self, start: int, n: int) -> torch.Tensor:
        """y of latent frames start..start+n-1 on the device; in a parallel run, rank 0's, sent to all."""
        y = self.y.chunk(start, n).to(self.device, torch.float32) if self.y is not None else None
        if self.parallel is None:
            return y
        if y is None:
            y = torch.empty(self.cfg.in_dim - self.cfg.latents.channels, n, *self.latent_hw, device=self.device)
        return self.parallel.broadcast(y)

    def _initial_noise(self, start: int, n: int) -> torch.Tensor:
        if self.clip_noise is not None:
            return self.clip_noise[:, start:start + n].clone()
        return self._draw((self.cfg.latents.channels, n, *self.latent_hw))

    def _draw(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator)

    def _clock(self):
        """seconds since the last call (device work finished first when timing)."""
        last = [time.perf_counter()]

        def tick() -> float:
            if self.timing and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            dt, last[0] = now - last[0], now
            return dt
        return tick

    @property
    def video_frames_per_chunk(self) -> int:
        return self.rt.chunk * self.cfg.latents.stride[0]

    def close(self) -> None:
        self.runner.close()


def _step_indices(rt: CausalSampling, steps: int | None) -> tuple[int, ...]:
    if steps is None or steps == len(rt.step_indices):
        return rt.step_indices
    if steps == 1:
        return rt.step_indices[:1]          # one denoising step at the top of the schedule (t = 999)
    raise ValueError(f"--steps {steps}: this student runs {len(rt.step_indices)} steps, or 1")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _per_frame(value, frames: int, empty, spread: bool = False) -> list:
    """One entry per video frame. Keys: None, one set (or string) held for the whole chunk, or exactly one set
    per frame. Look (`spread`): None, one (yaw, pitch) for the chunk spread over its frames, or one per frame."""
    if value is None:
        return [empty] * frames
    if spread and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        yaw, pitch = value
        return [(yaw / frames, pitch / frames)] * frames
    if not spread and isinstance(value, (set, frozenset, str)):
        return [frozenset(value)] * frames
    if len(value) != frames:
        raise ValueError(f"{'look' if spread else 'keys'}: {len(value)} entries for a chunk of {frames} video "
                         "frames; give one per frame or one for the chunk")
    return [v if spread else frozenset(v) for v in value]
