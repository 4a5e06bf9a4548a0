"""`vasa-avatar`: the command line. Parses flags, calls the library, prints one line per problem.

An AvatarError is the user's to fix: printed as `error: <message>` with no traceback, exit 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from avatar.bench import add_engine_arguments
from avatar.errors import AvatarError
from avatar.memory import steady_heap

ASSETS = resources.files("avatar") / "assets"
DEFAULT_PORTRAIT = ASSETS / "astronaut.png"
DEFAULT_AUDIO = ASSETS / "voice.wav"


def _add_motion_flags(p: argparse.ArgumentParser, *, live: bool = False) -> None:
    """Motion controls. For `run` the defaults are None: the saved tray settings fill them in."""
    from avatar.controls import MOODS

    p.add_argument("--mood", default=None if live else "neutral", choices=sorted(MOODS),
                   help="mood preset (default: neutral)")
    p.add_argument("--seed", type=int, default=0, help="seed for blinks, head motion and gaze (default: 0)")
    p.add_argument("--gaze", default=None if live else "camera",
                   help="gaze target: camera, wander, left, right, up, down, or YAW,PITCH in degrees")
    p.add_argument("--head-yaw", type=float, default=0.0, help="head angle offset, degrees (+ = viewer's right)")
    p.add_argument("--head-pitch", type=float, default=0.0, help="head angle offset, degrees (+ = chin down)")
    p.add_argument("--head-roll", type=float, default=0.0, help="head tilt offset, degrees")
    p.add_argument("--head-distance", type=float, default=None if live else 1.0,
                   help="framing: 1.0 head and shoulders, smaller is closer (0.6..1.6)")
    p.add_argument("--expressiveness", type=float, default=None if live else 1.0, help="motion intensity 0..2 (default 1)")
    p.add_argument("--blink-rate", type=float, default=None, help="blinks per minute (default: the mood's)")
    p.add_argument("--audio-model", default="auto", choices=("auto", "trained", "dsp"),
                   help="audio encoder: the trained network or the DSP baseline")
    p.add_argument("--motion-model", default="generator", choices=("generator", "baseline"),
                   help="motion: the generator or the loudness baseline")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face to use when the photo has several (0 = largest)")
    p.add_argument("--no-badge", action="store_true",
                   help="leave out the visible AI disclosure badge (logged; the invisible watermark stays)")


def _controls(args: argparse.Namespace, settings=None):
    """Controls from the flags; with `settings` (for `run`), flags left out take the saved ones."""
    from avatar.controls import Controls, parse_gaze

    base = settings.to_controls() if settings is not None else Controls()
    pick = lambda flag, saved: saved if flag is None else flag  # noqa: E731
    return Controls(mood=pick(args.mood, base.mood), gaze=parse_gaze(args.gaze) if args.gaze else base.gaze,
                    head_yaw=args.head_yaw, head_pitch=args.head_pitch, head_roll=args.head_roll,
                    head_distance=pick(args.head_distance, base.head_distance),
                    expressiveness=pick(args.expressiveness, base.expressiveness),
                    blink_rate=args.blink_rate, seed=args.seed)


def _render(args: argparse.Namespace) -> int:
    import torch

    from avatar.render import render_file

    # one torch thread for the engines, the other core for the H.264 encoder thread: on two cores
    # two torch threads fighting x264 measured several times slower (ARCHITECTURE §4)
    torch.set_num_threads(1)

    result = render_file(portrait=Path(args.portrait), audio=Path(args.audio), output=Path(args.output),
                         controls=_controls(args), audio_model=args.audio_model, motion_model=args.motion_model,
                         face_index=args.face_index, badge=not args.no_badge, progress=not args.quiet,
                         runtime=args.backend)
    print(f"wrote {result.output}: {result.frames} frames, {result.audio_seconds:.2f} s of audio, "
          f"rendered in {result.wall_seconds:.1f} s ({result.real_time_factor:.2f}x real time)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.portrait, args.audio, args.backend = str(DEFAULT_PORTRAIT), str(DEFAULT_AUDIO), "auto"
    return _render(args)


def _sweep(args: argparse.Namespace) -> int:
    from PIL import Image

    from avatar.rig import load_rig
    from avatar.sweep import render_sweep

    rig = load_rig(Path(args.portrait), head_distance=args.head_distance, face_index=args.face_index)
    sheet = render_sweep(rig, values=args.values)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise AvatarError(f"cannot write {out}: folder {out.parent} does not exist")
    Image.fromarray(sheet).save(out)
    print(f"wrote {out}: {sheet.shape[1]}x{sheet.shape[0]} contact sheet")
    return 0


def _run(args: argparse.Namespace) -> int:
    from avatar.live import describe_devices, run_live

    if args.list_devices:
        print(describe_devices())
        return 0
    from avatar import library
    from avatar.settings import load_settings

    settings = load_settings()
    portrait = args.portrait or str(library.resolve(settings.portrait).path)
    controls = _controls(args, settings)
    stats = run_live(portrait=portrait, controls=controls, mic=_device(args.mic if args.mic is not None else settings.mic),
                     camera=not args.no_camera, camera_backend=args.camera_backend, preview=args.preview or settings.preview,
                     delayed_mic=_device(args.delayed_mic), audio_model=args.audio_model, motion_model=args.motion_model,
                     face_index=args.face_index, runtime=args.backend, seconds=args.seconds,
                     badge=not args.no_badge and settings.badge)
    print(stats.summary())
    return 0


def _device(value: str | None) -> str | int | None:
    """A device given as a number is an index, anything else a name to search for."""
    return int(value) if value is not None and value.isdigit() else value


def _doctor(args: argparse.Namespace) -> int:
    from avatar.doctor import print_doctor

    return print_doctor()


def _verify(args: argparse.Namespace) -> int:
    from avatar.verify import format_detection, verify_file

    detection = verify_file(Path(args.file))
    print(f"{args.file}: {format_detection(detection)}")
    return 0 if detection.present else 2


def _bench(args: argparse.Namespace) -> int:
    if args.what == "engines":
        from avatar.bench import run_engines

        return run_engines(args)
    from avatar.live import bench_live

    out = args.out / "live.json"
    results = bench_live(audio=Path(args.audio), seconds=args.seconds, portrait=args.portrait and Path(args.portrait),
                         out=out)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (list, dict))}, indent=2))
    print(f"wrote {out}")
    return 0


def _portraits(args: argparse.Namespace) -> int:
    from avatar import library

    if args.action == "list":
        for entry in library.list_portraits():
            flag = f"  ({entry.problem})" if entry.problem else ""
            print(f"{entry.id:<24} {entry.name:<24} {entry.path}{flag}")
    elif args.action == "add":
        consent = args.i_have_consent or _ask_consent(args.photo)
        entry = library.add_portrait(args.photo, consent=consent, name=args.name)
        print(f"added {entry.id}: {entry.path}")
    else:
        entry = library.remove_portrait(args.id)
        print(f"removed {entry.id}")
    return 0


def _ask_consent(photo: str) -> bool:
    """Ask on the terminal; scripts without a terminal must pass --i-have-consent."""
    if not sys.stdin.isatty():
        raise AvatarError("adding a portrait needs the depicted person's consent: pass --i-have-consent to confirm it")
    answer = input(f"Do you have the consent of the person in {photo} to animate their face? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vasa-avatar", description="VASA Avatar: one photo plus a voice becomes a talking face, as a video file or a live virtual camera.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="render the bundled portrait speaking the bundled clip to demo.mp4")
    p.add_argument("-o", "--output", default="demo.mp4", help="output mp4 (default: demo.mp4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_motion_flags(p)
    p.set_defaults(run=_demo)

    p = sub.add_parser("render", help="render a portrait speaking an audio file to an mp4")
    p.add_argument("--portrait", required=True, help="photo of one face (jpg, png, webp, bmp)")
    p.add_argument("--audio", required=True, help="speech audio (wav, flac, mp3, m4a, ogg, ...)")
    p.add_argument("-o", "--output", required=True, help="output mp4")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--backend", default="auto", help="engine back-end: auto (a GPU's when there is one), torch, "
                                                     "onnxruntime, tensorrt")
    _add_motion_flags(p)
    p.set_defaults(run=_render)

    p = sub.add_parser("sweep", help="contact sheet: every motion channel at several values")
    p.add_argument("--portrait", default=str(DEFAULT_PORTRAIT), help="photo (default: the bundled portrait)")
    p.add_argument("-o", "--output", default="sweep.png", help="output PNG (default: sweep.png)")
    p.add_argument("--values", type=int, default=5, help="values per channel (default 5)")
    p.add_argument("--head-distance", type=float, default=1.0, help="framing (default 1.0)")
    p.add_argument("--face-index", type=int, default=None, help="which face when there are several")
    p.set_defaults(run=_sweep)

    p = sub.add_parser("run", help="live: the microphone drives the portrait on the \"VASA Avatar\" virtual camera")
    p.add_argument("--portrait", default=None, help="photo (default: the one chosen in the tray, else the bundled one)")
    p.add_argument("--mic", default=None, help="microphone: a name (or part of one) or an index (see --list-devices)")
    p.add_argument("--list-devices", action="store_true", help="list microphones and camera back-ends, then exit")
    p.add_argument("--preview", action="store_true", help="show the output in a window (works without a camera)")
    p.add_argument("--no-camera", action="store_true", help="no virtual camera (with --preview: try it out)")
    p.add_argument("--camera-backend", default=None, help="pyvirtualcam back-end (default: this OS's)")
    p.add_argument("--backend", default="auto", help="engine back-end: auto, torch, onnxruntime, tensorrt")
    p.add_argument("--delayed-mic", default=None,
                   help="play the microphone, delayed to match the video, into this output device")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl+C)")
    _add_motion_flags(p, live=True)
    p.set_defaults(run=_run)

    p = sub.add_parser("doctor", help="check microphone, virtual camera, GPU and engines; say what to fix")
    p.set_defaults(run=_doctor)

    p = sub.add_parser("verify", help="is the VASA Avatar watermark in this image or video?")
    p.add_argument("file", help="an image (png, jpg, webp) or a video (mp4, webm, mkv, ...)")
    p.set_defaults(run=_verify)

    p = sub.add_parser("bench", help="benchmarks (results as JSON under benchmarks/results/)")
    bench = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    b = bench.add_parser("engines", help="ms per frame per engine and for the whole frame")
    add_engine_arguments(b)
    b.set_defaults(run=_bench)
    b = bench.add_parser("live", help="a file through a fake microphone into a fake camera, at real-time pace")
    b.add_argument("--audio", default=str(DEFAULT_AUDIO), help="speech to play (looped to --seconds)")
    b.add_argument("--seconds", type=float, default=30.0)
    b.add_argument("--portrait", default=None)
    b.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    b.set_defaults(run=_bench)

    p = sub.add_parser("portraits", help="the portrait library the tray and `run` choose from")
    acts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    acts.add_parser("list", help="list portraits")
    a = acts.add_parser("add", help="add a photo (asks to confirm the person's consent)")
    a.add_argument("photo")
    a.add_argument("--name", default=None)
    a.add_argument("--i-have-consent", action="store_true",
                   help="confirm you have the depicted person's consent (for scripts)")
    r = acts.add_parser("remove", help="remove a portrait")
    r.add_argument("id")
    p.set_defaults(run=_portraits)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steady_heap()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # mediapipe's C++ logging is noise for users; errors still surface as exceptions
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.run(args)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
