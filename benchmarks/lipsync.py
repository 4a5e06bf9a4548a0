"""Lip-sync and behaviour benchmark: the real pipeline renders, the face mesh measures the frames.

Every number here comes from rendered 512x512 frames (Pipeline.step per 400-sample block, then
flush), measured with avatar/facemeasure.py. No score reads the motion vector: the commanded
motion and the encoder's own features are recorded beside the measures only to check the
measuring (blinks, head, aperture vs commanded jaw) and to show at which stage sync is lost.

Sections (written to benchmarks/results/lipsync.json):
- held-out synthetic speech: conversational sentences held out of training (engines/speech_data.py
  text_pools: every fifth one) spoken by the held-out voices (flite slt, festival
  cmu_us_slt_arctic_hts, espeak en-gb-scotland, espeak +f4), one continuous stream. Pearson r of
  the measured mouth aperture with the phone-derived jaw_open target (speech_data's
  articulation_targets) at lag 0 and at the best lag in +-5 frames, over the speech spans (the
  synthesizer's lead/tail padding left out); the share of bilabial (m/b/p) midpoints at which the
  lips measure closed within +-1 frame.
- real recorded speech (alsa-utils channel tests, and codec2-examples when installed): r of the
  aperture with the loudness envelope (RMS per 25 ms frame, [1 2 1]/4 smoothed) and its lag;
  false closures without phone labels: the share of loud frames (>= -6 dB from the clip's peak)
  with closed lips, and closure events inside the alsa clips' words, which have no m/b/p.
- behaviour: looped real speech then quiet room noise (-65 dBFS): blink rate per minute
  talking / silent from the eye aspect ratio, head yaw/pitch/roll std, frame-to-frame jitter of
  rigid landmarks after removing the head motion.
A contact sheet of ~24 consecutive frames' mouths (2x) with the phone under each frame is saved
as benchmarks/results/lipsync_sheet.png.

    python benchmarks/lipsync.py            # full run: ~10 min of wall time on this shared 2-core
                                            # CPU for dsp alone, ~13 min with trained + dsp + baseline
    python benchmarks/lipsync.py --quick    # smoke run (~2 min)
    python benchmarks/lipsync.py --audio-models dsp --sections synthetic   # one part

Lag sign: + means the face moves after the audio target.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from avatar.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME  # noqa: E402
from avatar.facemeasure import FaceMeter, FaceTrack, detect_blinks, open_eye_level  # noqa: E402
from avatar.motion import index as motion_index  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_LAG = 5  # frames searched either way
COMMANDED_SHUT_JAW = 0.05  # jaw_open at or below this counts as shut for a commanded closure
CLOSED_FRACTION = 0.25  # lips count as closed below this fraction of the clip's median speech aperture
ENVELOPE_SMOOTH = np.array([0.25, 0.5, 0.25])  # light smoothing of the per-frame RMS
SILENCE_NOISE_DBFS = -65.0  # the "silent" part of the behaviour run: a quiet room, not digital zeros
SECTIONS = ("synthetic", "real", "behaviour")
STOPS = ("t", "d", "k", "g", "dx", "ch", "jh")  # non-bilabial stops: a silent closure, lips apart
PHONE_CLASSES = {"rounded": ("uw", "uh", "w", "ow"), "spread": ("iy", "ih", "ey", "y"),
                 "open": ("aa", "ae", "ah", "ao", "aw", "ay"), "bilabial": ("m", "b", "p")}
SHEET_FRAMES = 24
SHEET_COLUMNS = 8

# engines/speech_data.text_pools holds out every fifth conversational sentence (i % 5 == 4); these
# are the ones of them with bilabials, rounding and spreading.
HELD_OUT_TEXT = (
    "Open the map and point to the mountain.",
    "How about we grab some food after work?",
    "My phone battery is almost empty.",
    "You should look at the moon through the telescope.",
    "Would you mind opening the window a bit?",
    "I'd like to thank my team for all their hard work.",
    "It's been a pleasure working with all of you.",
    "Sorry, I was on mute the whole time.",
)
ALSA_DIR = Path("/usr/share/sounds/alsa")  # alsa-utils: a human voice naming speaker channels
ALSA_FILES = ("Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right",
              "Side_Left", "Side_Right")
CODEC2_DIR = Path("/usr/share/codec2/wav")  # apt codec2-examples (LGPL-2.1): clean 8 kHz recordings
CODEC2_FILES = ("hts1a", "hts2a", "big_dog", "mmt1", "forig", "morig")

GOALS = {
    "bilabial_closure_hit_rate": ">= 0.90",
    "synthetic_aperture_r": ">= 0.80 (held-out voices, best lag)",
    "real_envelope_r": ">= 0.60 (best lag)",
    "lag_frames": "0 +- 1",
    "blinks_per_min_silent": "~15-20",
    "blinks_per_min_talking": "~25",
    "head_std_deg": "a few degrees (2-5) in yaw/pitch",
}


# ---------------------------------------------------------------------------------------------
# Audio sets
# ---------------------------------------------------------------------------------------------

@dataclass
class Segment:
    name: str
    start: int  # first frame of this clip in the stream
    end: int  # one past its last frame
    speech: tuple[int, int]  # frames of speech inside it (synthetic: first to last phone)
    phones: list = field(default_factory=list)  # (ARPAbet, start s, end s) in stream time
    info: dict = field(default_factory=dict)


@dataclass
class Stream:
    audio: np.ndarray  # (frames * SAMPLES_PER_FRAME,) float32 16 kHz
    segments: list[Segment]

    @property
    def frames(self) -> int:
        return len(self.audio) // SAMPLES_PER_FRAME


def held_out_voices():
    from engines.speech_data import Voice

    voices = (Voice("flite", "slt"), Voice("festival", "cmu_us_slt_arctic_hts"),
              Voice("espeak", "en-gb-scotland", rate_wpm=165), Voice("espeak", "en-us+f4", rate_wpm=170))
    assert all(v.held_out for v in voices), "the evaluation voices must be held out of training"
    return voices


def synthetic_stream(n_sentences: int) -> Stream:
    """Held-out sentences in held-out voices, one after another, phones in stream time."""
    from engines.speech_data import CONVERSATION, Espeak, synthesize

    held = {s for i, s in enumerate(CONVERSATION) if i % 5 == 4}
    voices = held_out_voices()
    espeak = Espeak()
    pieces, segments, offset = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(HELD_OUT_TEXT[:n_sentences]):
            assert text in held, f"{text!r} is not a held-out sentence"
            voice = voices[i % len(voices)]
            audio, phones = synthesize(text, voice, Path(tmp), espeak)
            t0 = offset * SAMPLES_PER_FRAME / SAMPLE_RATE
            n = len(audio) // SAMPLES_PER_FRAME
            spoken = [(p, s, e) for p, s, e in phones if p not in ("pau", "sil", "h#", "#", "ssil") and e > s]
            speech = (offset + int(spoken[0][1] * FPS), offset + min(n, int(np.ceil(spoken[-1][2] * FPS))))
            segments.append(Segment(f"{voice.engine}:{voice.name}", offset, offset + n, speech,
                                    [(p, s + t0, e + t0) for p, s, e in phones],
                                    {"text": text, "voice": dataclasses.asdict(voice), "seconds": n / FPS}))
            pieces.append(audio)
            offset += n
    return Stream(np.concatenate(pieces).astype(np.float32), segments)


def read_audio(path: Path) -> np.ndarray:
    from avatar.media import open_audio

    with open_audio(path) as source:
        blocks = list(source.blocks(SAMPLES_PER_FRAME))
    return np.concatenate(blocks).astype(np.float32)


def real_files(quick: bool) -> list[Path]:
    files = [ALSA_DIR / f"{name}.wav" for name in ALSA_FILES]
    if not quick:
        files += [CODEC2_DIR / f"{name}.wav" for name in CODEC2_FILES]
    files = [f for f in files if f.is_file()]
    return files[:2] if quick else files


def real_stream(files: list[Path], *, gap_s: float = 0.3) -> Stream:
    """Recorded files one after another with short quiet gaps."""
    gap = np.zeros(int(gap_s * FPS) * SAMPLES_PER_FRAME, np.float32)
    pieces, segments, offset = [], [], 0
    for path in files:
        audio = read_audio(path)
        n = len(audio) // SAMPLES_PER_FRAME
        segments.append(Segment(path.stem, offset, offset + n, (offset, offset + n), info={"path": str(path),
                                                                                        "seconds": n / FPS}))
        pieces += [audio, gap]
        offset += n + len(gap) // SAMPLES_PER_FRAME
    return Stream(np.concatenate(pieces), segments)


def behaviour_audio(speech: np.ndarray, talk_s: float, silent_s: float, seed: int = 0) -> np.ndarray:
    n_talk = int(talk_s * FPS) * SAMPLES_PER_FRAME
    talk = np.resize(speech, n_talk)  # loops the real-speech stream
    rng = np.random.default_rng(seed)
    quiet = rng.standard_normal(int(silent_s * FPS) * SAMPLES_PER_FRAME) * 10 ** (SILENCE_NOISE_DBFS / 20)
    return np.concatenate([talk, quiet.astype(np.float32)])


# ---------------------------------------------------------------------------------------------
# Rendering through the real pipeline
# ---------------------------------------------------------------------------------------------

@dataclass
class Rendered:
    track: FaceTrack
    motion: np.ndarray  # (T, N_CHANNELS) what the generator commanded, for checking the meter
    kept: dict[int, tuple[np.ndarray, np.ndarray | None]]  # frame -> (frame, landmarks)
    seconds: float


def render_stream(pipeline, audio: np.ndarray, reference: np.ndarray, keep: range = range(0)) -> Rendered:
    """Feed `audio` block by block through Pipeline.step and flush; measure every frame as it
    comes (video tracking), keep only the frames in `keep`. Frame i shows audio frame i."""
    pipeline.reset()
    motions, kept = [], {}
    started = time.perf_counter()
    with FaceMeter(video=True, reference=reference) as meter:
        def take(frame: np.ndarray) -> None:
            i = len(motions)
            motions.append(pipeline.last_motion[0].numpy().copy())  # the motion this frame rendered
            p = meter.add(frame)
            if i in keep:
                kept[i] = (frame.copy(), p)

        blocks = audio.reshape(-1, SAMPLES_PER_FRAME)
        for block in blocks:
            frame = pipeline.step(block)
            if frame is not None:
                take(frame)
        for frame in pipeline.flush():
            take(frame)
    track = meter.track()
    assert len(track) == len(blocks), (len(track), len(blocks))
    return Rendered(track, np.array(motions), kept, time.perf_counter() - started)


@torch.inference_mode()
def encoder_features(encoder, audio: np.ndarray) -> np.ndarray:
    """The audio encoder alone over the clip: (T, 7), row i describing audio frame i (for
    locating where lip sync is lost: encoder, generator, or renderer and measurement)."""
    from engines.audio_encoder import encode_clip

    look = int(getattr(encoder, "lookahead_frames", 0))
    padded = np.concatenate([audio, np.zeros(look * SAMPLES_PER_FRAME, np.float32)])
    return encode_clip(encoder, torch.from_numpy(padded)[None])[0, look:].numpy()


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def lagged_correlation(measured: np.ndarray, target: np.ndarray, mask: np.ndarray, max_lag: int = MAX_LAG) -> dict:
    """r(lag) = corr(measured[t + lag], target[t]) over the frames t in mask; + lag = face late."""
    t = np.flatnonzero(mask)
    curve = {}
    for lag in range(-max_lag, max_lag + 1):
        ok = t[(t + lag >= 0) & (t + lag < len(measured))]
        curve[lag] = _corr(measured[ok + lag], target[ok])
    best = max((lag for lag in curve if np.isfinite(curve[lag])), key=lambda lag: curve[lag], default=0)
    return {"r_lag0": curve[0], "r_best": curve[best], "best_lag_frames": int(best),
            "r_by_lag": {str(k): round(v, 4) for k, v in curve.items()}}


def speech_mask(stream: Stream) -> np.ndarray:
    mask = np.zeros(stream.frames, bool)
    for seg in stream.segments:
        mask[seg.speech[0]:seg.speech[1]] = True
    return mask


def _closure_events(phones: list, n_frames: int) -> tuple[list, np.ndarray, list, np.ndarray]:
    """Bilabials (phone, mid s) with their midpoint frames, and the other speech phones whose
    midpoint frame lies more than 2 frames from any bilabial (where closed lips are false)."""
    from engines.speech_data import BILABIALS, bilabial_midpoints, normalize_phone

    named = [(normalize_phone(p), s, e) for p, s, e in phones if e > s]
    bilabial = [(p, 0.5 * (s + e)) for p, s, e in named if p in BILABIALS]
    mids = bilabial_midpoints(phones)
    assert len(mids) == len(bilabial)
    ok = (mids >= 1) & (mids < n_frames - 1)
    bilabial, mids = [b for b, k in zip(bilabial, ok) if k], mids[ok]
    spans = [(int(s * FPS), int(np.ceil(e * FPS))) for p, s, e in named if p in BILABIALS]
    others, other_frames = [], []
    for p, s, e in named:
        m = int(0.5 * (s + e) * FPS)
        if p in BILABIALS or p == "pau" or m >= n_frames or any(a - 2 <= m < b + 2 for a, b in spans):
            continue
        others.append(p)
        other_frames.append(m)
    return bilabial, mids, others, np.array(other_frames, dtype=np.int64)


def synthetic_metrics(stream: Stream, rendered: Rendered, features: np.ndarray | None = None) -> dict:
    from engines.speech_data import articulation_targets

    phones = [p for seg in stream.segments for p in seg.phones]
    targets = articulation_targets(phones, stream.frames)  # (T, 4): jaw, wide, round, closed
    jaw = targets[:, 0]
    aperture = rendered.track.aperture
    mask = speech_mask(stream) & np.isfinite(aperture)
    out = lagged_correlation(aperture, jaw, mask)
    out["mouth_width_vs_lips_wide"] = lagged_correlation(rendered.track.mouth_width, targets[:, 1] - targets[:, 2], mask)
    threshold = CLOSED_FRACTION * float(np.nanmedian(aperture[mask]))
    bilabial, mids, others, other_frames = _closure_events(phones, stream.frames)
    window_min = np.array([np.nanmin(aperture[m - 1:m + 2]) for m in mids]) if len(mids) else np.zeros(0)
    hits = window_min < threshold
    false_closed = aperture[other_frames] < threshold
    stops = np.array([p in STOPS for p in others], dtype=bool)
    out.update({
        "closure_threshold_aperture": threshold,
        "median_speech_aperture": float(np.nanmedian(aperture[mask])),
        "bilabials": int(len(mids)),
        "bilabial_closure_hit_rate": float(hits.mean()) if len(hits) else float("nan"),
        "bilabial_closure_hit_rate_within_2_frames": float(np.mean(
            [np.nanmin(aperture[max(0, m - 2):m + 3]) < threshold for m in mids])) if len(mids) else float("nan"),
        "missed_bilabials": [{"phone": p, "time_s": round(t, 3), "min_aperture": round(float(w), 4)}
                             for (p, t), w, h in zip(bilabial, window_min, hits) if not h][:40],
        # closed lips at the midpoint of a phone that is not m/b/p (and not next to one)
        "false_closure_rate": float(false_closed.mean()) if len(others) else float("nan"),
        "false_closure_rate_stops": float(false_closed[stops].mean()) if stops.any() else float("nan"),
        "false_closure_rate_other_phones": float(false_closed[~stops].mean()) if (~stops).any() else float("nan"),
        "non_bilabial_phones": len(others),
        "per_clip_r_lag0": {f"{i}:{seg.name}": round(_corr(aperture[seg.speech[0]:seg.speech[1]],
                                                            jaw[seg.speech[0]:seg.speech[1]]), 3)
                            for i, seg in enumerate(stream.segments)},
        "face_found_share": float(rendered.track.found.mean()),
        "render_measure_seconds": rendered.seconds,
    })
    # mouth shape by phone class (frame-centre phone): does "oo" narrow, "ee" widen, m/b/p close?
    labels = phone_labels(stream)
    width = rendered.track.mouth_width
    median_width = float(np.nanmedian(width[mask]))
    by_class = {}
    for name, members in PHONE_CLASSES.items():
        sel = mask & np.array([lab in members for lab in labels])
        by_class[name] = {"frames": int(sel.sum()),
                          "aperture_mean": float(np.nanmean(aperture[sel])) if sel.any() else float("nan"),
                          "width_vs_median": float(np.nanmean(width[sel]) / median_width) if sel.any() else float("nan")}
    out["mouth_by_phone_class"] = by_class
    # where sync is lost, stage by stage, against the same targets (not the score: the score is
    # the measured frames above). A stage's closure: its closure signal >= 0.5 (within +-1 frame
    # of a bilabial midpoint for a hit, at the midpoint of another phone for a false closure)
    jaw_cmd = rendered.motion[:, motion_index("jaw_open")]
    # a commanded closure: lips pressed with the jaw shut (the generator's lip seal alone presses
    # the lips part way wherever the jaw is low, and an open jaw keeps them apart)
    press_cmd = rendered.motion[:, motion_index("lips_press")] * (jaw_cmd <= COMMANDED_SHUT_JAW)

    def closure_rates(x: np.ndarray) -> tuple[float, float]:
        hit = float(np.mean([np.nanmax(x[m - 1:m + 2]) >= 0.5 for m in mids])) if len(mids) else float("nan")
        false = float(np.mean(x[other_frames] >= 0.5)) if len(others) else float("nan")
        return hit, false

    stages = {"commanded_jaw_open_vs_target": lagged_correlation(jaw_cmd, jaw, mask),
              "meter_check_aperture_vs_commanded_jaw_open": lagged_correlation(aperture, jaw_cmd, mask)}
    stages["commanded_lips_press_closure_hit_rate"], stages["commanded_lips_press_false_closure_rate"] = \
        closure_rates(press_cmd)
    if features is not None:
        stages["encoder_jaw_open_vs_target"] = lagged_correlation(features[:, 0], jaw, mask)
        stages["encoder_lips_closed_closure_hit_rate"], stages["encoder_lips_closed_false_closure_rate"] = \
            closure_rates(features[:, 3])
    for v in stages.values():
        if isinstance(v, dict):
            v.pop("r_by_lag")
    out["stages"] = stages
    return out


def rms_envelope(audio: np.ndarray) -> np.ndarray:
    frames = audio.reshape(-1, SAMPLES_PER_FRAME).astype(np.float64)
    rms = np.sqrt((frames**2).mean(1))
    return np.convolve(np.pad(rms, 1, mode="edge"), ENVELOPE_SMOOTH, mode="valid")


def real_metrics(stream: Stream, rendered: Rendered) -> dict:
    envelope = rms_envelope(stream.audio)
    db = 20 * np.log10(envelope + 1e-9)
    db = np.maximum(db, db.max() - 40.0)  # a 40 dB floor below the loudest frame
    aperture = rendered.track.aperture
    mask = np.isfinite(aperture)
    out = lagged_correlation(aperture, envelope, mask)
    out["envelope_db"] = lagged_correlation(aperture, db, mask)
    out["per_clip_r_lag0"] = {seg.name: round(_corr(aperture[seg.start:seg.end], envelope[seg.start:seg.end]), 3)
                              for seg in stream.segments}
    # false closures without phone labels: lips closed while the voice is loud (>= -6 dB from the
    # clip's peak; m/b/p are quieter than that), and closures inside the alsa clips' words, which
    # have no m/b/p at all ("front/rear/side", "left/right/center"; f is lip-to-teeth, not closed)
    loud, speaking = np.zeros(stream.frames, bool), np.zeros(stream.frames, bool)
    for seg in stream.segments:
        env = envelope[seg.start:seg.end]
        loud[seg.start:seg.end] = env >= 0.5 * env.max()
        speaking[seg.start:seg.end] = env >= 0.1 * env.max()
    threshold = CLOSED_FRACTION * float(np.nanmedian(aperture[speaking & mask]))
    closed = aperture < threshold
    out["closure_threshold_aperture"] = threshold
    out["closed_while_loud_share"] = float(closed[loud & mask].mean())
    alsa = [seg for seg in stream.segments if seg.name in ALSA_FILES]
    if alsa:
        events = {}
        for seg in alsa:
            inside = closed[seg.start:seg.end] & speaking[seg.start:seg.end]
            events[seg.name] = int(np.sum(np.diff(np.concatenate([[0], inside.astype(int)])) == 1))
        out["alsa_closures_in_words"] = {"events": sum(events.values()), "clips": len(alsa), "per_clip": events}
    out["face_found_share"] = float(rendered.track.found.mean())
    out["render_measure_seconds"] = rendered.seconds
    return out


def commanded_blinks(motion: np.ndarray, threshold: float = 0.4) -> list[tuple[int, int]]:
    closed = np.maximum(motion[:, motion_index("blink_left")], motion[:, motion_index("blink_right")]) >= threshold
    edges = np.diff(np.concatenate([[0], closed.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.std(x)) if len(x) > 1 else float("nan")


def behaviour_metrics(rendered: Rendered, talk_frames: int) -> dict:
    track, motion = rendered.track, rendered.motion
    level = open_eye_level(track.ear)
    blinks = detect_blinks(track.ear, open_level=level)
    commanded = commanded_blinks(motion)
    detected_spans = [(b.start, b.end) for b in blinks]
    recall = np.mean([any(s < de + 2 and ds < e + 2 for ds, de in detected_spans) for s, e in commanded]) \
        if commanded else float("nan")
    precision = np.mean([any(s < ce + 2 and cs < e + 2 for cs, ce in commanded) for s, e in detected_spans]) \
        if detected_spans else float("nan")
    parts = {"talking": (0, talk_frames), "silent": (talk_frames, len(track))}
    out: dict = {"open_eye_ear": level, "blink_detector": {
        "commanded_blinks_(lid>=0.4)": len(commanded), "detected_blinks": len(blinks),
        "recall_of_commanded": float(recall), "precision": float(precision)}}
    for name, (a, b) in parts.items():
        minutes = (b - a) / FPS / 60.0
        sl = slice(a, b)
        jitter = track.jitter[sl]
        out[name] = {
            "seconds": (b - a) / FPS,
            "blinks_per_min": sum(a <= bl.start < b for bl in blinks) / minutes,
            "blink_mean_frames": float(np.mean([bl.frames for bl in blinks if a <= bl.start < b] or [np.nan])),
            "blink_mean_depth": float(np.mean([bl.depth for bl in blinks if a <= bl.start < b] or [np.nan])),
            "commanded_blinks_per_min": sum(a <= s < b for s, _ in commanded) / minutes,
            "yaw_std_deg": _std(track.yaw[sl]), "pitch_std_deg": _std(track.pitch[sl]), "roll_std_deg": _std(track.roll[sl]),
            "commanded_yaw_std_deg": _std(motion[sl, motion_index("yaw")]),
            "commanded_pitch_std_deg": _std(motion[sl, motion_index("pitch")]),
            "commanded_roll_std_deg": _std(motion[sl, motion_index("roll")]),
            "jitter_px_mean": float(np.nanmean(jitter)), "jitter_px_p95": float(np.nanpercentile(jitter, 95)),
            "iris_x_std": _std((track.iris_right[sl, 0] + track.iris_left[sl, 0]) / 2),
            "commanded_gaze_yaw_std_deg": _std(motion[sl, motion_index("gaze_yaw")]),
            "aperture_mean": float(np.nanmean(track.aperture[sl])),
        }
    out["face_found_share"] = float(track.found.mean())
    out["render_measure_seconds"] = rendered.seconds
    return out


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------

def sheet_window(stream: Stream, n: int = SHEET_FRAMES) -> range:
    """The n consecutive speech frames with the most bilabials, rounded and spread vowels."""
    from engines.speech_data import bilabial_midpoints

    phones = [p for seg in stream.segments for p in seg.phones]
    label = phone_labels(stream)
    mids = set(int(m) for m in bilabial_midpoints(phones))
    best, best_score = range(0, n), -1.0
    for seg in stream.segments:
        for start in range(seg.speech[0], max(seg.speech[0] + 1, seg.speech[1] - n + 1)):
            frames = range(start, start + n)
            names = {label[i] for i in frames if i < len(label)}
            score = sum(i in mids for i in frames) + 1.5 * bool(names & {"uw", "ow", "w"}) + 1.5 * bool(names & {"iy", "ey"})
            if score > best_score:
                best, best_score = frames, score
    return best


def phone_labels(stream: Stream) -> list[str]:
    """The phone sounding at each frame's centre."""
    from engines.speech_data import normalize_phone

    labels = ["" for _ in range(stream.frames)]
    for seg in stream.segments:
        for p, s, e in seg.phones:
            for i in range(int(np.ceil(s * FPS - 0.5)), min(stream.frames, int(np.ceil(e * FPS - 0.5)))):
                labels[i] = normalize_phone(p)
    return labels


