"""Full-size LingBot-World Cam pipeline, random weights: wall time per phase and peak memory under VRAM budgets.

What it runs is `worldstream generate`'s own code path (`prepare` -> `run`), I2V with a keyboard camera string,
480x832, 17 frames, at full model size: the umt5-xxl text encoder (5.7 B parameters), the Wan2.1 VAE and both
LingBot Cam DiT experts (high and low noise). No checkpoint can be downloaded and one expert in bf16 is 37 GB,
so:

  * the checkpoint folder (written to a temp folder) holds a FULL-size umt5-xxl `.pth` (random bf16, generated
    on the GPU, 11.4 GB), a FULL-size `Wan2.1_VAE.pth` (random float32) and the tiny test tokenizer; its DiT
    folders (`high_noise_model/`, `low_noise_model/`) hold a *tiny* LingBot Cam, only so that `prepare()`
    validates the folder exactly as it validates a download;
  * after `prepare()` the job's checkpoint config is swapped for the full-size `lingbot-cam` config, and `run()`
    gets a `runner_factory` that builds the real runner (planner, pinned slabs, streaming engine) with
    `RandomLoader`: each expert's weights are generated on the GPU tensor by tensor and the streamed blocks
    packed into pinned host slabs, as the checkpoint loader does; the tiny DiT weights are never read.

So "load" measures VAE + umt5 reading from disk (page cache) but DiT generation instead of DiT reading:
with a real checkpoint the DiT load is bounded by the disk (37 GB per expert).

`--dit fp8-files` measures the low-RAM path instead: the DiT folders hold FULL-size LingBot Cam experts,
random weights written directly in `worldstream convert --quant fp8`'s layout (one safetensors file per block,
19 GB per expert; a bf16 original would not fit the lent machine's 64 GB disk), every file of the folder is
evicted from the page cache after writing (fsync + POSIX_FADV_DONTNEED), and `run()` uses the real runner and
checkpoint loader under `--ram`: the active expert's streamed blocks are read from disk into pinned RAM, the
inactive expert stays on disk until the switch reads it. Reported: peak host RSS, bytes the process read from
storage (/proc/self/io), the switch time.

`prepare()` sizes an I2V video from the image's aspect ratio and the pixel budget, which for 832*480 gives
464x832 (upstream's flooring, see `conditioning.i2v_size`); the benchmark then sets the job to exactly
480x832 so that the stated size is measured. The prompt cache is off, so umt5 runs every time.

Each run (a VRAM budget, or a variant of the job) is a fresh subprocess (separate peaks, nothing cached in
memory); the folder is built by another one. Results: `$OUT/pipeline.json` (else
`benchmarks/results/pipeline.json`) and a table on stdout.

`--job target` is issue 17's job: LingBot Cam A14B, 480x832, 81 frames (`w-40,jw-40`), 70 steps, `--vram
24GB`, fp8 weights (compressed as they are made) and 8-bit attention, without step caching and with it, side
by side (`--variants`, one fresh process each, in order):
  * "off": no step cache (run at threshold 0: the uncached run bit for bit, which records the cache's signal
    per step into the folder, and its final latents);
  * a threshold, e.g. "0.1";
  * "skip:N": the threshold that would skip N steps given the "off" run's signals (pipelines/step_cache.py
    `threshold_for`). On random weights the signal's scale says nothing about a trained model's, so a fixed
    threshold would skip an arbitrary number of steps; this measures the speed of skipping N, and the error
    it costs here (final latents against the "off" run's) is reported beside it.
Reported per run: the phases, s/step of computed and of skipped (cached) steps, the steps skipped, the plan.
A machine that allows only minutes per command runs one variant per command into the same `--folder` (built
by the first, reused by the next; "off" before "skip:N"); where the next command may get a fresh machine, the
"off" run leaves its signals and final latents in `--reference` (under $OUT), carried back for "skip:N":

    python benchmarks/pipeline.py                       # H100: 24GB then 12GB, 17 frames, 6 steps
    python benchmarks/pipeline.py --job target --variants off --folder /tmp/wsf --out $OUT/target_off.json
    python benchmarks/pipeline.py --job target --variants skip:32 --folder /tmp/wsf --out $OUT/target_skip32.json
    python benchmarks/pipeline.py --job target --variants off --reference $OUT/ref --out $OUT/target_off.json
    python benchmarks/pipeline.py --job target --variants skip:32 --reference ref --out $OUT/target_skip32.json
    python benchmarks/pipeline.py --cpu-smoke --out /tmp/smoke.json   # same code path, tiny models, CPU
    python benchmarks/pipeline.py --cpu-smoke --job target --variants off,skip:32 --out /tmp/smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

PROMPT = "The camera moves forward through a dark forest path, then turns left towards a clearing."
SHIFT, GUIDE, SEED = 10.0, 5.0, 42
# short: 8 frames forward, 8 forward while turning left (16 -> 17 frames, 4n+1), budgets side by side;
# target (issue 17): 81 frames, 70 steps, --vram 24GB, fp8 + 8-bit attention, step caching on and off
JOBS = {
    "short": dict(frames=17, action="w-8,jw-8", steps=6, smoke_steps=4, vram="24GB,12GB", quant=None,
                  attention="sdpa", variants="off", timeout=300),
    "target": dict(frames=81, action="w-40,jw-40", steps=70, smoke_steps=70, vram="24GB", quant="fp8",
                   attention="8bit", variants="off,skip:32", timeout=900),
}
FULL = {"variant": "lingbot-cam", "height": 480, "width": 832}
SMOKE = {"variant": "lingbot-cam-tiny", "height": 64, "width": 64}
PHASES = ["load", "text encode", "VAE encode", "denoise", "VAE decode", "write"]


# ---------------------------------------------------------------------------------------------- stage: build

def write_random_t5(path: Path, cfg, device, seed: int = 0) -> int:
    """A umt5 encoder `.pth` with upstream's key names, random bf16 weights generated on `device`; bytes written.

    Same scaling as `testing.text.random_text_encoder_state` (norms ~1, projections ~1/sqrt(fan_in)), but made
    on the GPU: 5.7 B random numbers on the CPU would take minutes. Each tensor is moved to the CPU as it is
    made, so the file holds CPU storages like the real one. Written to a temp file, then renamed.
    """
    import torch

    from worldstream.checkpoints.t5 import upstream_shapes

    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, shape in upstream_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            t = 1.0 + 0.2 * t
        elif not (key.endswith("pos_embedding.embedding.weight") or key == "token_embedding.weight"):
            t = t * shape[1] ** -0.5
        state[key] = t.to(torch.bfloat16).cpu()
        del t
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def write_random_fp8_experts(root: Path, cfg, device) -> int:
    """Both experts of `cfg` as a `worldstream convert --quant fp8` checkpoint (default policy), random weights
    generated on `device` one block at a time (scaled as loading.RandomLoader); bytes written."""
    import torch

    from worldstream.checkpoints.compressed import QuantPolicy, quantize_stream, quantized_keys
    from worldstream.checkpoints.keymap import upstream_config
    from worldstream.models.dit import WanDiT
    from worldstream.runtime.convert import NON_BLOCK_FILE, block_file, write_expert

    policy = QuantPolicy("fp8")
    keys = quantized_keys(cfg, policy)
    with torch.device("meta"):
        model = WanDiT(cfg)
    groups: dict[str, list] = {NON_BLOCK_FILE: []}
    for key, p in model.named_parameters():
        parts = key.split(".")
        groups.setdefault(block_file(int(parts[1])) if parts[0] == "blocks" else NON_BLOCK_FILE, []).append(
            (key, p.shape))
    total = 0
    for e, name in enumerate(("high_noise_model", "low_noise_model")):
        g = torch.Generator(device=device).manual_seed(e)

        def made(items):
            for key, shape in items:
                t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
                t = 1 + 0.02 * t if ("norm" in key and key.endswith("weight")) else (
                    t / cfg.dim ** 0.5 if "modulation" in key else 0.02 * t)
                yield key, t.to(torch.bfloat16)

        def parts():
            for fname, items in groups.items():
                yield fname, {k: t.cpu() for k, t in quantize_stream(made(items), keys, policy.fmt)}

        total += write_expert(root / name, parts(), upstream_config(cfg), policy)
    return total


def evict_page_cache(root: Path) -> int:
    """fsync every file under root and drop its pages from the page cache, so that the run reads the disk
    (no root privileges needed: POSIX_FADV_DONTNEED on clean pages). Returns the bytes evicted."""
    n = 0
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += path.stat().st_size
            finally:
                os.close(fd)
    return n


def disk_read_speed(files: list[Path], threads: int) -> float:
    """GB/s reading `files` (evicted from the page cache) with `threads` parallel readers, 16 MB preads."""
    from concurrent.futures import ThreadPoolExecutor

    def read(path: Path) -> int:
        fd, n = os.open(path, os.O_RDONLY), 0
        try:
            while chunk := os.pread(fd, 16 << 20, n):
                n += len(chunk)
        finally:
            os.close(fd)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(read, files))
    return n / (time.perf_counter() - t0) / 1e9


def io_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (Linux /proc/self/io), None where unavailable."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def build_folder(root: Path, smoke: bool, dit: str = "random") -> dict:
    """The checkpoint folder `prepare()` accepts: full (or, smoke, tiny) umt5 and VAE; a tiny DiT (never read)
    or, with dit="fp8-files", full-size (smoke: tiny) fp8 experts that the run reads."""
    import torch

    from worldstream.checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER
    from worldstream.checkpoints.vae import VAE_FILE
    from worldstream.models.text_encoder import T5Config
    from worldstream.models.vae import VAEConfig
    from worldstream.runtime.memory import peak_rss_bytes
    from worldstream.testing.dit import write_dit_checkpoint
    from worldstream.testing.text import write_tiny_tokenizer
    from worldstream.testing.vae import write_tiny_vae

    device = torch.device("cpu" if smoke else "cuda")
    times = {}
    t0 = time.perf_counter()
    dit_bytes = None
    if dit == "fp8-files":
        from worldstream.models.configs import get_config
        dit_bytes = write_random_fp8_experts(root, get_config(SMOKE["variant"] if smoke else FULL["variant"]),
                                             device)
        times["fp8 DiT experts random + save"] = time.perf_counter() - t0
    else:
        write_dit_checkpoint(root, "lingbot-cam-tiny", shards=1)       # for validation only
        times["tiny DiT"] = time.perf_counter() - t0
    write_tiny_tokenizer(root / T5_TOKENIZER)
    t0 = time.perf_counter()
    t5_bytes = write_random_t5(root / T5_CHECKPOINT, T5Config.tiny() if smoke else T5Config(), device)
    times["umt5 random + save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_tiny_vae(root / VAE_FILE, cfg=VAEConfig.tiny() if smoke else VAEConfig(), seed=0)  # any width
    times["VAE random + save"] = time.perf_counter() - t0
    out = {"seconds": times, "umt5_bytes": t5_bytes, "vae_bytes": (root / VAE_FILE).stat().st_size,
           "dit_bytes": dit_bytes, "peak_rss": peak_rss_bytes()}
    if dit == "fp8-files":
        t0 = time.perf_counter()
        out["evicted_bytes"] = evict_page_cache(root)
        times["fsync + evict page cache"] = time.perf_counter() - t0
        blocks = sorted((root / "high_noise_model").glob("block_*.safetensors"))
        out["disk_read_GBps"] = {"1 thread": disk_read_speed(blocks[1:5], 1),
                                 "8 threads": disk_read_speed(blocks[5:21], 8)}
        evict_page_cache(root)
    return out


# ---------------------------------------------------------------------------------------------- stage: run

class TimedRunner:
    """Wraps a DiTRunner: times every forward (synchronized) and splits the CUDA peaks at the DiT's edges.

    Peaks are read and reset at the first forward (everything before: VAE load, umt5, VAE encode) and at
    `close()` (the denoising); what `run` does after that (VAE decode) is read by the caller.
    """

    def __init__(self, inner, device):
        self.inner, self.device = inner, device
        self.cuda = device.type == "cuda"
        self.forwards: list[dict] = []
        self.peaks: dict[str, dict] = {}

    def __getattr__(self, name):            # report, batched_guidance, start, plan, ...
        return getattr(self.inner, name)

    def _cut(self, label: str) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peaks[label] = {"allocated": torch.cuda.max_memory_allocated(self.device),
                                 "reserved": torch.cuda.max_memory_reserved(self.device)}
            torch.cuda.reset_peak_memory_stats(self.device)

    def __call__(self, expert: str, **inputs):
        import torch

        if not self.forwards:
            self._cut("before DiT (VAE load, umt5, VAE encode)")
        load0, switch0 = self.inner.report["load_s"], self.inner.report["switch_s"]
        stack = inputs.get("stack")
        t0 = time.perf_counter()
        out = self.inner(expert, **inputs)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.forwards.append({"expert": expert, "s": time.perf_counter() - t0,
                              "load_s": self.inner.report["load_s"] - load0,
                              "switch_s": self.inner.report["switch_s"] - switch0,
                              "cached": bool(stack is not None and stack.reuse)})
        return out

    def close(self) -> None:
        self.inner.close()
        self._cut("denoise (DiT)")


def run_once(root: Path, vram_text: str, smoke: bool, steps: int, mp4_dir: Path, dit: str = "random",
             ram_text: str | None = None, job_name: str = "short", variant: str = "off",
             reference: Path | None = None) -> dict:
    import dataclasses

    import torch

    from worldstream.models.configs import get_config
    from worldstream.pipelines.generate import format_report, run
    from worldstream.pipelines.tasks import prepare
    from worldstream.pipelines.schedulers import FlowUniPC, expert_for
    from worldstream.runtime.memory import parse_bytes, peak_rss_bytes
    from worldstream.runtime.loading import RandomLoader
    from worldstream.runtime.runner import build_runner
    from worldstream.testing.checkpoint import demo_image

    spec = SMOKE if smoke else FULL
    preset = JOBS[job_name]
    reference = reference or root       # where the "off" run leaves its signals and final latents
    signals_file = reference / f"signals_{vram_text}.json"
    if variant == "off":
        step_cache = 0.0            # the uncached run, recording the cache's signal
    elif variant.startswith("skip:"):
        from worldstream.pipelines.step_cache import StepCache, threshold_for
        if not signals_file.is_file():
            raise SystemExit(f"{variant}: run the 'off' variant first (no {signals_file} from it)")
        seen = json.loads(signals_file.read_text())
        threshold = threshold_for(seen["signals"], set(seen["forced"]), int(variant[5:]))
        if threshold is None:
            raise SystemExit(f"{variant}: no threshold skips that many of the {len(seen['signals'])} steps")
        # the threshold was found on the uncached run's signals; this run's own skips change them, so it could
        # skip more: at most N
        step_cache = StepCache(threshold, max_total=int(variant[5:]))
    else:
        step_cache = float(variant)
    device = torch.device("cpu" if smoke else "cuda")
    h, w = spec["height"], spec["width"]
    notes: list[str] = []
    job = prepare(root, PROMPT, image=demo_image(w, h), size=f"{w}*{h}", frame_num=preset["frames"],
                  action_string=preset["action"], steps=steps, shift=SHIFT, guide_scale=GUIDE, seed=SEED,
                  notice=notes.append)
    if (job.height, job.width) != (h, w):
        notes.append(f"prepare() sized the I2V video {job.height}x{job.width} (upstream's flooring); "
                     f"benchmark sets {h}x{w}")
        job.height, job.width = h, w
    cfg = get_config(spec["variant"])
    if dit == "random":
        job.ckpt = dataclasses.replace(job.ckpt, config=cfg)      # full size from here on; DiT files unused
    elif job.ckpt.config.name != cfg.name or job.ckpt.quant is None:
        raise SystemExit(f"expected the written {cfg.name} fp8 checkpoint, found {job.ckpt.config.name} "
                         f"({job.ckpt.quant})")
    split = [expert_for(t, job.boundary) for t in FlowUniPC(job.steps, job.shift).timesteps]
    if len(set(split)) < 2:
        raise SystemExit(f"{steps} steps at shift {SHIFT} use only the {split[0]} expert (boundary "
                         f"{job.boundary}); pick more steps so both experts run")
    vram = parse_bytes(vram_text)
    ram = parse_bytes(ram_text) if ram_text else None
    holder: dict = {}

    def factory(ckpt, device_, dtype, workload, vram=None, ram=None, **options):
        loader = (RandomLoader(ckpt.config, seed=0, quant=options.get("quant")) if dit == "random"
                  else None)                                                     # None: the checkpoint's
        inner = build_runner(ckpt, device_, dtype, workload, vram=vram, ram=ram, loader=loader, **options)
        holder["runner"] = TimedRunner(inner, torch.device(device_))
        return holder["runner"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(job.describe(), flush=True)
    t_all = time.perf_counter()
    read0 = io_read_bytes()
    quant = preset["quant"] if dit == "random" else None        # fp8-files: already compressed on disk
    result = run(job, device=device, vram=vram, ram=ram, prompt_cache=None, runner_factory=factory,
                 progress=True, quant=quant, attention=preset["attention"], step_cache=step_cache)
    read1 = io_read_bytes()
    runner: TimedRunner = holder["runner"]
    peaks = dict(runner.peaks)
    rep = result.report
    off_latents = reference / f"latents_{vram_text}_off.pt"
    rel_err = None
    if variant == "off":
        reference.mkdir(parents=True, exist_ok=True)
        torch.save(result.latents, off_latents)
        signals_file.write_text(json.dumps({k: rep["step_cache"][k] for k in ("signals", "forced")}))
    elif off_latents.is_file():
        ref = torch.load(off_latents)
        rel_err = ((result.latents - ref).norm() / ref.norm()).item()
    if device.type == "cuda":
        peaks["VAE decode"] = {"allocated": torch.cuda.max_memory_allocated(device),
                               "reserved": torch.cuda.max_memory_reserved(device)}

    t0 = time.perf_counter()
    mp4 = None
    try:
        import av  # noqa: F401
    except ImportError:
        notes.append("PyAV (av) is not installed: MP4 not written")
    else:
        from worldstream.pipelines.video import FPS, write_mp4
        mp4 = str(write_mp4(result.frames, mp4_dir / f"lingbot_cam_{vram_text}.mp4", fps=FPS))
    result.timings["write"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_all
    print(format_report(result), flush=True)

    # steady s/step: computed forwards that neither loaded an expert nor switched, and not the first (kernel
    # compile); cached forwards (step cache: embeddings and head only) apart
    fw = runner.forwards
    per_step = len(fw) / job.steps
    steady = [f["s"] for i, f in enumerate(fw)
              if i > 0 and f["load_s"] == 0 and f["switch_s"] == 0 and not f["cached"]]
    cached = [f["s"] for f in fw if f["cached"]]
    switch_fw = [f for i, f in enumerate(fw) if i > 0 and f["switch_s"] > 0]
    plan = runner.inner.plan
    return {
        "vram_budget": vram_text, "vram_budget_bytes": vram, "ram_budget": ram_text, "dit": dit,
        "job_preset": job_name, "variant": variant, "quant": quant, "attention_asked": preset["attention"],
        "step_cache": rep.get("step_cache"),
        "latents_rel_err_vs_off": rel_err,
        "storage_read_bytes": None if read0 is None or read1 is None else read1 - read0,
        "disk_blocks_per_expert": None if plan is None else len(plan.disk_blocks),
        "ram_blocks_per_expert": None if plan is None else len(plan.ram_blocks),
        "keep_both_experts": getattr(runner.inner, "keep_all", None),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": rep["dtype"],
        "job": {"variant": cfg.name, "height": job.height, "width": job.width, "frames": job.frames,
                "steps": job.steps, "solver": job.solver, "shift": job.shift, "guide_scale": list(job.guide_scale),
                "boundary": job.boundary, "action_string": preset["action"], "tokens": job.latent_shape[1]
                * (job.height // 16) * (job.width // 16)},
        "timings_s": {k: result.timings.get(k, 0.0) for k in PHASES},
        "total_s": sum(result.timings.values()), "wall_s": wall,
        "dit_load_s": rep["runner"].get("load_s", 0.0),   # random: generation on the GPU; fp8-files: disk reads
        "switch_s": rep["runner"].get("switch_s", 0.0),         # includes loading the second expert
        "denoise_s_per_step": result.timings["denoise"] / job.steps,
        "steady_s_per_step": (sum(steady) / len(steady) * per_step) if steady else None,
        "cached_s_per_step": (sum(cached) / len(cached) * per_step) if cached else None,
        "first_forward_s": fw[0]["s"] if fw else None,         # incl. the first expert's load and kernel compile
        "switch_forward_s": switch_fw[0]["s"] if switch_fw else None,
        "forwards": fw,
        "expert_steps": rep["expert_steps"], "cfg_batched": rep["batched_guidance"],
        "plan": None if plan is None else {
            "resident": plan.resident, "n_resident": len(plan.resident), "n_blocks": plan.n_blocks,
            "prefetch": plan.prefetch, "slots": plan.slots, "cfg_batched": plan.batched_guidance,
            "chunk": plan.chunk, "attention": plan.attention, "block_bytes": plan.block_bytes,
            "predicted_vram_peak": plan.vram_peak, "predicted_s_per_step": plan.step_seconds,
            "predicted_ram_peak": plan.ram_peak, "describe": plan.describe()},
        "peak_vram_allocated": max((p["allocated"] for p in peaks.values()), default=None),
        "peak_vram_reserved": max((p["reserved"] for p in peaks.values()), default=None),
        "peak_vram_by_phase": peaks,
        "peak_rss": peak_rss_bytes(),
        "mp4": mp4, "mp4_bytes": os.path.getsize(mp4) if mp4 else None, "notes": notes,
    }


# ---------------------------------------------------------------------------------------------- parent

def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _child(args: list[str], timeout: float) -> dict:
    """Run this script as a subprocess stage; return the JSON it wrote."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--result", str(out)],
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {' '.join(args[1:2] + args[4:6])} failed with exit code "
                               f"{proc.returncode} (its output is above)")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def table(res: dict) -> str:
    runs = [r for r in res["runs"] if "error" not in r]
    if not runs:
        return "no run finished"
    def label(r):
        cache = r.get("variant", "off")
        return f"--vram {r['vram_budget']}" + ("" if cache == "off" else f", step cache {cache}")

    def skipped(r):
        sc = r.get("step_cache")
        if sc is None or r.get("variant", "off") == "off":
            return "off"
        err = r.get("latents_rel_err_vs_off")
        return (f"{sc['skipped']} of {sc['skipped'] + sc['computed']} (threshold {sc['threshold']:.3g}"
                + (f", latents {err:.1%} off the uncached" if err is not None else "") + ")")

    head = ["", *[label(r) for r in runs]]
    rows = [[f"{p} (s)", *[f"{r['timings_s'][p]:.1f}" for r in runs]] for p in PHASES]
    rows += [
        ["  DiT load, all experts (s)", *[f"{r['dit_load_s']:.1f}" for r in runs]],
        ["total (s)", *[f"{r['total_s']:.1f}" for r in runs]],
        ["steps skipped by the step cache", *[skipped(r) for r in runs]],
        ["denoise s/step (all)", *[f"{r['denoise_s_per_step']:.2f}" for r in runs]],
        ["denoise s/step (steady, computed)", *["-" if r["steady_s_per_step"] is None else
                                                f"{r['steady_s_per_step']:.2f}" for r in runs]],
        ["  s per skipped step", *["-" if r.get("cached_s_per_step") is None else f"{r['cached_s_per_step']:.3f}"
                                   for r in runs]],
        ["plan: predicted s/step", *["-" if r["plan"] is None else f"{r['plan']['predicted_s_per_step']:.2f}"
                                     for r in runs]],
        ["first forward (s)", *[f"{r['first_forward_s']:.1f}" for r in runs]],
        ["expert switch (s)", *[f"{r['switch_s']:.1f}" for r in runs]],
        ["peak VRAM allocated", *[_gb(r["peak_vram_allocated"]) for r in runs]],
        ["peak VRAM reserved", *[_gb(r["peak_vram_reserved"]) for r in runs]],
    ]
    for label in runs[0]["peak_vram_by_phase"]:
        rows.append([f"  {label}", *[_gb(r["peak_vram_by_phase"].get(label, {}).get("allocated")) for r in runs]])
    rows += [
        ["peak host RSS", *[_gb(r["peak_rss"]) for r in runs]],
        ["read from storage", *[_gb(r.get("storage_read_bytes")) for r in runs]],
        ["RAM budget / blocks in RAM", *[f"{r.get('ram_budget') or 'default'} / {r.get('ram_blocks_per_expert')}"
                                         for r in runs]],
        ["plan: resident blocks", *["-" if r["plan"] is None else f"{r['plan']['n_resident']}/{r['plan']['n_blocks']}"
                                    for r in runs]],
        ["plan: prefetch / CFG", *["-" if r["plan"] is None else
                                   f"{r['plan']['prefetch']} / {'batched' if r['plan']['cfg_batched'] else 'two'}"
                                   for r in runs]],
        ["plan: attention / chunk", *["-" if r["plan"] is None else
                                      f"{r['plan'].get('attention')} / {r['plan'].get('chunk') or '-'}"
                                      for r in runs]],
        ["plan: predicted VRAM", *["-" if r["plan"] is None else _gb(r["plan"]["predicted_vram_peak"])
                                   for r in runs]],
        ["steps high/low", *[f"{r['expert_steps'].get('high', 0)}/{r['expert_steps'].get('low', 0)}" for r in runs]],
    ]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)   # noqa: E731
                                for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="short",
                    help="short: 17 frames, 6 steps, budgets side by side; target: issue 17's job (module docstring)")
    ap.add_argument("--vram", help="comma-separated budgets, one fresh process each (default: the job's)")
    ap.add_argument("--variants", help="comma-separated step-cache settings, one fresh process each: 'off', a "
                                       "threshold, or skip:N (module docstring; default: the job's; target: "
                                       "off,skip:32)")
    ap.add_argument("--ram", help="host RAM budget for the DiT weights (default: the runner's, 80%% of the machine)")
    ap.add_argument("--dit", choices=["random", "fp8-files"], default="random",
                    help="random: DiT generated on the device; fp8-files: full-size fp8 experts written to disk "
                         "and read by the real loader (see the module docstring)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the job's: short 6 at shift 10, 3 high + 3 "
                                              "low; smoke 4; target 70)")
    ap.add_argument("--cpu-smoke", action="store_true", help="same code path, tiny models, on the CPU")
    ap.add_argument("--workdir", help="where the temp checkpoint folder goes (needs ~12 GB; default $TMPDIR)")
    ap.add_argument("--folder", help="the checkpoint folder to build (if missing) and keep, reused by a later "
                                     "invocation (one variant per command)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder and the MP4s in it")
    ap.add_argument("--reference", help="folder for the 'off' run's signals and final latents, read by skip:N "
                                        "(default: the checkpoint folder; give one under $OUT when the next "
                                        "variant runs on another machine)")
    ap.add_argument("--out", help="result JSON (default $OUT/pipeline.json, else benchmarks/results/pipeline.json)")
    ap.add_argument("--timeout", type=float, help="seconds per stage (default: the job's)")
    ap.add_argument("--stage", choices=["build", "run"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = JOBS[args.job]

    if args.stage == "build":
        _atomic_json(Path(args.result), build_folder(Path(args.root), args.cpu_smoke, args.dit))
        return 0
    if args.stage == "run":
        root = Path(args.root)
        _atomic_json(Path(args.result), run_once(root, args.vram, args.cpu_smoke, args.steps, root, args.dit,
                                                 args.ram, args.job, args.variant,
                                                 Path(args.reference) if args.reference else None))
        return 0

    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "pipeline.json" if os.environ.get("OUT")
                                           else HERE / "results" / "pipeline.json")
    smoke = ["--cpu-smoke"] if args.cpu_smoke else []
    steps = args.steps or (preset["smoke_steps"] if args.cpu_smoke else preset["steps"])
    timeout = args.timeout or preset["timeout"]
    budgets = [b.strip() for b in (args.vram or preset["vram"]).split(",") if b.strip()]
    variants = [v.strip() for v in (args.variants or preset["variants"]).split(",") if v.strip()]
    for v in variants:                            # a bad variant fails here, before anything is built
        if v != "off" and not (v.startswith("skip:") and v[5:].isdigit()):
            float(v)
    if args.folder:
        root = Path(args.folder)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="ws-pipeline-", dir=args.workdir))
    keep = args.keep or args.folder is not None
    built = root / "built.json"
    t_start = time.perf_counter()
    res: dict = {"benchmark": "pipeline", "job_preset": args.job, "smoke": args.cpu_smoke, "prompt": PROMPT,
                 "action_string": preset["action"], "frames": preset["frames"], "steps": steps,
                 "quant": preset["quant"], "attention": preset["attention"],
                 "weights": "random: full-size umt5-xxl and Wan2.1 VAE files written to disk, " + (
                     "full-size DiT experts generated on the device (the checkpoint's DiT folders hold a tiny "
                     "model for validation only)" if args.dit == "random" else
                     "full-size fp8 DiT experts written to disk in the converted layout and evicted from the "
                     "page cache; the run reads them with the checkpoint loader"),
                 "dit": args.dit, "ram_budget": args.ram, "runs": []}
    status = 0
    try:
        if built.is_file():
            res["build"] = json.loads(built.read_text())
            print(f"reusing the checkpoint folder {root} (built {res['build'].get('date')})", flush=True)
        else:
            print(f"building the checkpoint folder in {root} ...", flush=True)
            t0 = time.perf_counter()
            res["build"] = _child(["--stage", "build", "--root", str(root), "--dit", args.dit, *smoke], timeout)
            res["build"]["wall_s"] = time.perf_counter() - t0
            res["build"]["date"] = time.strftime("%Y-%m-%d %H:%M")
            if keep:
                _atomic_json(built, res["build"])
        _atomic_json(out, res)                 # after every stage: a killed benchmark keeps what finished
        print(f"built in {res['build']['wall_s']:.1f} s: {res['build']['seconds']}", flush=True)
        for budget in budgets:
            for variant in variants:
                print(f"\n=== --vram {budget}, step cache {variant} ===", flush=True)
                if args.dit == "fp8-files":      # every run reads the disk, not what the last one left cached
                    evict_page_cache(root)
                try:
                    res["runs"].append(_child(["--stage", "run", "--root", str(root), "--vram", budget,
                                               "--steps", str(steps), "--dit", args.dit, "--job", args.job,
                                               "--variant", variant,
                                               *(["--reference", args.reference] if args.reference else []),
                                               *(["--ram", args.ram] if args.ram else []), *smoke], timeout))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    res["runs"].append({"vram_budget": budget, "variant": variant, "error": str(e)})
                    status = 1
                _atomic_json(out, res)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        res["error"] = str(e)
        status = 1
    finally:
        res["total_wall_s"] = time.perf_counter() - t_start
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        _atomic_json(out, res)
    print("\n" + table(res))
    print(f"\nwrote {out} (whole benchmark {res['total_wall_s']:.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
