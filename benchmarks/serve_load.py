"""Bounded load test of `worldstream serve` over loopback: sessions opened and closed again and again, key
storms, a slow reader, clients that leave mid-chunk; latency percentiles, and whether the server's memory and
threads return to their baseline.

It starts the server itself (`worldstream serve --host 127.0.0.1 --port 0`, the tiny built-in model unless
--ckpt_dir is given), talks to it only on 127.0.0.1, runs a fixed number of cycles under a hard time limit
(--max_seconds), stops the server with SIGTERM and checks that it exits cleanly. Every loop is bounded.

Per cycle: connect (time to the first frame), a key storm (--storm input messages as fast as the socket takes
them, random keys and mouse motion, a ping every 25 to see whether the event loop stays responsive), then W
pressed with a fresh sequence number (key -> first frame generated with it, measured at its arrival here),
then the client leaves: every other cycle abruptly, while a chunk is being generated. One extra session reads
nothing for a few seconds (a slow page) to see old frames dropped, not buffered.

    python benchmarks/serve_load.py                                   # CPU, tiny model: ~2 min on 2 cores
    python benchmarks/serve_load.py --cycles 20 --out benchmarks/results/serve_load_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from worldstream.serve.protocol import parse_frame  # noqa: E402


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "Threads"):
            out[k] = int(v.split()[0])
    return {"rss_MB": out["VmRSS"] / 1024, "threads": out["Threads"]}


def pct(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]          # noqa: E731
    return {"n": len(xs), "p50": q(50), "p90": q(90), "p99": q(99), "max": xs[-1], "mean": statistics.fmean(xs)}


class Session:
    def __init__(self, port: int, deadline: float):
        self.t_open = time.perf_counter()
        self._cm = connect(f"ws://127.0.0.1:{port}/ws", origin=f"http://127.0.0.1:{port}", proxy=None,
                           max_size=None, open_timeout=60)
        self.ws = self._cm.__enter__()
        self.deadline = deadline
        self.ack = True
        self.status: dict = {}
        self.frames: list[dict] = []
        self.pings: dict[int, float] = {}          # id -> time sent
        self.pongs: dict[int, float] = {}          # id -> time answered

    def recv(self):
        left = self.deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError("the run's time limit was reached")
        m = self.ws.recv(timeout=left)
        if isinstance(m, bytes):
            h = parse_frame(m)[0]
            h["t"] = time.perf_counter()
            self.frames.append(h)
            if self.ack:
                self.ws.send(json.dumps({"type": "ack", "frame": h["number"]}))
            return h
        msg = json.loads(m)
        if msg["type"] == "status":
            self.status = msg
        elif msg["type"] == "pong":
            self.pongs[msg["id"]] = time.perf_counter()
        return msg

    def until(self, pred):
        while True:
            m = self.recv()
            if pred(m):
                return m

    def close(self):
        self._cm.__exit__(None, None, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--storm", type=int, default=400, help="input messages per key storm")
    ap.add_argument("--max_seconds", type=float, default=480.0, help="hard limit for the whole run")
    ap.add_argument("--ckpt_dir")
    ap.add_argument("--image")
    ap.add_argument("--device")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not 1 <= args.cycles <= 200 or not 1 <= args.storm <= 10_000 or not 10 <= args.max_seconds <= 3600:
        ap.error("keep it bounded: --cycles 1..200, --storm 1..10000, --max_seconds 10..3600")
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    rng = random.Random(0)

    cmd = [sys.executable, "-m", "worldstream.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--max_sessions", "1", "--no_prompt_cache", "--outputs", "/tmp/worldstream-serve-load"]
    for flag in ("ckpt_dir", "image", "device"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    port = None
    for line in server.stdout:
        log.append(line)
        if line.startswith("open http://127.0.0.1:"):
            port = int(line.split(":")[2].split("/")[0])
            break
    if port is None:
        print("".join(log), file=sys.stderr)
        return 1
    print(f"server pid {server.pid} on 127.0.0.1:{port}")

    def health() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:   # loopback only
            return json.loads(r.read())

    def idle(timeout=120.0):
        end = time.perf_counter() + timeout
        while health()["sessions"]:
            if time.perf_counter() > min(end, deadline):
                raise TimeoutError("the server still holds a session")
            time.sleep(0.1)

    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs "
                     f"({platform.processor() or platform.platform()})", "cycles": args.cycles, "storm": args.storm}
    first_frame, key_to_frame, ping_rtt, gen_fps, delivered_fps, key_chunks = [], [], [], [], [], []
    stats_after: dict = {}
    try:
        # warm-up: the model's weights load at the first forward; the baseline is taken after it
        s = Session(port, deadline)
        s.until(lambda m: m.get("type") == "status" and m.get("chunk", 0) >= 2)
        s.close()
        idle()
        base = proc_status(server.pid)
        results["model"] = health()["model"]
        print(f"baseline after a warm-up session: {base}")

        for cycle in range(args.cycles):
            s = Session(port, deadline)
            s.until(lambda m: isinstance(m, dict) and "chunk" in m and "index" in m)
            first_frame.append(s.frames[0]["t"] - s.t_open)
            # the key storm, pings interleaved
            for i in range(args.storm):
                keys = "".join(k for k in "wasdijkl" if rng.random() < 0.25)
                s.ws.send(json.dumps({"type": "input", "keys": keys, "seq": i + 1,
                                      "look": [rng.uniform(-5, 5), rng.uniform(-5, 5)]}))
                if i % 25 == 0:
                    s.pings[i] = time.perf_counter()
                    s.ws.send(json.dumps({"type": "ping", "id": i}))
            while len(s.pongs) < len(s.pings):
                s.recv()
            ping_rtt += [1e3 * (s.pongs[k] - t) for k, t in s.pings.items()]
            # key -> first frame generated with it
            seq = args.storm + 10
            s.ws.send(json.dumps({"type": "input", "keys": "w", "seq": seq}))
            t_key = time.perf_counter()
            f = s.until(lambda m: isinstance(m, dict) and "index" in m and m["input_seq"] >= seq)
            key_to_frame.append(f["t"] - t_key)
            st = s.until(lambda m: m.get("type") == "status" and "gen_fps" in m and m.get("input_seq", 0) >= seq)
            gen_fps.append(st["gen_fps"])
            key_chunks.append(key_to_frame[-1] / (st["latency_ms"] / 1e3))
            if st.get("delivered_fps"):
                delivered_fps.append(st["delivered_fps"])
            if cycle % 2:                       # leave mid-chunk: right after a status (the next chunk started)
                s.until(lambda m: m.get("type") == "status" and "gen_fps" in m)
            s.close()
            idle()
            print(f"cycle {cycle}: first frame {first_frame[-1]:.2f} s, key->frame {key_to_frame[-1]:.2f} s, "
                  f"server {proc_status(server.pid)}", flush=True)

        # a page that stops reading (no acks) for 6 s, then reads again: it gets the newest frames, no backlog
        s = Session(port, deadline)
        s.until(lambda m: isinstance(m, dict) and "index" in m)
        s.ack = False
        time.sleep(6.0)
        stalled = health()["active"][0]
        s.ack = True
        s.ws.send(json.dumps({"type": "ack", "frame": s.frames[-1]["number"] if s.frames else 0}))
        n = len(s.frames)
        while len(s.frames) < n + 40:
            s.recv()
        resumed = [f["chunk"] for f in s.frames[n:]]      # the first ones were already in flight when it stalled
        results["stalled_page"] = {"server_chunk_when_resumed": stalled["chunk"], "frames_sent": stalled["frames_sent"],
                                   "dropped": stalled["dropped"], "chunks_of_frames_after_resuming": resumed}
        s.close()
        idle()
        time.sleep(1.0)
        stats_after = proc_status(server.pid)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
        log.append(out)

    results.update({
        "first_frame_s": pct(first_frame), "key_to_frame_s": pct(key_to_frame),
        "key_to_frame_in_chunk_times": pct(key_chunks), "ping_rtt_ms": pct(ping_rtt),
        "gen_fps": pct(gen_fps), "delivered_fps": pct(delivered_fps), "baseline": base, "after": stats_after,
        "rss_growth_MB": stats_after["rss_MB"] - base["rss_MB"],
        "threads_back_to_baseline": stats_after["threads"] == base["threads"],
        "server_exit_code": server.returncode, "server_stopped_cleanly": "stopped by SIGTERM" in "".join(log),
        "wall_s": time.perf_counter() - t_start,
    })
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0 if server.returncode == 0 and results["threads_back_to_baseline"] else 1


if __name__ == "__main__":
    sys.exit(main())
