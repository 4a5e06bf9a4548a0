"""Watermark benchmark: detection per 2-second clip after the attacks a video call or a re-upload does,
false positives on unmarked content, embedding time and PSNR. Writes benchmarks/results/watermark.json.

    PYTHONPATH=. python benchmarks/watermark.py            # about 10-15 min on the 2-core CPU
    PYTHONPATH=. python benchmarks/watermark.py --quick    # a smoke run

Marked content: talking-head-like clips (80 frames = 2 s at 40 FPS) made from portraits and other
photos with small per-frame changes (sub-pixel head sway, small rotation and zoom, a mouth-region
stretch at a syllable rhythm, a 1-level flicker), each with its own random payload. Real renders
can replace them with --video FILE (repeatable): each file is cut into 2-second clips.

False positives: (1) the product key on unmarked clips, photos and other video after the same
attacks; (2) for a statistic with thousands of trials, many random keys on the same unmarked
content (the detector's reference pattern is the only key-dependent part, so each key is an
independent draw of the null statistic) — compared with the analytic bound at several levels.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar import watermark as W  # noqa: E402
from avatar.constants import FPS, FRAME_SIZE  # noqa: E402

CLIP = 2 * FPS  # frames per 2-second clip
RESULTS = ROOT / "benchmarks" / "results" / "watermark.json"
GOALS = {"detection_rate": 0.95, "false_positive_rate": 0.01, "embed_ms": 2.0, "psnr_db": 40.0}


# --- content -------------------------------------------------------------------------------------

def square(img: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def photos() -> dict[str, np.ndarray]:
    """Portraits we ship or test with, then other photos bundled with scikit-image when it is there."""
    paths = [ROOT / "avatar" / "assets" / "astronaut.png"]
    paths += sorted(p for p in (ROOT / "tests" / "data" / "faces").glob("*")
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        paths += [data / n for n in ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                                     "hubble_deep_field.jpg", "camera.png") if (data / n).exists()]
    except ImportError:
        pass
    out = {}
    for p in paths:
        img = np.asarray(Image.open(p).convert("RGB"))
        out[p.stem] = square(img)
    return out


def talking_clip(img: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * np.pi, 6)
    h, w = img.shape[:2]
    frames = []
    for i in range(n):
        t = i / FPS
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.5 * np.sin(2 * np.pi * 0.3 * t + ph[0]),
                                    1 + 0.004 * np.sin(2 * np.pi * 0.4 * t + ph[1]))
        m[:, 2] += (1.2 * np.sin(2 * np.pi * 0.7 * t + ph[2]), 0.8 * np.sin(2 * np.pi * 0.5 * t + ph[3]))
        f = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        y0, y1, x0, x1 = int(h * 0.55), int(h * 0.8), int(w * 0.35), int(w * 0.65)
        open_ = 1 + 0.08 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + ph[4]))
        f[y0:y1, x0:x1] = cv2.resize(f[y0:y1, x0:x1], (x1 - x0, int((y1 - y0) * open_)))[: y1 - y0]
        flicker = int(round(rng.normal(0, 0.7)))
        frames.append(np.clip(f.astype(np.int16) + flicker, 0, 255).astype(np.uint8))
    return frames


def synthetic_video(n: int, seed: int) -> list[np.ndarray]:
    """Natural-looking other video: coloured 1/f texture panning, with soft moving shapes and noise."""
    rng = np.random.default_rng(seed)
    size = FRAME_SIZE + 4 * n
    f = np.fft.fftfreq(size)
    radius = np.maximum(np.hypot(f[:, None], f[None, :]), 1.0 / size)
    planes = []
    for _ in range(3):
        tex = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) / radius ** rng.uniform(0.9, 1.2)).real
        planes.append((tex - tex.mean()) / tex.std())
    mix = rng.uniform(0.3, 1.0, (3, 3))
    base = np.clip(np.tensordot(np.stack(planes, -1), mix, axes=1) * 30 + rng.uniform(80, 170, 3), 0, 255)
    dx, dy = rng.uniform(-2, 2, 2) + 2
    out = []
    for i in range(n):
        x, y = int(dx * i), int(dy * i)
        img = np.ascontiguousarray(base[y:y + FRAME_SIZE, x:x + FRAME_SIZE]).astype(np.float32)
        cx, cy = 256 + 80 * np.sin(i / 13 + seed), 256 + 60 * np.cos(i / 17 + seed)
        cv2.circle(img, (int(cx), int(cy)), 60, tuple(float(v) for v in rng.uniform(40, 220, 3)), -1, cv2.LINE_AA)
        img = cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 1.5, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def panning_video(img: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Other video from a photo: a slow camera pan and zoom."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    out = []
    for i in range(n):
        s = 1.1 + 0.002 * i
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.05 * i, s)
        m[:, 2] += rng.uniform(-0.3, 0.3, 2) + (0.8 * i, 0.4 * i)
        out.append(cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def video_clips(path: Path) -> list[list[np.ndarray]]:
    """A real render cut into 2-second clips of 512 x 512 RGB frames."""
    clips, cur = [], []
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            cur.append(square(frame.to_ndarray(format="rgb24")))
            if len(cur) == CLIP:
                clips.append(cur)
                cur = []
    return clips


# --- attacks -------------------------------------------------------------------------------------

def h264(frames: list[np.ndarray], bit_rate: int, size: int | None = None) -> list[np.ndarray]:
    """Encode with libx264 (veryfast, one-pass ABR as real-time senders use), decode back."""
    size = size or frames[0].shape[0]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width = s.height = size
        s.pix_fmt, s.bit_rate = "yuv420p", bit_rate
        s.codec_context.options = {"preset": "veryfast"}
        s.codec_context.thread_count = 1
        for i, f in enumerate(frames):
            if f.shape[0] != size:
                f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    buf.seek(0)
    with av.open(buf) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def downscale(frames, size=360, back=True):
    out = []
    for f in frames:
        s = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.resize(s, f.shape[1::-1], interpolation=cv2.INTER_LINEAR) if back else s)
    return out


def jpeg(frames, quality=50):
    out = []
    for f in frames:
        ok, b = cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.append(cv2.imdecode(b, cv2.IMREAD_COLOR)[:, :, ::-1])
    return out


def crop(frames, frac=0.05, back=True, seed=0):
    """Cut `frac` of the width and height (at a random offset); resize back to the original or not."""
    rng = np.random.default_rng(seed)
    h, w = frames[0].shape[:2]
    ch, cw = round(h * (1 - frac)), round(w * (1 - frac))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = []
    for f in frames:
        c = np.ascontiguousarray(f[y0:y0 + ch, x0:x0 + cw])
        out.append(cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) if back else c)
    return out


ATTACKS = {
    "none": lambda fr, s: fr,
    "h264_1mbps": lambda fr, s: h264(fr, 1_000_000),
    "h264_300kbps": lambda fr, s: h264(fr, 300_000),
    "360p_and_back": lambda fr, s: downscale(fr, 360, back=True),
    "jpeg_q50": lambda fr, s: jpeg(fr, 50),
    "crop5_resized_back": lambda fr, s: crop(fr, 0.05, back=True, seed=s),
    "crop5_not_resized": lambda fr, s: crop(fr, 0.05, back=False, seed=s),
    "360p_h264_300kbps": lambda fr, s: h264(fr, 300_000, size=360),
    "360p_h264_300kbps_crop5": lambda fr, s: crop(h264(fr, 300_000, size=360), 0.05, back=True, seed=s),
}
NULL_ATTACKS = ("none", "h264_300kbps", "360p_h264_300kbps")


# --- statistics ----------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0 ** 2 / float(np.mean((a.astype(np.float64) - b) ** 2)))


def accumulate(frames) -> W.Accumulator:
    acc = W.Accumulator()
    for f in frames:
        acc.add(f)
    return acc


# --- the measurements ----------------------------------------------------------------------------

def embed_timing(img: np.ndarray, n: int) -> dict:
    frames = talking_clip(img, 40, seed=99)
    wm = W.Watermarker(W.Payload(W.PRODUCT_ID, 0x123456, 1000))
    for f in frames[:16]:  # warm-up: first-call allocations are not a per-frame cost
        wm.embed(f.copy())
    wall, cpu = [], []
    for i in range(n):
        f = frames[i % len(frames)].copy()
        c, t = time.process_time(), time.perf_counter()
        wm.embed(f)
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    t, c = np.array(wall), np.array(cpu)
    refresh = np.arange(0, n, W.GAIN_REFRESH)
    # CPU time of this process (all its threads) is what the embedding costs; wall time on a shared
    # machine also holds the waits for a core that other jobs had.
    return {"frames": n, "mean_ms": float(t.mean()), "median_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)), "max_ms": float(t.max()),
            "gain_refresh_frames_median_ms": float(np.median(t[refresh])),
            "other_frames_median_ms": float(np.median(np.delete(t, refresh))),
            "cpu_mean_ms": float(c.mean()), "cpu_p99_ms": float(np.percentile(c, 99)), "cpu_max_ms": float(c.max()),
            "cpu_gain_refresh_frames_median_ms": float(np.median(c[refresh])),
            "cpu_other_frames_median_ms": float(np.median(np.delete(c, refresh))),
            "gain_refresh_every": W.GAIN_REFRESH, "load_average_1min": os.getloadavg()[0],
            "opencv_threads": cv2.getNumThreads(), "warm_up_frames_excluded": 16}


def badge_timing(img: np.ndarray, n: int) -> dict:
    from avatar.badge import Badge

    badge, frame = Badge(), img.copy()
    for _ in range(16):
        badge.apply(frame)
    t = []
    for _ in range(n):
        s = time.perf_counter()
        badge.apply(frame)
        t.append((time.perf_counter() - s) * 1e3)
    return {"frames": n, "median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
            "size_px": [badge.width, badge.height]}


def detection(clips: list[tuple[str, int, Callable[[], list[np.ndarray]], W.Payload | None]], log) -> tuple[dict, list[float]]:
    rng = np.random.default_rng(1)
    per = {a: {"present": 0, "payload_ok": 0, "z": [], "seconds": []} for a in ATTACKS}
    psnrs = []
    for name, seed, make, premarked in clips:
        frames = make()
        payload = W.Payload(W.PRODUCT_ID, int(rng.integers(0, 1 << W.INSTALL_BITS)),
                            int(rng.integers(0, 1 << W.HOUR_BITS)))
        if premarked is not None:
            payload, marked = premarked, frames
        else:
            wm = W.Watermarker(payload)
            marked = [wm.embed(f.copy()) for f in frames]
            psnrs += [psnr(m, f) for m, f in zip(marked, frames)]
        line = []
        for a, attack in ATTACKS.items():
            attacked = attack(marked, seed)
            t = time.perf_counter()
            d = W.detect(attacked)
            per[a]["seconds"].append(time.perf_counter() - t)
            per[a]["present"] += d.present
            per[a]["payload_ok"] += d.payload == payload
            per[a]["z"].append(d.z)
            line.append(f"{a}={d.z:.1f}{'+' if d.payload == payload else ('?' if d.present else '-')}")
        log(f"  {name}/{seed}: " + " ".join(line))
    out = {}
    for a, r in per.items():
        n = len(r["z"])
        lo, _ = wilson(r["present"], n)
        out[a] = {"clips": n, "detection_rate": r["present"] / n, "detection_rate_95ci_low": lo,
                  "payload_rate": r["payload_ok"] / n, "z_min": float(min(r["z"])),
                  "z_median": float(np.median(r["z"])), "detect_seconds_median": float(np.median(r["seconds"]))}
    return out, psnrs


def false_positives(null_contents: dict[str, list[np.ndarray]], keys: int, log) -> dict:
    # (1) the product key on every unmarked clip, photo and video, after the call-like attacks
    product = {"trials": 0, "present": 0, "z_max": 0.0}
    accs = {}
    for name, frames in null_contents.items():
        for a in NULL_ATTACKS if len(frames) > 1 else ("none", "jpeg_q50"):
            attacked = ATTACKS[a](frames, 0)
            acc = accumulate(attacked)
            d = W.detect_accumulated(acc)
            product["trials"] += 1
            product["present"] += d.present
            product["z_max"] = max(product["z_max"], d.z)
            accs[f"{name}|{a}"] = acc
    product["rate"] = product["present"] / product["trials"]
    log(f"  product key: {product['present']}/{product['trials']} false detections, max z {product['z_max']:.2f}")
    # (2) many keys on the same content: thousands of draws of the null statistic
    zs = []
    t = time.perf_counter()
    for name, acc in accs.items():
        cache: dict = {}
        for k in range(keys):
            ref = np.conj(np.fft.rfft2(W._patterns(f"null trial {k}".encode())[0])).astype(np.complex64)
            zs.append(W.search(acc.sum, ref, cache)[0])
    zs = np.array(zs)
    log(f"  {len(zs)} keyed null trials in {time.perf_counter() - t:.0f} s: z mean {zs.mean():.2f} "
        f"sd {zs.std():.2f} max {zs.max():.2f}")
    levels = {}
    for level in (5.0, 5.5, 6.0, W.Z_THRESHOLD):
        k = int((zs >= level).sum())
        levels[f"{level:.1f}"] = {"empirical": k / len(zs), "empirical_95ci_high": wilson(k, len(zs))[1],
                                  "analytic_bound": W.false_alarm_probability(level), "count": k}
    k = int((zs >= W.Z_THRESHOLD).sum())
    return {"product_key": product,
            "keyed_trials": {"trials": int(len(zs)), "contents": len(accs), "keys_per_content": keys,
                             "z_mean": float(zs.mean()), "z_sd": float(zs.std()), "z_max": float(zs.max()),
                             "exceedance": levels},
            "rate_at_threshold": k / len(zs), "rate_at_threshold_95ci_high": wilson(k, len(zs))[1],
            "analytic_rate_at_threshold": W.false_alarm_probability(W.Z_THRESHOLD)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="clips per photo (default 3)")
    ap.add_argument("--keys", type=int, default=100, help="random keys per unmarked content (default 100)")
    ap.add_argument("--video", type=Path, action="append", default=[], help="a real render to use as well")
    ap.add_argument("--quick", action="store_true", help="2 photos, 1 seed, 20 keys: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--timing-only", action="store_true", help="re-measure the embedding time into --out only")
    ap.add_argument("--visual", type=Path, default=None,
                    help="write unmarked | marked | 4x difference PNGs of each photo into this folder and stop")
    args = ap.parse_args()
    if args.visual:
        args.visual.mkdir(parents=True, exist_ok=True)
        for name, img in photos().items():
            marked = W.Watermarker(W.Payload(W.PRODUCT_ID, 0x3F2A1B, 1000)).embed(img.copy())
            diff = np.clip(128 + 4 * (marked.astype(np.int16) - img), 0, 255).astype(np.uint8)
            Image.fromarray(np.concatenate([img, marked, diff], axis=1)).save(args.visual / f"{name}.png")
            print(f"{args.visual / name}.png: PSNR {psnr(marked, img):.1f} dB")
        return 0
    if args.timing_only:
        result = json.loads(args.out.read_text())
        img = next(iter(photos().values()))
        result["embed"] = timing = embed_timing(img, 2000)
        result["badge"] = badge_timing(img, 2000)
        result["goals"]["embed_mean_ms<=2"] = timing["mean_ms"] <= GOALS["embed_ms"]
        result["goals"]["embed_cpu_p99_ms<=2"] = timing["cpu_p99_ms"] <= GOALS["embed_ms"]
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(timing, indent=2))
        return 0
    if args.quick:
        args.seeds, args.keys = 1, 20
    log = lambda s: print(s, flush=True)  # noqa: E731
    started = time.perf_counter()
    imgs = photos()
    if args.quick:
        imgs = dict(list(imgs.items())[:2])
    # Clips are made when measured (a callable each): 76 clips held at once took 6 GB.
    clips = [(name, seed, lambda img=img, seed=seed: talking_clip(img, CLIP, seed), None)
             for name, img in imgs.items() for seed in range(args.seeds)]
    null = {f"{name}/{seed}": talking_clip(img, CLIP, 100 + seed) for name, img in imgs.items()
            for seed in range(min(2, args.seeds))}
    null.update({f"photo:{name}": [img] for name, img in imgs.items()})
    null.update({f"synthetic/{s}": synthetic_video(CLIP, s) for s in range(2 if args.quick else 6)})
    null.update({f"pan:{name}": panning_video(img, CLIP, 7) for name, img in list(imgs.items())[:4]})
    for path in args.video:
        real = video_clips(path)
        found = W.detect(real[0]) if real else None
        if found is not None and found.present:  # a render that already carries the mark: attack it as is
            log(f"  {path.name}: already marked ({found.payload}); its clips are attacked without re-marking")
            clips += [(path.name, i, lambda c=c: c, found.payload) for i, c in enumerate(real)]
        else:  # an unmarked render: mark it here, and its first clips are unmarked content too
            clips += [(path.name, i, lambda c=c: c, None) for i, c in enumerate(real)]
            null.update({f"{path.name}/{i}": c for i, c in enumerate(real[:2])})
    log(f"embedding time on {len(imgs)} photos ...")
    timing = embed_timing(next(iter(imgs.values())), 400 if not args.quick else 80)
    log(f"  {timing}")
    log(f"detection on {len(clips)} clips x {len(ATTACKS)} attacks ...")
    det, psnrs = detection(clips, log)
    log("false positives ...")
    fp = false_positives(null, args.keys, log)
    worst = min(r["detection_rate"] for r in det.values())
    result = {
        "what": "VASA Avatar invisible watermark: detection per 2-second clip (80 frames) after attacks, "
                "false positives, embedding cost, PSNR",
        "content": {"photos": list(imgs), "clips": len(clips), "frames_per_clip": CLIP,
                    "videos": [str(p) for p in args.video],
                    "note": "talking-head-like clips synthesised from still photos; rerun with --video on real renders"},
        "scheme": {"tile_px": W.TILE, "band_cycles_per_px": list(W.BAND), "symbols": W.SYMBOLS,
                   "symbol_bits": W.SYMBOL_BITS, "payload_bits": W.PAYLOAD_BITS, "amplitude_rms": W.AMPLITUDE,
                   "gain_range": list(W.GAIN_RANGE), "scales_searched": [float(W.SCALES[0]), float(W.SCALES[-1])],
                   "z_threshold": W.Z_THRESHOLD},
        "detection": det,
        "false_positives": fp,
        "embed": timing,
        "badge": badge_timing(next(iter(imgs.values())), 1000),
        "psnr_db": {"mean": float(np.mean(psnrs)), "min": float(np.min(psnrs)), "frames": len(psnrs)},
        "goals": {
            "detection_rate>=0.95_each_attack": worst >= GOALS["detection_rate"],
            "false_positive_rate<=0.01": fp["rate_at_threshold_95ci_high"] <= GOALS["false_positive_rate"]
            and fp["product_key"]["present"] == 0,
            "embed_mean_ms<=2": timing["mean_ms"] <= GOALS["embed_ms"],
            "embed_cpu_p99_ms<=2": timing["cpu_p99_ms"] <= GOALS["embed_ms"],
            "psnr_min>=40dB": float(np.min(psnrs)) >= GOALS["psnr_db"],
        },
        "machine": {"cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
                    "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                    "note": "2 shared cores; other engineers' jobs ran at the same time, timings are pessimistic"},
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}: worst detection rate {worst:.3f}, FPR at threshold "
        f"{fp['rate_at_threshold']:.4f} (95% CI high {fp['rate_at_threshold_95ci_high']:.4f}), "
        f"embed {timing['mean_ms']:.2f} ms mean / {timing['max_ms']:.2f} ms max, PSNR min {np.min(psnrs):.1f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
