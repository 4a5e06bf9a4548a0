#!/usr/bin/env python
"""Build the TensorRT engines for this machine's GPU.

    python build_engines.py [--precision fp16|fp32] [--engines audio,motion,face] [--out DIR]

For each engine: export it to ONNX (cached by the hash of its source and weights) and check the
graph against torch; build one TensorRT plan for the local GPU, reusing a timing cache; run the
plan on the reference inputs (the bundled voice through the engines, the astronaut's rig) and
compare with torch before keeping it. FP16 that misses the tolerance (engines/export.py PARITY) is
rebuilt in FP32, and the manifest says which precision each engine got. The manifest records what
the plans are tied to: GPU name and compute capability, TensorRT and CUDA versions, ONNX hashes,
precision and build date; the runtime refuses plans that do not match (engines/runtime.py).

TensorRT 10 and 11: TensorRT 10 takes FP16 as a builder flag on the FP32 graph. TensorRT 11 has
no such flag (networks are strongly typed), so the FP16 graph itself is exported in float16
(engines.export.HalfPrecision) and built as is. Which one applies is detected from the module.

Without an NVIDIA GPU or TensorRT this prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from avatar.errors import AvatarError

WORKSPACE_BYTES = 2 << 30  # builder scratch memory; our engines are small
VERIFY_SECONDS = 3.0  # of the bundled voice, run through every engine to verify each plan
VERIFY_RENDER_EVERY = 10  # decoder frames checked: one in ten ticks (the CPU reference is slow)


class BuildError(AvatarError):
    """A plan could not be built or did not match torch."""


@dataclass
class Built:
    name: str
    precision: str
    plan: bytes
    report: dict
    seconds: float


def has_fp16_flag(trt) -> bool:
    """TensorRT 10 (weakly typed builds) has BuilderFlag.FP16; TensorRT 11 removed it."""
    from engines.runtime import trt_major

    return hasattr(trt.BuilderFlag, "FP16") and trt_major(trt) < 11


def _progress_monitor(trt, write):
    """A TensorRT progress monitor that prints the builder's top-level phases (TensorRT >= 10)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                write(f"    {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_plan(trt, onnx_path: Path, *, fp16: bool, timing_cache: Path, write=print) -> bytes:
    """One serialized plan from an ONNX file. `fp16`: TensorRT 10's FP16 flag on this graph;
    on TensorRT 11 pass an FP16 graph (strongly typed: the graph's types are the precision)."""
    from engines.runtime import trt_logger

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flag_fp16 = fp16 and has_fp16_flag(trt)
    flags = 0
    if not has_fp16_flag(trt) and hasattr(trt, "NetworkDefinitionCreationFlag") and \
            hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # 11: always strongly typed
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if flag_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif not fp16 and hasattr(trt.BuilderFlag, "TF32") and hasattr(config, "clear_flag"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32: TF32 matmuls lose 13 bits
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt, write)
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT failed to build {onnx_path.name} (see the messages above)")
    from engines.export import write_atomic

    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def verify_plan(trt, plan: bytes, name: str, module, calls, *, device) -> dict:
    """The plan on every recorded call, against torch's outputs: export.merge_errors's report."""
    from engines.export import check_calls, engine_io, merge_errors
    from engines.runtime import TensorRTEngine

    engine = TensorRTEngine(trt, plan, name=name, device=device)
    engine.check_io(engine_io(name, module))
    return merge_errors([check_calls(c, engine) for c in calls])


def reference_calls(engines, names, *, seconds: float | None = None):
    """Per engine: the real path's calls (voice -> encoder -> generator -> decoder on the astronaut)
    and random ones, with torch's outputs."""
    from avatar.controls import Controls, controls_tensor
    from engines.export import random_calls, read_voice, record_calls, reference_rig

    rig = reference_rig()
    controls = controls_tensor(Controls())
    real = record_calls(engines.encoder, engines.generator, engines.decoder, rig.inputs(),
                        read_voice(seconds=seconds or VERIFY_SECONDS), controls, render_every=VERIFY_RENDER_EVERY)
    modules = {"audio": engines.encoder, "motion": engines.generator, "face": engines.decoder}
    counts = {"audio": 40, "motion": 100, "face": 3}
    return {n: [real[n], random_calls(n, modules[n], n=counts[n], seed=1, rig_inputs=rig.inputs(),
                                      controls=controls)] for n in names}


