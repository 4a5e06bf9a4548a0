"""Train the AudioEncoder on locally synthesized speech; evaluate on held-out voices.

Reproduce the committed weights (19 minutes on a shared 2-core CPU, synthesis included; up to
about 40 when other work loads the cores):

    nice -n 10 python -m engines.train_audio --out engines/weights/audio_encoder.pt

Needs apt espeak-ng, flite, festival (+ festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts),
sox, bible-kjv and bible-kjv-text. Corpus: engines/speech_data.py, cached under
~/.cache/vasa-avatar/speech (reused when the same settings are asked for again).
Held-out voices: speech_data.HELD_OUT_RULE. The metrics land in the weights' metadata and on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from avatar.constants import FPS, SAMPLES_PER_FRAME
from engines import speech_data
from engines.audio_encoder import (
    ARTICULATION,
    LOOKAHEAD_FRAMES,
    AudioEncoder,
    AudioEncoderConfig,
    DSPAudioEncoder,
    encode_clip,
    frame_db,
)

FEATURES = {name: i for i, name in enumerate(ARTICULATION)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 1234
    train_utterances: int = 4000
    eval_utterances: int = 240
    hum_fraction: float = 0.04
    silence_fraction: float = 0.04  # room tone without speech
    steps: int = 9000
    batch: int = 40
    crop_ticks: int = 100  # 2.5 s of audio per training sequence
    lr: float = 2e-3
    weight_decay: float = 1e-4
    workers: int = 2  # synthesis processes
    # one thread: on two shared cores a second intra-op thread spins and made steps 6x costlier
    threads: int = 1


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------


def _init_worker() -> None:
    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(1)


def build_corpus(cfg: TrainConfig, log) -> tuple[list, list]:
    """(train utterances, held-out utterances), from the cache when it has them."""
    key = hashlib.sha256(json.dumps([cfg.seed, cfg.train_utterances, cfg.eval_utterances, cfg.hum_fraction, cfg.silence_fraction,
                                     Path(speech_data.__file__).read_text()]).encode()).hexdigest()[:16]
    path = speech_data.CACHE_DIR / f"corpus-{key}.pkl"
    if path.exists():
        log(f"corpus: reusing {path}")
        with open(path, "rb") as f:
            return pickle.load(f)
    train_text, held_text = speech_data.text_pools(cfg.seed)
    jobs = [speech_data.make_job(i, cfg.seed, False, train_text[i % len(train_text)], cfg.hum_fraction,
                                 cfg.silence_fraction)
            for i in range(cfg.train_utterances)]
    jobs += [speech_data.make_job(i, cfg.seed, True, held_text[i % len(held_text)]) for i in range(cfg.eval_utterances)]
    t0 = time.time()
    out = []
    with multiprocessing.get_context("fork").Pool(cfg.workers, initializer=_init_worker) as pool:
        for i, utt in enumerate(pool.imap(speech_data.render_job, jobs, chunksize=8)):
            out.append(utt)
            if (i + 1) % 500 == 0:
                log(f"corpus: {i + 1}/{len(jobs)} utterances, {time.time() - t0:.0f} s")
    train, held = out[: cfg.train_utterances], out[cfg.train_utterances:]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((train, held), f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.rename(path)
    log(f"corpus: {len(train)} train + {len(held)} held-out utterances in {time.time() - t0:.0f} s -> {path}")
    return train, held


# ---------------------------------------------------------------------------------------------
# features and targets, per tick (row t describes frame t - LOOKAHEAD_FRAMES)
# ---------------------------------------------------------------------------------------------


def _shift(frames: np.ndarray, fill: float) -> np.ndarray:
    """Frame-indexed rows -> tick-indexed rows: tick t carries frame t - lookahead."""
    pad = np.full((LOOKAHEAD_FRAMES,) + frames.shape[1:], fill, frames.dtype)
    return np.concatenate([pad, frames[:-LOOKAHEAD_FRAMES]])


def utterance_tensors(model: AudioEncoder, utt: speech_data.Utterance) -> dict[str, np.ndarray]:
    """Network inputs from the audio heard; targets per tick: articulation from the phones,
    voicing from the clean audio. (pitch needs no target: the encoder reports the tracker's.)"""
    with torch.no_grad():
        mel, measures = model.frontend.sequence(torch.from_numpy(utt.heard)[None])
        _, clean = model.frontend.sequence(torch.from_numpy(utt.clean)[None])
    clean = clean[0].numpy()
    clean_db = frame_db(torch.from_numpy(utt.clean).reshape(-1, SAMPLES_PER_FRAME)).numpy()
    ticks = mel.shape[1]
    if utt.f0_hz is not None:  # hums and room tone: voiced exactly where a tone sounds
        voiced = _shift((utt.f0_hz > 0).astype(np.float32), 0.0)
    else:
        # voiced: periodic and within 35 dB of the utterance's loudest frame (clean audio)
        floor = max(-55.0, float(clean_db.max()) - 35.0)
        voiced = ((clean[:, 1] > 0.6) & (_shift(clean_db, -100.0) > floor)).astype(np.float32)
    art = _shift(utt.articulation, 0.0)
    return {
        "mel": mel[0].numpy().astype(np.float32),
        "measures": measures[0].numpy().astype(np.float32),
        "articulation": art[:ticks].astype(np.float32),
        "voicing": voiced[:ticks].astype(np.float32),
    }


_TENSOR_MODEL: dict = {}


def _tensors_job(utt: speech_data.Utterance) -> dict[str, np.ndarray]:
    return utterance_tensors(_TENSOR_MODEL["model"], utt)


def stack_stream(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Utterances back to back as one stream (each starts and ends in silence)."""
    return {k: torch.from_numpy(np.concatenate([it[k] for it in items])) for k in items[0]}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def loss_terms(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    art = batch["articulation"]
    known = torch.isfinite(art[..., 0])
    art = torch.nan_to_num(art)
    mouth = torch.sigmoid(logits[..., 0:3])
    mouth_err = ((mouth - art[..., 0:3]) ** 2).mean(dim=-1)
    # missing a closure shows far more than closing slightly long: positives weigh double (triple
    # made faint hiss read as half-closed lips)
    closed = F.binary_cross_entropy_with_logits(logits[..., 3], art[..., 3], reduction="none",
                                                pos_weight=torch.tensor(2.0))
    voiced = batch["voicing"]
    voicing = F.binary_cross_entropy_with_logits(logits[..., 4], voiced)
    return {
        "mouth": 4.0 * (mouth_err * known).sum() / known.sum().clamp(min=1),
        "closed": (closed * known).sum() / known.sum().clamp(min=1),
        "voicing": 0.5 * voicing,
    }


def train(model: AudioEncoder, stream: dict[str, torch.Tensor], cfg: TrainConfig, log) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.seed)
    n = stream["mel"].shape[0]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    history = []
    t0 = time.time()
    running: dict[str, float] = {}
    for step in range(cfg.steps):
        starts = torch.randint(0, n - cfg.crop_ticks, (cfg.batch,), generator=gen)
        index = starts[:, None] + torch.arange(cfg.crop_ticks)[None, :]
        batch = {k: v[index] for k, v in stream.items()}
        logits = model.logits_sequence(batch["mel"], batch["measures"])
        terms = loss_terms(logits, batch)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % 100 == 0:
            row = {"step": step + 1, "seconds": round(time.time() - t0, 1), **{k: round(v / 100, 4) for k, v in running.items()}}
            history.append(row)
            log(json.dumps(row))
            running = {}
    return history


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() < 1e-8 or b.std() < 1e-8:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _run_all(encoder: torch.nn.Module, clips: list[np.ndarray], group: int = 48) -> list[np.ndarray]:
    """Features for many clips; the streaming DSP encoder runs them as one zero-padded batch
    (padding only follows each clip, so it cannot change its outputs)."""
    if isinstance(encoder, AudioEncoder):
        with torch.no_grad():
            return [encoder.sequence(torch.from_numpy(c)[None])[0].numpy() for c in clips]
    out = []
    for i in range(0, len(clips), group):
        part = clips[i:i + group]
        longest = max(len(c) for c in part)
        batch = torch.from_numpy(np.stack([np.pad(c, (0, longest - len(c))) for c in part]))
        with torch.no_grad():
            features = encode_clip(encoder, batch).numpy()
        out += [f[: len(c) // SAMPLES_PER_FRAME] for f, c in zip(features, part)]
    return out


def evaluate(encoder: torch.nn.Module, utterances: list, audio: str = "heard") -> dict:
    """Held-out metrics over all utterances (features from the streaming encoder, tick by tick
    for the DSP baseline, whole-clip for the trained one: the two are equal, see the tests)."""
    frontend = AudioEncoder().frontend
    preds, targets, voiced, pitch_t = [], [], [], []
    closure_hits = closures = false_closed = open_frames = 0
    outputs = _run_all(encoder, [getattr(u, audio) for u in utterances])
    for utt, out in zip(utterances, outputs):
        with torch.no_grad():
            _, clean = frontend.sequence(torch.from_numpy(utt.clean)[None])
        clean = clean[0].numpy()
        art = _shift(utt.articulation, 0.0)
        clean_db = frame_db(torch.from_numpy(utt.clean).reshape(-1, SAMPLES_PER_FRAME)).numpy()
        floor = max(-55.0, float(clean_db.max()) - 35.0)
        preds.append(out)
        targets.append(art)
        # the same voicing rule as the training targets, on the clean audio
        voiced.append((clean[:, 1] > 0.6) & (_shift(clean_db, -100.0) > floor))
        pitch_t.append(clean[:, 2])
        # closure detection: lips_closed > 0.5 within +-1 frame of each bilabial's midpoint
        closed = out[:, FEATURES["lips_closed"]] > 0.5
        for mid in speech_data.bilabial_midpoints(utt.phones) + LOOKAHEAD_FRAMES:
            closures += 1
            closure_hits += bool(closed[max(0, mid - 1): mid + 2].any())
        far = art[:, 3] < 0.05
        near = np.convolve((art[:, 3] > 0.05).astype(float), np.ones(5), "same") > 0
        open_frames += int((far & ~near).sum())
        false_closed += int((closed & far & ~near).sum())
    p = np.concatenate(preds)
    t = np.concatenate(targets)
    v = np.concatenate(voiced)
    metrics = {f"corr_{name}": round(_corr(p[:, i], t[:, i]), 4) for i, name in enumerate(ARTICULATION[:4])}
    metrics["mae_jaw_open"] = round(float(np.abs(p[:, 0] - t[:, 0]).mean()), 4)
    metrics["voicing_accuracy"] = round(float(((p[:, 4] > 0.5) == v).mean()), 4)
    pt = np.concatenate(pitch_t)
    both = v & (p[:, 4] > 0.5)
    metrics["pitch_mae_semitones_voiced"] = round(float(12 * np.abs(p[both, 6] - pt[both]).mean()), 3)
    metrics["pitch_gross_error_rate"] = round(float((12 * np.abs(p[both, 6] - pt[both]) > 2).mean()), 4)
    metrics["closure_detection_rate_pm1"] = round(closure_hits / max(1, closures), 4)
    metrics["false_closure_rate"] = round(false_closed / max(1, open_frames), 4)
    metrics["bilabials"] = closures
    metrics["frames"] = int(len(p))
    return metrics


def plot_example(model: AudioEncoder, dsp: DSPAudioEncoder, utt, path: Path) -> None:
    """Predicted vs target features for one held-out utterance, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.from_numpy(utt.heard)[None]
    with torch.no_grad():
        out = model.sequence(x)[0].numpy()
        base = encode_clip(dsp, x)[0].numpy()
    art = _shift(utt.articulation, 0.0)
    t = (np.arange(len(out)) - LOOKAHEAD_FRAMES) / FPS
    fig, axes = plt.subplots(7, 1, figsize=(12, 13), sharex=True)
    for i, name in enumerate(ARTICULATION):
        ax = axes[i]
        if i < 4:
            ax.plot(t, art[:, i], "k", lw=2, label="target (phones)")
        ax.plot(t, out[:, i], "r", label="trained")
        ax.plot(t, base[:, i], "b", alpha=0.5, label="dsp")
        ax.set_ylabel(name)
        if i == 3:
            for mid in speech_data.bilabial_midpoints(utt.phones):
                ax.axvline(mid / FPS, color="g", lw=0.8)
    mids = [(0.5 * (s + e), p) for p, s, e in utt.phones]
    for m, p in mids:
        axes[0].text(m, 1.02, p, fontsize=7, ha="center")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("s")
    fig.suptitle(f"{utt.voice.engine} {utt.voice.name}: {utt.text[:90]}  aug={utt.augmentation}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("engines/weights/audio_encoder.pt"))
    parser.add_argument("--plot", type=Path, default=speech_data.CACHE_DIR / "heldout_example.png")
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_utts, held_utts = build_corpus(cfg, log)
    t_corpus = time.time() - t_start

    model = AudioEncoder(AudioEncoderConfig())
    _TENSOR_MODEL["model"] = model  # forked workers inherit it
    with multiprocessing.get_context("fork").Pool(cfg.workers, initializer=_init_worker) as pool:
        items = pool.map(_tensors_job, train_utts, chunksize=16)
    stream = stack_stream(items)
    x = torch.cat([torch.cat([stream["mel"][:-1], stream["mel"][1:], stream["measures"][1:]], 1)])
    model.input_mean.copy_(x.mean(0))
    model.input_std.copy_(x.std(0).clamp(min=1e-3))
    hours = stream["mel"].shape[0] / FPS / 3600
    log(f"features: {stream['mel'].shape[0]} ticks ({hours:.2f} h) of training audio")

    history = train(model, stream, cfg, log)
    model.eval()
    t_train = time.time() - t_start - t_corpus

    speech = [u for u in held_utts]
    by_engine = {}
    for eng in ("espeak", "flite", "festival"):
        subset = [u for u in speech if u.voice.engine == eng]
        if subset:
            by_engine[eng] = evaluate(model, subset)
    metrics = {
        "trained_heard": evaluate(model, speech),
        "trained_clean": evaluate(model, speech, "clean"),
        "dsp_heard": evaluate(DSPAudioEncoder().eval(), speech),
        "dsp_clean": evaluate(DSPAudioEncoder().eval(), speech, "clean"),
        "trained_heard_by_engine": by_engine,
    }
    for k, v in metrics.items():
        log(f"{k}: {json.dumps(v)}")

    voices: dict[str, set] = {}
    for u in train_utts:
        if u.voice.engine == "espeak":
            dialect, _, variant = u.voice.name.partition("+")
            voices.setdefault("espeak_dialects", set()).add(dialect)
            voices.setdefault("espeak_variants", set()).add(variant or "default")
        else:
            voices.setdefault(u.voice.engine, set()).add(u.voice.name)
    metadata = {
        "command": "python -m engines.train_audio " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_config": dataclasses.asdict(cfg),
        "held_out": speech_data.HELD_OUT_RULE,
        "held_out_text": "Psalms; every fifth conversational sentence",
        "corpus": {
            "train_utterances": len(train_utts),
            "heldout_utterances": len(held_utts),
            "train_hours": round(hours, 3),
            "train_voices": {k: sorted(v) for k, v in voices.items()},
            "heldout_voices": sorted({f"{u.voice.engine}:{u.voice.name}" for u in held_utts}),
        },
        "metrics_heldout": metrics,
        "training_history": history[-5:],
        "seconds": {"corpus": round(t_corpus), "train": round(t_train), "total": round(time.time() - t_start)},
        "versions": {"torch": str(torch.__version__), "python": platform.python_version(), **speech_data.tool_versions()},
        "lookahead_frames": LOOKAHEAD_FRAMES,
    }
    metadata = json.loads(json.dumps(metadata))  # plain types only: loadable with weights_only=True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(), "metadata": metadata}, args.out)
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    try:
        example = next(u for u in held_utts if u.voice.engine == "flite") if held_utts else None
        if example is not None:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot_example(model, DSPAudioEncoder().eval(), example, args.plot)
            log(f"plot: {args.plot}")
    except ImportError:
        log("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
