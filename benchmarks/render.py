"""Offline render benchmark: real-time factor and peak memory of the whole `vasa-avatar render` path.

Each measurement renders the bundled voice, looped to the requested length with sox, in a fresh
Python process (so peak RSS is that render's own), and writes benchmarks/results/render.json.

    python benchmarks/render.py --seconds 10 60            # RTF and peak RSS at 10 s and 1 min
    python benchmarks/render.py --seconds 60 600 3600      # flat memory: 1, 10 and 60 minutes
    python benchmarks/render.py --seconds 3600 --stop-after 2400 --out benchmarks/results/render-memory.json
                                                           # RSS every 30 s of a long render, stopped at 40 min
    python benchmarks/render.py --seconds 1200 --hour-every 300 --out benchmarks/results/render-memory-renewals.json
                                                           # the watermark's hourly renewal every 5 min of wall time
    python benchmarks/render.py --seconds 3600 --mux-only --out benchmarks/results/render-memory-mux-only.json
                                                           # the mp4 writer alone (16x16 frames, the same
                                                           # audio): its fragments while writing, and the
                                                           # classic copy's index built at close
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
hour_every = float(sys.argv[6])
if hour_every > 0:  # a clock on which an hour passes every `hour_every` s: the watermark's hourly renewal, often
    import time
    import avatar.disclosure, avatar.watermark
    started, real_hour = time.monotonic(), avatar.watermark.hour_bucket
    fast_hour = lambda when=None: (real_hour(when) + int((time.monotonic() - started) // hour_every)) % (1 << avatar.watermark.HOUR_BITS)
    avatar.watermark.hour_bucket = avatar.disclosure.hour_bucket = fast_hour
result = render_file(portrait=Path(DEFAULT_PORTRAIT), audio=Path(sys.argv[1]), output=Path(sys.argv[2]),
                     controls=Controls(), audio_model=sys.argv[3], progress=False)
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"frames": result.frames, "audio_seconds": result.audio_seconds,
                  "wall_seconds": result.wall_seconds, "rtf": result.real_time_factor,
                  "peak_rss_mb": peak_kb / 1024}))
"""

# The writer alone, as render_file drives it but with 16x16 frames and no engines. A classic mp4
# keeps every sample's size and offset in memory until it writes the index (moov) at the end; our
# writer writes fragments (one fragment's index in memory) and builds the classic file's index at
# close, when a render's engines have freed far more than it needs (avatar/media.py).
CHILD_MUX = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from avatar.constants import FPS
from avatar.media import VideoWriter
from avatar.memory import steady_heap
steady_heap()
seconds = float(sys.argv[5])
frame = np.full((16, 16, 3), 128, np.uint8)
started = time.perf_counter()
with VideoWriter(Path(sys.argv[2]), size=16, audio_path=Path(sys.argv[1])) as writer:
    for i in range(round(seconds * FPS)):
        frame[0, 0] = i % 256
        writer.write(frame)
wall = time.perf_counter() - started
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"mode": "mux-only (16x16 frames, no engines)", "frames": round(seconds * FPS),
                  "audio_seconds": seconds, "wall_seconds": wall, "peak_rss_mb": peak_kb / 1024}))
"""


def make_audio(seconds: float, folder: Path) -> Path:
    voice = ROOT / "avatar" / "assets" / "voice.wav"
    out = folder / f"voice-{seconds:g}s.flac"
    # `repeat` loops the clip; trim cuts it to the exact length
    repeats = int(seconds // 8) + 1
    subprocess.run(["sox", str(voice), str(out), "repeat", str(repeats), "trim", "0", str(seconds)], check=True)
    return out


def _resident_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a running process in MB, from /proc (None once it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--audio-model", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "render.json")
    parser.add_argument("--sample-every", type=float, default=30.0, help="s between samples of the render's RSS")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="s of wall time after which a render is stopped (its RSS samples so far are kept)")
    parser.add_argument("--hour-every", type=float, default=0.0,
                        help="s of wall time per hour of the watermark's clock (0: the real clock)")
    parser.add_argument("--mux-only", action="store_true",
                        help="measure the mp4 writer alone (16x16 frames, the same audio, no engines)")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            audio = make_audio(seconds, Path(tmp))
            env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOG_minloglevel": "2"}
            started = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-c", CHILD_MUX if args.mux_only else CHILD, str(audio),
                                      str(Path(tmp) / "out.mp4"), args.audio_model, str(args.threads), str(seconds),
                                      str(args.hour_every)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            samples = []  # (wall s, resident MB, peak MB) of the render process while it runs
            stopped = False
            while child.poll() is None:
                time.sleep(min(args.sample_every, 1.0) if not samples else args.sample_every)
                rss = _resident_mb(child.pid)
                if rss is not None:
                    samples.append([round(time.perf_counter() - started, 1), *rss])
                    print(f"    {samples[-1][0]:7.0f} s: RSS {rss[0]:.0f} MB (peak {rss[1]:.0f})", flush=True)
                if args.stop_after and time.perf_counter() - started > args.stop_after:
                    child.terminate()
                    stopped = True
            out, err = child.communicate()
            if stopped:
                run = {"stopped_after_s": round(time.perf_counter() - started, 1),
                       "audio_seconds_requested": seconds}
            else:
                if child.returncode != 0:
                    raise SystemExit(f"render failed: {err.strip().splitlines()[-1] if err.strip() else child.returncode}")
                run = json.loads(out.strip().splitlines()[-1])
            run["process_seconds"] = time.perf_counter() - started
            run["rss_samples_s_mb_peak_mb"] = samples
            runs.append(run)
            if stopped:
                print(f"{seconds:>7g} s audio: stopped after {run['stopped_after_s']:.0f} s, "
                      f"last RSS {samples[-1][1] if samples else float('nan'):.0f} MB")
            elif args.mux_only:
                print(f"{seconds:>7g} s audio, writer alone: peak RSS {run['peak_rss_mb']:.0f} MB")
            else:
                print(f"{seconds:>7g} s audio: RTF {run['rtf']:.3f}, "
                      f"{1000 * run['wall_seconds'] / run['frames']:.1f} ms/frame, peak RSS {run['peak_rss_mb']:.0f} MB")

    report = {
        "benchmark": "offline render (vasa-avatar render, bundled portrait, looped bundled voice)",
        "goal": "RTF <= 0.8 on a 2-core CPU; peak RSS flat in audio length",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": args.threads},
        "audio_model": args.audio_model,
        "watermark_hour_every_s": args.hour_every or None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