def contact_sheet(rows: list[tuple[str, Rendered]], window: range, labels: list[str], path: Path) -> None:
    """Mouth crops (2x) of the window's frames, the phone under each; one block of rows per model."""
    import cv2

    cell_w, cell_h, label_h, title_h = 224, 150, 22, 26
    n_rows = int(np.ceil(len(window) / SHEET_COLUMNS))
    blocks = []
    for title, rendered in rows:
        block = np.full((title_h + n_rows * (cell_h + label_h), SHEET_COLUMNS * cell_w, 3), 255, np.uint8)
        cv2.putText(block, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        for k, i in enumerate(window):
            frame, p = rendered.kept.get(i, (None, None))
            if frame is None:
                continue
            if p is not None:
                cx, cy = (p[61, 0] + p[291, 0]) / 2, (p[13, 1] + p[14, 1]) / 2
            else:
                cx, cy = frame.shape[1] / 2, frame.shape[0] * 0.65
            x0, y0 = int(round(cx - cell_w / 4)), int(round(cy - cell_h / 4))
            crop = frame[max(0, y0):y0 + cell_h // 2, max(0, x0):x0 + cell_w // 2]
            crop = cv2.resize(crop, (cell_w, cell_h), interpolation=cv2.INTER_CUBIC)
            r, c = divmod(k, SHEET_COLUMNS)
            y = title_h + r * (cell_h + label_h)
            block[y:y + crop.shape[0], c * cell_w:c * cell_w + crop.shape[1]] = crop
            ap = rendered.track.aperture[i]
            text = f"{i}: {labels[i] or '-'}   ap {ap:.3f}" if np.isfinite(ap) else f"{i}: {labels[i]}"
            color = (200, 0, 0) if labels[i] in ("m", "b", "p") else (0, 0, 0)
            cv2.putText(block, text, (c * cell_w + 6, y + cell_h + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1,
                        cv2.LINE_AA)
        blocks.append(block)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image  # a 256-colour palette keeps the committed sheet small (~4x)

    Image.fromarray(np.concatenate(blocks, axis=0)).quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def verdict(results: dict) -> dict:
    out = {}
    for key, m in results["held_out_synthetic"]["models"].items():
        if "error" in m:
            continue
        out[key] = {"bilabial_closure_hit_rate>=0.9": m["bilabial_closure_hit_rate"] >= 0.9,
                    "synthetic_r>=0.8": m["r_best"] >= 0.8, "synthetic_lag_within_1": abs(m["best_lag_frames"]) <= 1}
        real = results.get("real_speech", {}).get("models", {}).get(key)
        if real and "error" not in real:
            out[key].update({"real_envelope_r>=0.6": real["r_best"] >= 0.6,
                             "real_lag_within_1": abs(real["best_lag_frames"]) <= 1})
    b = results.get("behaviour")
    if b and "error" not in b:
        out["behaviour"] = {
            "blinks_silent_15_20": 15 <= b["silent"]["blinks_per_min"] <= 20,
            "blinks_talking_20_30": 20 <= b["talking"]["blinks_per_min"] <= 30,
            "head_yaw_pitch_std_1.5_6_deg": all(1.5 <= b["talking"][k] <= 6 for k in ("yaw_std_deg", "pitch_std_deg")),
        }
    return out


def encoder_weights_info(path: Path | None = None) -> dict:
    from engines.audio_encoder import WEIGHTS_DIR

    path = Path(path) if path is not None else WEIGHTS_DIR / "audio_encoder.pt"
    name = str(path.relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
    if not path.is_file():
        return {"path": name, "present": False}
    data = path.read_bytes()
    committed = subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", str(path)], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip() if path.resolve().is_relative_to(ROOT) else ""
    return {"path": name, "present": True, "last_commit": committed or None, "sha256": hashlib.sha256(data).hexdigest()[:16],
            "bytes": len(data), "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 sentences, 2 real clips, 12+6 s behaviour")
    parser.add_argument("--audio-models", nargs="+", default=["trained", "dsp"])
    parser.add_argument("--trained-weights", type=Path, default=None,
                        help="evaluate this AudioEncoder checkpoint as 'trained' (default: engines/weights/audio_encoder.pt)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the loudness-baseline motion row")
    parser.add_argument("--behaviour", nargs=2, type=float, metavar=("TALK_S", "SILENT_S"), default=None,
                        help="seconds of looped speech and of quiet for the behaviour run (default 60 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (mediapipe runs its own)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "lipsync.json")
    parser.add_argument("--sheet", type=Path, default=RESULTS / "lipsync_sheet.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # a minute of each: at ~17 blinks/min, 30 s holds only ~8 blinks (a 5-min generator run: 17.6-18.6/min)
    talk_s, silent_s = args.behaviour or ((12.0, 6.0) if args.quick else (60.0, 60.0))

    from avatar.cli import DEFAULT_PORTRAIT
    from avatar.controls import Controls, controls_tensor
    from avatar.errors import AvatarError
    from avatar.pipeline import Pipeline, load_engines
    from avatar.rig import load_rig

    t_start = time.perf_counter()
    rig = load_rig(DEFAULT_PORTRAIT)
    with FaceMeter(video=False) as still:
        reference = still.landmarks(rig.image.numpy())
    if reference is None:
        raise SystemExit("the face mesh finds no face in the portrait")

    configs = [(a, "generator") for a in args.audio_models]
    if not args.no_baseline:
        configs.append(("dsp", "baseline"))
    pipelines, errors = {}, {}
    for audio_model, motion_model in configs:
        key = f"{audio_model}+{motion_model}"
        try:
            if audio_model == "trained" and args.trained_weights is not None:
                from engines.audio_encoder import load_trained_weights

                engines = load_engines(audio_model="dsp", motion_model=motion_model)
                engines.encoder = load_trained_weights(args.trained_weights).eval()
            else:
                engines = load_engines(audio_model=audio_model, motion_model=motion_model)
            pipelines[key] = Pipeline(engines, rig.inputs(), controls_tensor(Controls()), seed=args.seed)
        except (AvatarError, RuntimeError, KeyError) as e:  # missing weights, or weights of another shape
            errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0]}" + (
                f" {str(e).splitlines()[1].strip()}" if len(str(e).splitlines()) > 1 else "")
            print(f"{key}: not run ({e})", flush=True)

    print("synthesizing held-out speech ...", flush=True)
    synth = synthetic_stream(2 if args.quick else len(HELD_OUT_TEXT))
    window = sheet_window(synth)
    sheet_seg = next(seg for seg in synth.segments if seg.start <= window.start < seg.end)
    labels = phone_labels(synth)
    real = real_stream(real_files(args.quick))
    print(f"held-out synthetic: {synth.frames / FPS:.1f} s in {len(synth.segments)} sentences; "
          f"real: {real.frames / FPS:.1f} s in {len(real.segments)} files", flush=True)

    results: dict = {
        "benchmark": "lip sync and behaviour, measured by the face mesh on frames rendered by the real pipeline",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(), "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__, "torch_threads": args.threads},
        "portrait": str(Path(DEFAULT_PORTRAIT).relative_to(ROOT)) if Path(DEFAULT_PORTRAIT).is_relative_to(ROOT)
        else str(DEFAULT_PORTRAIT),
        "audio_encoder_weights": encoder_weights_info(args.trained_weights),
        "goals": GOALS,
        "definitions": {
            "aperture": "inner-lip gap 13-14 over face width 234-454 (face mesh on the rendered frame)",
            "lag": f"r(lag) = corr(aperture[t+lag], target[t]); + = face late; searched +-{MAX_LAG} frames (25 ms)",
            "synthetic_target": "jaw_open from engines.speech_data.articulation_targets(phones); frames in the "
                                "sentences' speech spans (first to last phone, padding excluded)",
            "closure": f"aperture < {CLOSED_FRACTION} x the clip's median speech aperture in any frame within +-1 "
                       "of a bilabial phone's midpoint frame; a false closure: the same at the midpoint frame of a "
                       "phone that is not m/b/p and is more than 2 frames from one",
            "real_target": "RMS per 25 ms frame, smoothed [1 2 1]/4 (envelope_db: the same in dB, 40 dB floor)",
            "real_false_closures": "closed (as above, median over frames >= -20 dB from the clip's peak) in frames "
                                   ">= -6 dB from it; alsa clips: runs of closed frames within -20 dB of the peak",
            "blinks": "hysteresis on mean EAR: start < 0.78, end > 0.88 x the clip's median (open) EAR, <= 1 s",
            "head": "weak-perspective fit of rigid mesh points to the neutral photo's 3D mesh, degrees",
            "jitter": "mean residual (px at 512) of rigid points after the best 2D affine map between consecutive frames",
        },
        "held_out_synthetic": {"clips": [seg.info | {"name": seg.name} for seg in synth.segments],
                               "seconds": synth.frames / FPS, "models": {}},
        "real_speech": {"clips": [seg.info | {"name": seg.name} for seg in real.segments],
                        "seconds": real.frames / FPS, "models": {}},
    }
    for key, msg in errors.items():
        results["held_out_synthetic"]["models"][key] = {"error": msg}
        results["real_speech"]["models"][key] = {"error": msg}

    sheet_rows = []
    for key, pipeline in pipelines.items():
        if "synthetic" not in args.sections:
            break
        print(f"[{key}] held-out synthetic ...", flush=True)
        rendered = render_stream(pipeline, synth.audio, reference, keep=window)
        m = synthetic_metrics(synth, rendered, encoder_features(pipeline.engines.encoder, synth.audio))
        results["held_out_synthetic"]["models"][key] = m
        if not key.endswith("+baseline"):  # the baseline stays off the sheet: its mouth only follows loudness
            sheet_rows.append((f"{key}: frames {window.start}-{window.stop - 1} of \"{sheet_seg.info['text']}\" "
                               f"({sheet_seg.name})", rendered))
        print(f"  r0 {m['r_lag0']:.3f}  r_best {m['r_best']:.3f} @ {m['best_lag_frames']:+d}  closures "
              f"{m['bilabial_closure_hit_rate']:.2f} of {m['bilabials']}, false closures {m['false_closure_rate']:.2f} "
              f"(stops {m['false_closure_rate_stops']:.2f}) of {m['non_bilabial_phones']}  ({rendered.seconds:.0f} s)",
              flush=True)
        cls = m["mouth_by_phone_class"]
        print("  width/median: " + ", ".join(f"{k} {v['width_vs_median']:.3f}" for k, v in cls.items())
              + "; aperture: " + ", ".join(f"{k} {v['aperture_mean']:.3f}" for k, v in cls.items()), flush=True)
        st = m["stages"]
        print(f"  stages: encoder jaw r0 {st.get('encoder_jaw_open_vs_target', {}).get('r_lag0', float('nan')):.3f}, "
              f"closures {st.get('encoder_lips_closed_closure_hit_rate', float('nan')):.2f} false "
              f"{st.get('encoder_lips_closed_false_closure_rate', float('nan')):.2f}; commanded jaw r0 "
              f"{st['commanded_jaw_open_vs_target']['r_lag0']:.3f}, closures {st['commanded_lips_press_closure_hit_rate']:.2f} "
              f"false {st['commanded_lips_press_false_closure_rate']:.2f}; "
              f"meter check r0 {st['meter_check_aperture_vs_commanded_jaw_open']['r_lag0']:.3f}", flush=True)
    for key, pipeline in pipelines.items():
        if "real" not in args.sections or key.endswith("+baseline"):
            continue  # the baseline is compared on the held-out set only
        print(f"[{key}] real speech ...", flush=True)
        rendered = render_stream(pipeline, real.audio, reference)
        m = real_metrics(real, rendered)
        results["real_speech"]["models"][key] = m
        print(f"  envelope r0 {m['r_lag0']:.3f}  r_best {m['r_best']:.3f} @ {m['best_lag_frames']:+d}; closed while "
              f"loud {m['closed_while_loud_share']:.3f}; closures in alsa words (no m/b/p) "
              f"{m.get('alsa_closures_in_words', {}).get('events')}  ({rendered.seconds:.0f} s)", flush=True)

    if sheet_rows:
        contact_sheet(sheet_rows, window, labels, args.sheet)
        results["contact_sheet"] = {"path": str(args.sheet.relative_to(ROOT)) if args.sheet.is_relative_to(ROOT)
                                    else str(args.sheet), "frames": [window.start, window.stop - 1],
                                    "sentence": sheet_seg.info["text"], "voice": sheet_seg.name,
                                    "phones": [labels[i] for i in window]}

    # behaviour is the generator's: run once, on the product's encoder when its weights exist
    behaviour_key = next((k for k in ("trained+generator", "dsp+generator") if k in pipelines), None)
    if behaviour_key and "behaviour" in args.sections:
        print(f"[{behaviour_key}] behaviour: {talk_s:g} s talking + {silent_s:g} s quiet ...", flush=True)
        audio = behaviour_audio(real.audio, talk_s, silent_s, args.seed)
        rendered = render_stream(pipelines[behaviour_key], audio, reference)
        b = behaviour_metrics(rendered, int(talk_s * FPS))
        results["behaviour"] = {"model": behaviour_key, "talking_audio": "the real-speech stream looped",
                                "silent_audio": f"white noise at {SILENCE_NOISE_DBFS:g} dBFS", **b}
        print(f"  blinks/min talking {b['talking']['blinks_per_min']:.1f} silent {b['silent']['blinks_per_min']:.1f}; "
              f"yaw std {b['talking']['yaw_std_deg']:.2f} pitch std {b['talking']['pitch_std_deg']:.2f}; "
              f"jitter {b['talking']['jitter_px_mean']:.2f} px  ({rendered.seconds:.0f} s)", flush=True)

    results["verdict"] = verdict(results)
    results["wall_seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {args.out} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
