"""Engine benchmarks: milliseconds per frame for each engine and the whole frame, on one back-end.

    python -m avatar.bench engines --backend torch [--device cuda] [--no-cuda-graph] [--frames 500]

Runs the bundled voice (looped) through a FrameEngine for `frames` ticks after a warm-up, timing
each engine (CUDA events on the GPU, the wall clock on the CPU) and the whole `step` call (wall
clock: input copies, the three engines, the frame back in host memory). Writes JSON to
benchmarks/results/engines-<backend>-<device>.json and returns the same dict. Benchmarks report;
they do not assert.

Imports nothing from the analysis side: on a machine without mediapipe the astronaut's rig comes
from benchmarks/data/ (engines.export.reference_rig).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from avatar.constants import FPS, FRAME_SIZE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
WARMUP_FRAMES = 20
STAGES = ("audio", "motion", "face")


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {"min": round(float(a.min()), 4), "mean": round(float(a.mean()), 4),
            "p50": round(float(np.percentile(a, 50)), 4),
            "p99": round(float(np.percentile(a, 99)), 4), "max": round(float(a.max()), 4)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_engines(backend: str = "auto", *, frames: int = 500, out: Path | None = RESULTS_DIR,
                  device: str | None = None, cuda_graph: bool = True, threads: int | None = None,
                  audio_model: str = "auto", motion_model: str = "generator", plan_dir: Path | None = None,
                  warmup: int = WARMUP_FRAMES, label: str | None = None, progress: bool = False) -> dict:
    """Time `frames` frames on `backend` ("auto", "torch", "onnxruntime", "tensorrt", or any
    registered name). `out`: the results folder (None: do not write). Returns the results dict:
    per engine and for the whole frame mean/p50/p99/max ms, FPS, device, versions, settings."""
    import torch

    from avatar.controls import Controls, controls_tensor
    from avatar.pipeline import load_engines
    from engines.export import read_voice, reference_rig
    from engines.runtime import create_backend

    if frames < 1:
        raise AvatarError("--frames must be at least 1")
    engines = load_engines(audio_model=audio_model, motion_model=motion_model)
    rig = reference_rig()
    options: dict = {}
    if device is not None:
        options["device"] = device
    if threads is not None:
        options["threads"] = threads
    if plan_dir is not None:
        options["plan_dir"] = plan_dir
    if backend in ("torch", "auto"):
        options["cuda_graph"] = cuda_graph
    chosen = create_backend(backend, engines=engines, **options)
    engine = chosen.frame_engine(engines, rig.inputs(), timing=True)

    load_before = _load()
    voice = read_voice().numpy()
    ticks = voice.reshape(-1, SAMPLES_PER_FRAME)
    controls = controls_tensor(Controls())
    noise = torch.Generator().manual_seed(0)
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    frame_ms: list[float] = []
    started = time.perf_counter()
    try:
        for i in range(warmup + frames):
            samples = ticks[i % len(ticks)]
            n = torch.rand(1, engine.n_noise, generator=noise)
            t0 = time.perf_counter()
            frame = engine.step(samples, controls, n)
            t1 = time.perf_counter()
            if i >= warmup:
                frame_ms.append((t1 - t0) * 1e3)
                for s in STAGES:
                    stage_ms[s].append(engine.stage_ms[s])
            if progress and (i + 1) % 100 == 0:
                print(f"  {i + 1 - warmup}/{frames} frames", file=sys.stderr)
    finally:
        engine.close()
    if frame is None or frame.shape != (FRAME_SIZE, FRAME_SIZE, 3):
        raise RuntimeError(f"the {chosen.name} frame engine returned {None if frame is None else frame.shape}")

    on_cuda = getattr(engine, "device", torch.device("cpu")).type == "cuda"
    device_name = engine.device_name if on_cuda else f"{_cpu_name()} ({os.cpu_count()} cores)"
    name = label or chosen.name + ("" if not on_cuda or chosen.name != "torch" else
                                   ("-cudagraph" if getattr(engine, "cuda_graph", False) else "-eager"))
    frame_stats = _stats(frame_ms)
    results = {
        "backend": chosen.name, "label": name, "device": "cuda" if on_cuda else "cpu", "device_name": device_name,
        "frames": frames, "warmup": warmup, "audio_model": audio_model, "motion_model": motion_model,
        "frame_ms": frame_stats, "stages_ms": {s: _stats(v) for s, v in stage_ms.items()},
        "fps": round(1000.0 / frame_stats["mean"], 2), "fps_p99": round(1000.0 / frame_stats["p99"], 2),
        "real_time": frame_stats["p99"] <= 1000.0 / FPS,
        "cuda_graph": bool(getattr(engine, "cuda_graph", False)),
        "cuda_graph_error": getattr(engine, "cuda_graph_error", None),
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - started, 2),
        # other work on the machine skews CPU timings: the 1-minute load average before and after
        "load_average": [round(load_before, 2), round(_load(), 2)],
        "versions": _versions(chosen.name),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"engines-{_slug(name)}-{_slug('cpu' if not on_cuda else device_name)}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        results["path"] = str(path)
    return results


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every OS
        return float("nan")


def _versions(backend: str) -> dict[str, str]:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.version.cuda:
        v["cuda"] = str(torch.version.cuda)
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if backend == "tensorrt":
        import tensorrt

        v["tensorrt"] = tensorrt.__version__
    return v


def summary(results: dict) -> str:
    s = results["stages_ms"]
    f = results["frame_ms"]
    return (f"{results['label']} on {results['device_name']}: frame {f['p50']:.2f} ms p50, {f['mean']:.2f} mean, "
            f"{f['p99']:.2f} p99, {f['min']:.2f} min ({results['fps']:.1f} FPS); p50 audio {s['audio']['p50']:.2f}, "
            f"motion {s['motion']['p50']:.2f}, face {s['face']['p50']:.2f} ms; load {results['load_average'][0]}")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The `engines` benchmark's options, for `python -m avatar.bench engines` and `vasa-avatar bench
    engines` alike (run_engines takes the parsed arguments)."""
    p.add_argument("--backend", default="auto", help="auto, torch, onnxruntime, tensorrt or a registered back-end "
                                                     "(default: auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the back-end's)")
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--warmup", type=int, default=WARMUP_FRAMES)
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="torch on CUDA: run eagerly")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch intra-op / onnxruntime per session; default: the back-end's)")
    p.add_argument("--audio-model", default="auto", choices=("auto", "trained", "dsp"))
    p.add_argument("--motion-model", default="generator", choices=("generator", "baseline"))
    p.add_argument("--plan-dir", type=Path, default=None, help="TensorRT plans (default: the engine cache's)")
    p.add_argument("--label", default=None, help="name in the results file (default: the back-end's)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default: {RESULTS_DIR})")


def run_engines(args: argparse.Namespace) -> int:
    """Run the benchmark add_engine_arguments describes; print the summary and where it went."""
    results = bench_engines(args.backend, frames=args.frames, out=args.out, device=args.device,
                            cuda_graph=args.cuda_graph, threads=args.threads, audio_model=args.audio_model,
                            motion_model=args.motion_model, plan_dir=args.plan_dir, warmup=args.warmup,
                            label=args.label, progress=True)
    print(summary(results))
    print(f"wrote {results['path']}")
    return 0


def main(argv=None) -> int:
    from avatar.memory import steady_heap

    p = argparse.ArgumentParser(prog="python -m avatar.bench", description="engine benchmarks (JSON results)")
    sub = p.add_subparsers(dest="what", required=True)
    add_engine_arguments(sub.add_parser("engines", help="ms per frame per engine and for the whole frame"))
    args = p.parse_args(argv)
    steady_heap()  # as the CLI does
    try:
        return run_engines(args)
    except AvatarError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
