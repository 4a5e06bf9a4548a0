"""Offline render benchmark: real-time factor and peak memory of the whole `vasa-avatar render` path.

Each measurement renders the bundled voice, looped to the requested length with sox, in a fresh
Python process (so peak RSS is that render's own), and writes benchmarks/results/render.json.

    python benchmarks/render.py --seconds 10 60            # RTF and peak RSS at 10 s and 1 min
    python benchmarks/render.py --seconds 60 600 3600      # flat memory: 1, 10 and 60 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

CHILD = r"""
import json, sys, torch
from pathlib import Path
from avatar.cli import DEFAULT_PORTRAIT
from avatar.controls import Controls
from avatar.memory import steady_heap
from avatar.render import render_file
steady_heap()  # as the CLI does
torch.set_num_threads(int(sys.argv[4]))
result = render_file(portrait=Path(DEFAULT_PORTRAIT), audio=Path(sys.argv[1]), output=Path(sys.argv[2]),
                     controls=Controls(), audio_model=sys.argv[3], progress=False)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"frames": result.frames, "audio_seconds": result.audio_seconds,
                  "wall_seconds": result.wall_seconds, "rtf": result.real_time_factor,
                  "peak_rss_mb": peak_kb / 1024}))
"""


def make_audio(seconds: float, folder: Path) -> Path:
    voice = ROOT / "avatar" / "assets" / "voice.wav"
    out = folder / f"voice-{seconds:g}s.flac"
    # `repeat` loops the clip; trim cuts it to the exact length
    repeats = int(seconds // 8) + 1
    subprocess.run(["sox", str(voice), str(out), "repeat", str(repeats), "trim", "0", str(seconds)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--audio-model", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "render.json")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            audio = make_audio(seconds, Path(tmp))
            env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_minloglevel": "2"}
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(audio), str(Path(tmp) / "out.mp4"),
                                   args.audio_model, str(args.threads)],
                                  capture_output=True, text=True, env=env, check=True)
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["process_seconds"] = time.perf_counter() - started
            runs.append(run)
            print(f"{seconds:>7g} s audio: RTF {run['rtf']:.3f}, "
                  f"{1000 * run['wall_seconds'] / run['frames']:.1f} ms/frame, peak RSS {run['peak_rss_mb']:.0f} MB")

    report = {
        "benchmark": "offline render (vasa-avatar render, bundled portrait, looped bundled voice)",
        "goal": "RTF <= 0.8 on a 2-core CPU; peak RSS flat in audio length",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": args.threads},
        "audio_model": args.audio_model,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
