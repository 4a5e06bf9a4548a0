"""Live benchmark: the real pipeline and pacing code, fed by a file played as a microphone at
real-time pace, into a recording virtual-camera backend. Writes benchmarks/results/live.json.

    python benchmarks/live.py --seconds 60                       # the bundled voice, looped
    python benchmarks/live.py --audio talk.wav --seconds 600 --portrait me.jpg

Same as `vasa-avatar bench live`; the metrics and what "on time" means are defined in
avatar/live.py `bench_live`. Goals on the 2-core CPU: 40 new FPS, >= 99% on time, latency p95
<= 100 ms, drift <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatar.errors import AvatarError  # noqa: E402
from avatar.live import bench_live  # noqa: E402
from avatar.memory import steady_heap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--audio", type=Path, default=ROOT / "avatar" / "assets" / "voice.wav",
                   help="speech to play as the microphone (looped to --seconds)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    p.add_argument("--portrait", type=Path, default=None, help="photo (default: the bundled portrait)")
    p.add_argument("--audio-model", default="auto", choices=("auto", "trained", "dsp"))
    p.add_argument("--motion-model", default="generator", choices=("generator", "baseline"))
    p.add_argument("--runtime", default="auto", help="engine back-end: auto, torch, onnxruntime, tensorrt")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--device-rate", type=int, default=48_000, help="the fake microphone's sample rate (Hz)")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "live.json")
    p.add_argument("-v", "--verbose", action="store_true", help="the daemon's status line every 5 s")
    args = p.parse_args(argv)
    steady_heap()  # as `vasa-avatar run` does
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        result = bench_live(audio=args.audio, seconds=args.seconds, portrait=args.portrait, out=args.out,
                            audio_model=args.audio_model, motion_model=args.motion_model, runtime=args.runtime,
                            device_rate=args.device_rate, torch_threads=args.torch_threads)
    except AvatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("fps_delivered", "fps_new", "on_time_share", "latency_ms", "drift_ms",
                                             "dropped", "peak_rss_mib", "goals_met")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
