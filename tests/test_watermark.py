"""Invisible watermark: payload, embedding quality, detection after common attacks, verify_file."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from avatar.errors import AvatarError
from avatar.media import VideoWriter
from avatar.verify import format_detection, verify_file
from avatar.watermark import (EPOCH, PAYLOAD_BITS, Z_THRESHOLD, Detection, Payload, Watermarker, detect,
                              false_alarm_probability, hour_bucket, load_install_id)

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT = ROOT / "avatar" / "assets" / "astronaut.png"
FACES = sorted(p for p in (ROOT / "tests" / "data" / "faces").glob("*")
               if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
PAYLOAD = Payload(1, 0x3F2A1B, hour_bucket(datetime(2026, 11, 27, 14, 30, tzinfo=timezone.utc)))


def portrait(path: Path = ASTRONAUT, size: int = 512) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def talking_clip(img: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """Frames with a talking head's small changes: sub-pixel head sway and a mouth-region stretch."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, 4)
    h, w = img.shape[:2]
    frames = []
    for i in range(n):
        t = i / 40
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 0.5 * np.sin(2 * np.pi * 0.3 * t + phase[0]), 1.0)
        m[:, 2] += (1.2 * np.sin(2 * np.pi * 0.7 * t + phase[1]), 0.8 * np.sin(2 * np.pi * 0.5 * t + phase[2]))
        f = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        y0, y1, x0, x1 = int(h * 0.55), int(h * 0.8), int(w * 0.35), int(w * 0.65)
        open_ = 1 + 0.08 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + phase[3]))
        f[y0:y1, x0:x1] = cv2.resize(f[y0:y1, x0:x1], (x1 - x0, int((y1 - y0) * open_)))[: y1 - y0]
        frames.append(f)
    return frames


def mark(frames: list[np.ndarray], payload: Payload = PAYLOAD) -> list[np.ndarray]:
    wm = Watermarker(payload)
    return [wm.embed(f.copy()) for f in frames]


