"""`vasa-avatar`: the command line. Parses flags, calls the library, prints one line per problem.

An AvatarError is the user's to fix: printed as `error: <message>` with no traceback, exit 1.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from avatar.errors import AvatarError

ASSETS = resources.files("avatar") / "assets"
DEFAULT_PORTRAIT = ASSETS / "astronaut.png"
DEFAULT_AUDIO = ASSETS / "voice.wav"


def _add_motion_flags(p: argparse.ArgumentParser) -> None:
    from avatar.controls import MOODS

    p.add_argument("--mood", default="neutral", choices=sorted(MOODS), help="mood preset (default: neutral)")
    p.add_argument("--seed", type=int, default=0, help="seed for blinks, head motion and gaze (default: 0)")
    p.add_argument("--gaze", default="camera",
                   help="gaze target: camera, wander, left, right, up, down, or YAW,PITCH in degrees")
    p.add_argument("--head-yaw", type=float, default=0.0, help="head angle offset, degrees (+ = viewer's right)")
    p.add_argument("--head-pitch", type=float, default=0.0, help="head angle offset, degrees (+ = chin down)")
    p.add_argument("--head-roll", type=float, default=0.0, help="head tilt offset, degrees")
    p.add_argument("--head-distance", type=float, default=1.0,
                   help="framing: 1.0 head and shoulders, smaller is closer (0.6..1.6)")
    p.add_argument("--expressiveness", type=float, default=1.0, help="motion intensity 0..2 (default 1)")
    p.add_argument("--blink-rate", type=float, default=None, help="blinks per minute (default: the mood's)")
    p.add_argument("--audio-model", default="trained", choices=("trained", "dsp"),
                   help="audio encoder: the trained network or the DSP baseline")
    p.add_argument("--motion-model", default="generator", choices=("generator", "baseline"),
                   help="motion: the generator or the loudness baseline")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face to use when the photo has several (0 = largest)")


def _controls(args: argparse.Namespace):
    from avatar.controls import Controls, parse_gaze

    return Controls(mood=args.mood, gaze=parse_gaze(args.gaze), head_yaw=args.head_yaw, head_pitch=args.head_pitch,
                    head_roll=args.head_roll, head_distance=args.head_distance,
                    expressiveness=args.expressiveness, blink_rate=args.blink_rate, seed=args.seed)


def _render(args: argparse.Namespace) -> int:
    from avatar.render import render_file

    result = render_file(portrait=Path(args.portrait), audio=Path(args.audio), output=Path(args.output),
                         controls=_controls(args), audio_model=args.audio_model, motion_model=args.motion_model,
                         face_index=args.face_index, progress=not args.quiet)
    print(f"wrote {result.output}: {result.frames} frames, {result.audio_seconds:.2f} s of audio, "
          f"rendered in {result.wall_seconds:.1f} s ({result.real_time_factor:.2f}x real time)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.portrait, args.audio = str(DEFAULT_PORTRAIT), str(DEFAULT_AUDIO)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vasa-avatar", description=__doc__.splitlines()[0])
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
    _add_motion_flags(p)
    p.set_defaults(run=_render)

    p = sub.add_parser("sweep", help="contact sheet: every motion channel at several values")
    p.add_argument("--portrait", default=str(DEFAULT_PORTRAIT), help="photo (default: the bundled portrait)")
    p.add_argument("-o", "--output", default="sweep.png", help="output PNG (default: sweep.png)")
    p.add_argument("--values", type=int, default=5, help="values per channel (default 5)")
    p.add_argument("--head-distance", type=float, default=1.0, help="framing (default 1.0)")
    p.add_argument("--face-index", type=int, default=None, help="which face when there are several")
    p.set_defaults(run=_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
