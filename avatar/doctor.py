"""`vasa-avatar doctor`: what the live daemon needs on this machine, what is missing, and the exact
command that fixes it on this OS.

    checks = doctor()            # [Check(name, ok, message, optional), ...]
    code = print_doctor(checks)  # prints one line per check; 1 if a required check failed

A check's message says what was found when it passes and how to fix it when it fails. Optional
checks (the delayed mic, the GPU and its engines) never make the exit code fail: the avatar runs
without them, on the CPU and with the meeting app's own microphone.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, TextIO

from avatar.camera import CAMERA_NAME, LINUX_SETUP, camera_setup_command
from avatar.errors import AvatarError

DELAYED_MIC_SINK = "vasa_mic"
LINUX_DELAYED_MIC = (f"pactl load-module module-null-sink sink_name={DELAYED_MIC_SINK} "
                     f"sink_properties=device.description=VASA_Mic && pactl load-module module-remap-source "
                     f"master={DELAYED_MIC_SINK}.monitor source_name=vasa_mic_source "
                     f"source_properties=device.description=VASA_Mic_Source; then run "
                     f"PULSE_SINK={DELAYED_MIC_SINK} vasa-avatar run --delayed-mic pulse and pick 'VASA_Mic_Source' "
                     f"as the meeting app's microphone")
WINDOWS_DELAYED_MIC = ("install VB-Cable (vb-audio.com/Cable), run vasa-avatar run --delayed-mic \"CABLE Input\" "
                       "and pick 'CABLE Output' as the meeting app's microphone")
MACOS_DELAYED_MIC = ("brew install blackhole-2ch (or existential.audio/blackhole), run vasa-avatar run "
                     "--delayed-mic BlackHole and pick 'BlackHole 2ch' as the meeting app's microphone")


class Check(NamedTuple):
    name: str
    ok: bool
    message: str  # what was found, or the fix
    optional: bool = False  # a failure here does not stop the avatar from running


def doctor(*, audio_backend=None, sys_root: Path = Path("/sys"), system: str | None = None) -> list[Check]:
    """Every check, in the order the data flows: microphone, voice detector, camera, delayed mic,
    GPU and engines, portrait cache. `audio_backend`, `sys_root` and `system` are for tests."""
    system = system or platform.system()
    return [
        check_microphone(audio_backend),
        check_vad(),
        check_camera(sys_root=sys_root, system=system),
        check_delayed_mic(audio_backend, system=system),
        *check_gpu_and_engines(),
        check_portrait_cache(),
    ]


def check_microphone(audio_backend=None) -> Check:
    from avatar.mic import get_audio_backend, list_input_devices

    try:
        backend = get_audio_backend(audio_backend)
        inputs = list_input_devices(backend=backend)
    except AvatarError as e:
        return Check("microphone", False, str(e))
    if not inputs:
        return Check("microphone", False, "no microphone found: connect one (Linux: check arecord -l and "
                                          "pactl list short sources; inside a container, pass the sound device in)")
    default = backend.default_device(output=False)
    chosen = next((d for d in inputs if d.index == default), inputs[0])
    return Check("microphone", True, f"{len(inputs)} input device(s); default {chosen.describe()}")


def check_vad() -> Check:
    try:
        import webrtcvad  # noqa: F401
    except ImportError:
        return Check("voice detector", False, "pip install webrtcvad-wheels")
    return Check("voice detector", True, "webrtcvad")


def check_camera(*, sys_root: Path = Path("/sys"), system: str | None = None) -> Check:
    from avatar.camera import find_v4l2_device, v4l2_devices

    system = system or platform.system()
    try:
        import pyvirtualcam  # noqa: F401
    except ImportError:
        return Check("virtual camera", False, "pip install pyvirtualcam")
    if system == "Linux":
        sysfs = sys_root / "class" / "video4linux"
        if not (sys_root / "module" / "v4l2loopback").is_dir():
            return Check("virtual camera", False, f"the v4l2loopback kernel module is not loaded: {LINUX_SETUP}")
        path = find_v4l2_device(CAMERA_NAME, sysfs=sysfs)
        if path is None:
            have = ", ".join(f"{d} {n!r}" for d, n in v4l2_devices(sysfs=sysfs)) or "none"
            return Check("virtual camera", False, f'v4l2loopback is loaded but no device is labelled "{CAMERA_NAME}" '
                                                  f"(video devices: {have}): sudo modprobe -r v4l2loopback, then "
                                                  f"{LINUX_SETUP}")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return Check("virtual camera", False, f"{path} is not writable by you: sudo usermod -aG video $USER, "
                                                  "then log out and in")
        return Check("virtual camera", True, f'{path} "{CAMERA_NAME}"')
    if system in ("Windows", "Darwin"):
        from avatar.camera import open_camera

        try:
            with open_camera() as cam:
                return Check("virtual camera", True, f"{cam.name} ({cam.backend})")
        except AvatarError as e:
            return Check("virtual camera", False, f"{e}" if "set it up" in str(e) else f"{e}; {camera_setup_command(system)}")
    return Check("virtual camera", False, camera_setup_command(system))


def _pulse_sinks() -> list[str] | None:
    pactl = shutil.which("pactl")
    if pactl is None:
        return None
    try:
        out = subprocess.run([pactl, "list", "short", "sinks"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.split("\t")[1] for line in out.splitlines() if "\t" in line]


def check_delayed_mic(audio_backend=None, *, system: str | None = None) -> Check:
    """The loopback audio device the delayed mic plays into (optional: only for lip/voice sync)."""
    from avatar.mic import list_output_devices

    system = system or platform.system()
    name = "delayed mic (optional)"
    try:
        outputs = [d.name for d in list_output_devices(backend=audio_backend)]
    except AvatarError as e:
        return Check(name, False, str(e), optional=True)
    if system == "Linux":
        sinks = _pulse_sinks()
        if sinks is None:
            return Check(name, False, f"pactl not found (PulseAudio/PipeWire tools); with them: {LINUX_DELAYED_MIC}",
                         optional=True)
        if DELAYED_MIC_SINK in sinks:
            return Check(name, True, f"sink {DELAYED_MIC_SINK} exists: run PULSE_SINK={DELAYED_MIC_SINK} "
                                     "vasa-avatar run --delayed-mic pulse", optional=True)
        return Check(name, False, f"no {DELAYED_MIC_SINK} sink: {LINUX_DELAYED_MIC}", optional=True)
    want, fix = {"Windows": ("cable input", WINDOWS_DELAYED_MIC), "Darwin": ("blackhole", MACOS_DELAYED_MIC)}.get(
        system, ("", "no loopback audio device known for this OS"))
    found = [n for n in outputs if want and want in n.lower()]
    if found:
        return Check(name, True, f"--delayed-mic {found[0]!r}", optional=True)
    return Check(name, False, fix, optional=True)


def check_gpu_and_engines() -> list[Check]:
    import torch

    from engines.audio_encoder import WEIGHTS_DIR

    checks = []
    weights = WEIGHTS_DIR / "audio_encoder.pt"
    if weights.is_file():
        checks.append(Check("audio encoder weights", True, str(weights)))
    else:
        checks.append(Check("audio encoder weights", False, f"{weights} is missing: run python -m engines.train_audio "
                                                           "(or use --audio-model dsp)"))
    if not torch.cuda.is_available():
        checks.append(Check("GPU", True, "no CUDA GPU: the engines run on the CPU (torch)", optional=True))
        return checks
    name = torch.cuda.get_device_name(0)
    checks.append(Check("GPU", True, f"{name} (torch {torch.__version__}, CUDA {torch.version.cuda})", optional=True))
    from engines.runtime import check_manifest, default_plan_dir, gpu_identity, import_tensorrt, read_manifest, trt_version

    try:
        trt = import_tensorrt()
    except AvatarError as e:
        checks.append(Check("TensorRT", False, f"{e} (torch on CUDA is used meanwhile)", optional=True))
        return checks
    checks.append(Check("TensorRT", True, f"TensorRT {trt_version(trt)}", optional=True))
    plan_dir = default_plan_dir()
    try:
        check_manifest(read_manifest(plan_dir), identity=gpu_identity(), version=trt_version(trt))
    except AvatarError as e:
        checks.append(Check("TensorRT engines", False, str(e), optional=True))
    else:
        checks.append(Check("TensorRT engines", True, f"built for this GPU in {plan_dir}", optional=True))
    return checks


def check_portrait_cache() -> Check:
    from avatar.rig import rig_cache_dir

    folder = rig_cache_dir()
    if folder.is_dir():
        rigs = list(folder.glob("*.pt"))
        size = sum(p.stat().st_size for p in rigs) / 2**20
        if not os.access(folder, os.W_OK):
            return Check("portrait cache", False, f"{folder} is not writable: fix its permissions or set VASA_AVATAR_CACHE")
        return Check("portrait cache", True, f"{folder}: {len(rigs)} portrait(s), {size:.1f} MiB")
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK):
        return Check("portrait cache", False, f"cannot create {folder} ({parent} is not writable): set VASA_AVATAR_CACHE")
    return Check("portrait cache", True, f"{folder} (empty; made on first use)")


def print_doctor(checks: list[Check] | None = None, *, file: TextIO | None = None) -> int:
    """Print one line per check; 0 when every required check passed, else 1."""
    checks = doctor() if checks is None else checks
    file = file or sys.stdout
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok" if c.ok else ("--" if c.optional else "FAIL")
        print(f"[{mark:>4}] {c.name:<{width}}  {c.message}", file=file)
    failed = [c.name for c in checks if not c.ok and not c.optional]
    print(f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "everything the live avatar needs is here",
          file=file)
    return 1 if failed else 0
