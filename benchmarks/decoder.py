"""FaceDecoder speed on the CPU: ms per frame over varied motion. Writes benchmarks/results/decoder.json.

    PYTHONPATH=. python benchmarks/decoder.py                 # the three CPU set-ups below, 300 frames
    PYTHONPATH=. python benchmarks/decoder.py --setups 2x0 --frames 200
    PYTHONPATH=. python benchmarks/decoder.py --rig astro_rig.pt --device cuda   # no mediapipe needed

A set-up "TxW" is T torch threads per op and W decoder workers (FaceDecoder.parallel: the mouth and
eyes on W threads of their own). 2x0 is the issue's "torch, 2 threads"; 1x1 is what live runs
(offline render runs 1x0 on two frames at once). The set-ups take turns frame by frame, so a shared
machine's changing speed hits them alike.

The motion is a smooth random walk through every channel's range (head turns, speech-like jaw,
blinks, gaze shifts), so the timing covers the renderer's real work, not the neutral shortcut it
does not have. Also reported: CPU time per frame (what the process itself spent; on a shared
machine wall time includes other programs' load) and the machine's load average while measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar.memory import steady_heap  # noqa: E402
from avatar.motion import CHANNELS  # noqa: E402
from engines.face_decoder import FaceDecoder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "decoder.json"
GOAL_MS = 10.0  # FaceDecoder budget per frame on the 2-core CPU, 2 torch threads


def motion_walk(frames: int, seed: int = 0) -> np.ndarray:
    """(frames, N_CHANNELS) float32: each channel a smoothed random walk inside its range."""
    rng = np.random.default_rng(seed)
    low = np.array([c.low for c in CHANNELS])
    high = np.array([c.high for c in CHANNELS])
    x = np.cumsum(rng.normal(0.0, 0.15, (frames, len(CHANNELS))), axis=0)
    x = 0.5 + 0.5 * np.sin(x)  # wrapped into 0..1, smooth
    return (low + (high - low) * x).astype(np.float32)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setups", default="2x0,1x1,1x0", help="comma-separated TxW: torch threads x decoder workers")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--portrait", default=str(ROOT / "avatar" / "assets" / "astronaut.png"))
    p.add_argument("--rig", default=None, help="a saved rig (Rig.save) instead of analysing --portrait")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("-o", "--output", default=str(RESULTS))
    args = p.parse_args(argv)
    steady_heap()  # as the CLI, render and live do: without it glibc faults fresh pages in every frame

    from avatar.rig import Rig, load_rig

    rig = Rig.load(args.rig) if args.rig else load_rig(args.portrait)
    device = torch.device(args.device)
    inputs = tuple(t.to(device) for t in rig.inputs())
    setups = {}
    for name in args.setups.split(","):
        threads, workers = (int(v) for v in name.split("x"))
        setups[name] = (threads, FaceDecoder().eval().to(device).parallel(workers if device.type == "cpu" else 0))
    walk = torch.from_numpy(motion_walk(args.warmup + args.frames))[:, None].to(device)  # (T, 1, N_CHANNELS)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall = {name: [] for name in setups}
    cpu = {name: [] for name in setups}
    load_before = os.getloadavg()
    with torch.inference_mode():
        for i, motion in enumerate(walk):
            for name, (threads, decoder) in setups.items():
                torch.set_num_threads(threads)
                t_wall, t_cpu = time.perf_counter(), time.process_time()
                decoder(motion, *inputs)
                sync()
                if i >= args.warmup:
                    wall[name].append((time.perf_counter() - t_wall) * 1000)
                    cpu[name].append((time.process_time() - t_cpu) * 1000)
    load_after = os.getloadavg()

    def summary(ms):
        return {"p50": statistics.median(ms), "p90": float(np.percentile(ms, 90)),
                "p99": float(np.percentile(ms, 99)), "mean": statistics.fmean(ms), "min": min(ms)}

    best = min(setups, key=lambda name: statistics.median(wall[name]))
    result = {
        "engine": f"FaceDecoder (torch, {device.type})",
        "portrait": Path(args.rig or args.portrait).name,
        "frames": args.frames, "warmup": args.warmup,
        "setups": {name: {"torch_threads": setups[name][0], "decoder_workers": int(name.split("x")[1]),
                          "wall_ms": summary(wall[name]), "cpu_ms": summary(cpu[name])}  # cpu: all threads
                   for name in setups},
        "best_setup": best,
        "goal_ms": GOAL_MS,
        "meets_goal_p50": statistics.median(wall[best]) <= GOAL_MS,
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "machine": machine() | ({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result["setups"].items():
        w = r["wall_ms"]
        print(f"FaceDecoder {name} ({r['torch_threads']} torch threads, {r['decoder_workers']} workers): "
              f"p50 {w['p50']:.2f} ms, p99 {w['p99']:.2f} ms wall, CPU {r['cpu_ms']['p50']:.2f} ms")
    print(f"over {args.frames} frames each, load {load_before[0]:.1f} -> {load_after[0]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