def h264_round_trip(frames: list[np.ndarray], bit_rate: int) -> list[np.ndarray]:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=40)
        s.width, s.height, s.pix_fmt, s.bit_rate = 512, 512, "yuv420p", bit_rate
        s.codec_context.options = {"preset": "veryfast"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    buf.seek(0)
    with av.open(buf) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return talking_clip(portrait(), 40, seed=1)


# --- payload -------------------------------------------------------------------------------------

def test_payload_int_round_trip_and_crc_rejects_any_single_bit_flip():
    value = PAYLOAD.to_int()
    assert value < 1 << PAYLOAD_BITS
    assert Payload.from_int(value) == PAYLOAD
    for bit in range(PAYLOAD_BITS):
        assert Payload.from_int(value ^ (1 << bit)) is None, bit


def test_payload_fields_are_range_checked():
    with pytest.raises(ValueError):
        Payload(1, 1 << 24, 0)
    with pytest.raises(ValueError):
        Payload(1, 0, -1)


def test_hour_bucket_and_made_at_pick_the_latest_matching_hour():
    when = datetime(2026, 11, 27, 14, 59, tzinfo=timezone.utc)
    p = Payload.now(0x123456, when=when)
    assert p.hour == (when - EPOCH).days * 24 + 14
    assert p.made_at(now=datetime(2026, 12, 1, tzinfo=timezone.utc)) == datetime(2026, 11, 27, 14, tzinfo=timezone.utc)
    # After the 2**16-hour wrap (7.5 years) the same bucket means the later date.
    later = datetime(2034, 1, 1, tzinfo=timezone.utc)
    assert (later - p.made_at(now=later)).total_seconds() < (1 << 16) * 3600


def test_install_id_is_made_once_and_kept(tmp_path):
    first = load_install_id(tmp_path / "cfg")
    assert 0 <= first < 1 << 24
    assert load_install_id(tmp_path / "cfg") == first
    assert (tmp_path / "cfg" / "install_id").read_text().strip() == f"{first:06x}"
    assert not [p for p in (tmp_path / "cfg").iterdir() if p.name != "install_id"]  # no temp file left
    (tmp_path / "cfg" / "install_id").write_text("not hex\n")  # a damaged file is replaced, and kept
    renewed = load_install_id(tmp_path / "cfg")
    assert 0 <= renewed < 1 << 24 and load_install_id(tmp_path / "cfg") == renewed


# --- embedding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [ASTRONAUT, *FACES], ids=lambda p: p.name)
def test_embedding_is_invisible_by_psnr_and_changes_luma_only(path):
    frames = talking_clip(portrait(path), 12, seed=2)
    marked = mark(frames)
    values = [psnr(m, f) for m, f in zip(marked, frames)]
    assert min(values) >= 40.0, values  # measured 40.5-40.7 dB
    d = marked[5].astype(int) - frames[5]
    unclipped = (frames[5] > 30).all(axis=2) & (frames[5] < 225).all(axis=2)
    assert np.array_equal(d[unclipped, 0], d[unclipped, 1]) and np.array_equal(d[unclipped, 0], d[unclipped, 2])
    assert np.abs(d).max() <= 30  # no pixel is visibly off


def test_embed_marks_a_non_contiguous_view_in_place():
    frame = portrait()
    buffer = np.zeros((512, 600, 3), np.uint8)
    view = buffer[:, 44:556]
    view[...] = frame
    assert Watermarker(PAYLOAD).embed(view) is view
    assert np.array_equal(view, Watermarker(PAYLOAD).embed(frame.copy()))
    assert not buffer[:, :44].any() and not buffer[:, 556:].any()


def test_embed_rejects_wrong_frames():
    wm = Watermarker(PAYLOAD)
    with pytest.raises(ValueError, match="512, 512, 3"):
        wm.embed(np.zeros((512, 512, 3), np.float32))
    with pytest.raises(ValueError, match="512, 512, 3"):
        wm.embed(np.zeros((256, 256, 3), np.uint8))


# --- detection -----------------------------------------------------------------------------------

def test_round_trip_on_clean_frames(clip):
    d = detect(mark(clip[:8]))
    assert d.present and d.payload == PAYLOAD
    assert d.z >= 12.0  # measured 18-19 on clean frames; the threshold is 6
    assert abs(d.scale - 1.0) < 0.005
    assert d.confidence > 0.9999


def test_payload_survives_jpeg_quality_50(clip):
    frames = []
    for f in mark(clip[:8]):
        ok, buf = cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 50])
        frames.append(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
    d = detect(frames)
    assert d.present and d.payload == PAYLOAD
    assert d.z >= 10.0  # measured about 18


def test_payload_survives_h264_at_1_mbps(clip):
    d = detect(h264_round_trip(mark(clip), 1_000_000))
    assert d.present and d.payload == PAYLOAD
    assert d.z >= 10.0  # measured 17-18 on 80 frames


def test_payload_survives_a_5_percent_crop_resized_back(clip):
    cropped = [cv2.resize(f[7:493, 19:505], (512, 512), interpolation=cv2.INTER_LINEAR) for f in mark(clip[:8])]
    d = detect(cropped)
    assert d.present and d.payload == PAYLOAD
    assert d.scale == pytest.approx(512 / 486, rel=0.008)  # found within 0.4-0.6%


def synthetic_video(n: int, seed: int) -> list[np.ndarray]:
    """Natural-looking unmarked content: 1/f noise texture with a drifting bright blob."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(640)
    spec = np.fft.fft2(rng.standard_normal((640, 640))) / np.maximum(np.hypot(f[:, None], f[None, :]), 1 / 640)
    tex = np.fft.ifft2(spec).real
    tex = (tex - tex.mean()) / tex.std() * 40 + 120
    out = []
    for i in range(n):
        img = tex[i:i + 512, 2 * i:2 * i + 512].copy()
        cv2.circle(img, (200 + 3 * i, 260), 70, 230, -1, lineType=cv2.LINE_AA)
        out.append(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2))
    return out


def test_no_detection_on_unmarked_frames(clip):
    cases = {"astronaut clip": clip[:16], "astronaut h264": h264_round_trip(clip, 1_000_000)[:16],
             "synthetic video": synthetic_video(16, seed=3)}
    cases.update({p.name: [portrait(p)] for p in FACES})
    for name, frames in cases.items():
        d = detect(frames)
        assert not d.present and d.payload is None, name
        assert d.z < Z_THRESHOLD - 0.5, (name, d.z)  # the null's maximum: mean 4.8, sd 0.3 over keys
        assert d.confidence < 1 - false_alarm_probability(Z_THRESHOLD), name


def test_false_alarm_probability_is_the_union_bound():
    assert false_alarm_probability(Z_THRESHOLD) < 1e-3  # one clip in a thousand, by the bound
    assert false_alarm_probability(3.0) == 1.0
    assert false_alarm_probability(8.0, trials=1) == pytest.approx(6.2e-16, rel=0.01)


def test_detect_accepts_other_sizes_and_no_frames():
    assert detect([]) == Detection(False, 0.0, None)
    small = [cv2.resize(f, (360, 360), interpolation=cv2.INTER_AREA) for f in mark([portrait()] * 2)]
    d = detect(small)
    assert d.present and d.payload == PAYLOAD


# --- verify_file ---------------------------------------------------------------------------------

def test_verify_file_on_a_png(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(mark([portrait()])[0]).save(path)
    d = verify_file(path)
    assert d.present and d.payload == PAYLOAD
    line = format_detection(d, now=datetime(2026, 12, 1, tzinfo=timezone.utc))
    assert line.startswith("watermark present (confidence 1.0")
    assert line.endswith("VASA Avatar, install 3f2a1b, made 2026-11-27 ~14:00 UTC"), line


def test_verify_file_on_an_unmarked_png(tmp_path):
    path = tmp_path / "photo.webp"
    Image.fromarray(portrait()).save(path, quality=90)
    d = verify_file(path)
    assert not d.present
    assert format_detection(d).startswith("no VASA Avatar watermark found (confidence 0.")


def test_verify_file_on_a_short_mp4(tmp_path, clip):
    path = tmp_path / "clip.mp4"
    with VideoWriter(path) as w:
        for f in mark(clip):
            w.write(f)
    d = verify_file(path)
    assert d.present and d.payload == PAYLOAD
    assert d.frames == 40
    # A file longer than 4 x max_frames is sampled by seeking: here one run of 8 frames mid-file.
    d = verify_file(path, max_frames=8)
    assert d.present and d.payload == PAYLOAD
    assert d.frames == 8


@pytest.mark.parametrize("name,content", [("broken.png", b"\x89PNG\r\n\x1a\n garbage"),
                                          ("broken.mp4", b"\x00\x00\x00\x18ftypmp42 garbage" * 10),
                                          ("notes.txt", b"hello"), ("empty.jpg", b"")])
def test_verify_file_unreadable_is_one_line_avatar_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AvatarError) as info:
        verify_file(path)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_verify_file_missing_or_folder(tmp_path):
    with pytest.raises(AvatarError, match="not found"):
        verify_file(tmp_path / "nope.mp4")
    with pytest.raises(AvatarError, match="folder"):
        verify_file(tmp_path)


def test_verify_file_audio_only_has_no_video_track(tmp_path):
    path = ROOT / "avatar" / "assets" / "voice.wav"
    with pytest.raises(AvatarError, match="no video track"):
        verify_file(path)