def build(engines, *, names, precision: str, out_dir: Path, trt, device, identity: dict,
          models: dict | None = None, cache_dir: Path | None = None, write=None) -> dict:
    """Export, build, verify and write every engine in `names`; returns the manifest written."""
    from engines.export import write_atomic, describe_errors, engine_hash, export_and_check, export_engine, merge_errors
    from engines.runtime import MANIFEST, MANIFEST_FORMAT, trt_version

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {"audio": engines.encoder, "motion": engines.generator, "face": engines.decoder}
    manifest = _existing_manifest(out_dir, identity, trt_version(trt))
    manifest.update({"format": MANIFEST_FORMAT, **identity, "tensorrt": trt_version(trt), "torch": torch.__version__,
                     "precision": precision, "built": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    manifest.setdefault("engines", {})
    timing_cache = out_dir / "timing.cache"

    bar = _progress(total=len(names) * 3)
    say = write or bar.write  # messages between the progress bar's updates
    say("recording the reference (torch on the CPU, bundled voice, astronaut rig) ...")
    calls = reference_calls(engines, names)
    try:
        for name in names:
            module = modules[name]
            bar.set_description(f"{name}: export")
            exported, onnx_report = export_and_check(name, module, calls[name], cache_dir=cache_dir)
            bar.update()
            built = None
            tries = ["fp16", "fp32"] if precision == "fp16" else ["fp32"]
            for attempt in tries:
                bar.set_description(f"{name}: build {attempt}")
                started = time.perf_counter()
                graph = exported
                if attempt == "fp16" and not has_fp16_flag(trt):
                    try:  # TensorRT 11: the FP16 graph itself
                        graph = export_engine(name, module, cache_dir=cache_dir, precision="fp16")
                    except Exception as e:  # noqa: BLE001 - an engine torch cannot run in half: FP32
                        say(f"  {name}: no FP16 graph ({type(e).__name__}: {e}); building FP32")
                        continue
                try:
                    plan = build_plan(trt, graph.path, fp16=attempt == "fp16", timing_cache=timing_cache,
                                      write=say)
                    bar.set_description(f"{name}: verify {attempt}")
                    report = verify_plan(trt, plan, name, module, calls[name], device=device)
                except Exception as e:  # noqa: BLE001 - FP16 that does not build or run falls back to FP32
                    if attempt == "fp32":
                        raise
                    say(f"  {name} fp16: failed ({type(e).__name__}: {e}); building FP32")
                    continue
                ok = all(r["ok"] for r in report.values())
                say(f"  {name} {attempt}: {'verified' if ok else 'OUT OF TOLERANCE'}: {describe_errors(report)}")
                if ok:
                    built = Built(name, attempt, plan, report, time.perf_counter() - started)
                    break
            bar.update(2)
            if built is None:
                raise BuildError(f"the TensorRT {name} engine does not match torch in any precision; "
                                 "nothing was written for it")
            plan_name = f"{name}-{type(module).__name__}-{exported.hash}-{built.precision}.plan"
            write_atomic(out_dir / plan_name, built.plan)
            manifest["engines"][name] = {
                "class": type(module).__name__, "model": (models or {}).get(name),
                "onnx": exported.path.name, "onnx_hash": engine_hash(module),
                "onnx_sha256": hashlib.sha256(exported.path.read_bytes()).hexdigest(), "plan": plan_name,
                "precision": built.precision, "plan_bytes": len(built.plan), "build_s": round(built.seconds, 1),
                "onnx_check": merge_errors([onnx_report]), "parity": built.report,
            }
    finally:
        bar.close()
    write_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


class _PlainProgress:
    """tqdm's few methods used here, as plain lines (machines without tqdm)."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def set_description(self, text: str) -> None:
        print(f"[{self.n}/{self.total}] {text}", file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, text: str) -> None:
        print(text)

    def close(self) -> None:
        pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total)
    return tqdm(total=total, unit="step", desc="engines", file=sys.stderr)


def _existing_manifest(out_dir: Path, identity: dict, version: str) -> dict:
    """Entries of an earlier build for this same GPU and TensorRT (building a subset keeps the
    rest); anything else starts afresh."""
    from engines.runtime import check_manifest, read_manifest

    try:
        manifest = read_manifest(out_dir)
        check_manifest(manifest, identity=identity, version=version)
    except AvatarError:
        return {}
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    from avatar.pipeline import AUDIO_MODELS, MOTION_MODELS
    from engines.export import ENGINE_NAMES, PRECISIONS

    p = argparse.ArgumentParser(prog="build_engines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="fp16 where it holds the parity tolerance (else that engine falls back to fp32), or fp32")
    p.add_argument("--engines", default=",".join(ENGINE_NAMES),
                   help=f"comma-separated subset of {','.join(ENGINE_NAMES)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="plan directory (default: the engine cache's tensorrt/)")
    p.add_argument("--audio-model", choices=AUDIO_MODELS, default="trained")
    p.add_argument("--motion-model", choices=MOTION_MODELS, default="generator")
    p.add_argument("--device", default="cuda", help="CUDA device to build for (default: cuda)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINE_NAMES]
    if unknown or not names:
        p.error(f"--engines takes names from {','.join(ENGINE_NAMES)}; got {args.engines!r}")
    args.names = names
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from engines.runtime import default_plan_dir, gpu_identity, import_tensorrt, trt_version

        if not torch.cuda.is_available():
            raise AvatarError("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False): TensorRT "
                              "engines are built on the GPU that will run them; without one, use --backend torch "
                              "or onnxruntime")
        trt = import_tensorrt()
        device = torch.device(args.device)
        identity = gpu_identity(device)
        out_dir = args.out or default_plan_dir()
        print(f"building {', '.join(args.names)} for {identity['gpu']} (compute {identity['compute_capability']}), "
              f"TensorRT {trt_version(trt)}, CUDA {identity['cuda']}, {args.precision} -> {out_dir}")
        from avatar.pipeline import load_engines

        engines = load_engines(audio_model=args.audio_model, motion_model=args.motion_model)
        manifest = build(engines, names=args.names, precision=args.precision, out_dir=out_dir, trt=trt,
                         device=device, identity=identity,
                         models={"audio": args.audio_model, "motion": args.motion_model, "face": "decoder"})
    except AvatarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in args.names:
        entry = manifest["engines"][name]
        print(f"{name}: {entry['precision']} plan {entry['plan_bytes'] / 1e6:.1f} MB in {entry['build_s']} s")
    print(f"wrote {out_dir / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
