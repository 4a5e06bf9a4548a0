"""Training speech for the AudioEncoder, synthesized locally with known phone timings.

Text: the King James Bible (public domain, apt bible-kjv / bible-kjv-text) cut into short
clauses, plus conversational sentences written for this project. Voices:
  espeak-ng  through libespeak-ng with phoneme events (exact phone starts from the synthesizer;
             no forced alignment needed): dialects x variants x rate x pitch
  flite      kal, kal16, awb, rms, slt  (phone ends from -psdur)
  festival   kal_diphone, ked_diphone, cmu_us_slt_arctic_hts  (segment dump)
Phones (ARPAbet) become per-frame articulation targets by a dominance-blending coarticulation
model (Cohen & Massaro 1993): each phone pulls every channel towards its target with a weight
that decays outside the phone, slower ahead of it for lip rounding (anticipation). Lip closure
is not blended: it is 1 through a bilabial's closure (so always at its midpoint), with short
ramps before and after.

Voicing and pitch targets come from the clean audio by the encoder's own NCCF analysis.
Augmentation (applied only to what the network hears): reverberation with a synthetic room
response, noise (white, pink, brown, babble; 5-30 dB SNR), microphone EQ (telephone, laptop,
tilt), level (+-14 dB around -28 dBFS speech) with clipping, a microphone noise floor
(-90..-60 dBFS), and pitch shifts with sox.

HELD-OUT VOICES (never in training): the speaker slt (flite slt and festival
cmu_us_slt_arctic_hts), the espeak dialect en-gb-scotland, and the espeak variant f4. Held-out
text: the Book of Psalms and every fifth conversational sentence.

The corpus is written under ~/.cache/vasa-avatar/speech (VASA_SPEECH_CACHE overrides), never
into the repository. This module runs synthesizers and touches files: it is training tooling,
not part of the engine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal

from avatar.constants import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from avatar.errors import AvatarError

CACHE_DIR = Path(os.environ.get("VASA_SPEECH_CACHE", Path.home() / ".cache" / "vasa-avatar" / "speech"))
GRID_S = 0.005  # time step of the coarticulation model
GRID_PER_FRAME = round(1.0 / FPS / GRID_S)  # 5
LEAD_SILENCE_S = 0.1  # silence padded before every utterance: frames start in silence
TAIL_SILENCE_S = 0.15

# "en" is espeak's British English ("en-gb" is not a loadable name)
ESPEAK_DIALECTS = ("en", "en-us", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-scotland")
# human-sounding variants only (the robotic and novelty ones are left out); "whisper" is unvoiced
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
                   "klatt2", "klatt3", "Alex", "Andy", "Annie", "adam", "anika", "aunty", "belinda", "benjamin",
                   "david", "ed", "edward", "grandma", "grandpa", "john", "linda", "max", "michel", "paul", "rob",
                   "robert", "steph", "travis", "victor", "zac", "whisper")
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
HELD_OUT_RULE = "speaker slt (flite slt, festival cmu_us_slt_arctic_hts); espeak dialect en-gb-scotland; espeak variant f4"


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak" | "flite" | "festival" | "hum"
    name: str  # espeak "en-us+f3", flite "awb", festival "ked_diphone"
    rate_wpm: int = 175  # espeak speaking rate
    pitch: int = 50  # espeak base pitch 0..100
    stretch: float = 1.0  # flite / festival duration stretch (>1 is slower)
    semitones: float = 0.0  # sox pitch shift after synthesis (flite / festival)

    @property
    def held_out(self) -> bool:
        if self.engine in ("flite", "festival"):
            return self.name in ("slt", "cmu_us_slt_arctic_hts")
        if self.engine == "espeak":
            dialect, _, variant = self.name.partition("+")
            return dialect == "en-gb-scotland" or variant == "f4"
        return False


# --------------------------------------------------------------------------------------------
# Phone -> articulation
# --------------------------------------------------------------------------------------------

# ARPAbet phone -> (jaw_open, lips_wide, lips_round, jaw dominance, lip dominance).
# Targets follow REFERENCE.md "Phone -> articulation". Dominance says how strongly a phone
# imposes its shape: vowels set both; alveolars and velars set the jaw (teeth nearly closed) but
# barely the lips, which then take their shape from the neighbouring vowels; /h/ sets nothing.
_PHONES: dict[str, tuple[float, float, float, float, float]] = {
    "aa": (0.85, 0.20, 0.00, 1.0, 1.0),
    "ae": (0.75, 0.45, 0.00, 1.0, 1.0),
    "ah": (0.60, 0.20, 0.00, 1.0, 1.0),
    "ao": (0.70, 0.00, 0.45, 1.0, 1.0),
    "ax": (0.40, 0.15, 0.00, 0.7, 0.5),
    "eh": (0.45, 0.50, 0.00, 1.0, 1.0),
    "er": (0.30, 0.10, 0.35, 1.0, 1.0),
    "ih": (0.30, 0.55, 0.00, 1.0, 1.0),
    "iy": (0.20, 0.80, 0.00, 1.0, 1.0),
    "uh": (0.30, 0.00, 0.50, 1.0, 1.0),
    "uw": (0.20, 0.00, 0.85, 1.0, 1.0),
    "p": (0.05, 0.0, 0.0, 1.0, 0.2),
    "b": (0.05, 0.0, 0.0, 1.0, 0.2),
    "m": (0.05, 0.0, 0.0, 1.0, 0.2),
    "f": (0.10, 0.15, 0.0, 0.8, 0.5),
    "v": (0.10, 0.15, 0.0, 0.8, 0.5),
    "th": (0.15, 0.10, 0.0, 0.7, 0.3),
    "dh": (0.15, 0.10, 0.0, 0.7, 0.3),
    "t": (0.15, 0.0, 0.0, 0.6, 0.15),
    "d": (0.15, 0.0, 0.0, 0.6, 0.15),
    "n": (0.15, 0.0, 0.0, 0.6, 0.15),
    "dx": (0.20, 0.0, 0.0, 0.4, 0.1),
    "s": (0.08, 0.30, 0.0, 0.8, 0.4),
    "z": (0.08, 0.30, 0.0, 0.8, 0.4),
    "l": (0.25, 0.0, 0.0, 0.5, 0.15),
    "r": (0.20, 0.0, 0.40, 0.5, 0.7),
    "w": (0.15, 0.0, 0.90, 0.6, 1.0),
    "y": (0.15, 0.50, 0.0, 0.6, 0.7),
    "sh": (0.15, 0.0, 0.35, 0.7, 0.7),
    "zh": (0.15, 0.0, 0.35, 0.7, 0.7),
    "ch": (0.15, 0.0, 0.35, 0.7, 0.7),
    "jh": (0.15, 0.0, 0.35, 0.7, 0.7),
    "k": (0.20, 0.0, 0.0, 0.3, 0.1),
    "g": (0.20, 0.0, 0.0, 0.3, 0.1),
    "ng": (0.20, 0.0, 0.0, 0.3, 0.1),
    "hh": (0.30, 0.0, 0.0, 0.05, 0.02),
    "pau": (0.0, 0.0, 0.0, 0.6, 0.6),
}
# Diphthongs glide between two phones: first 55% of the segment, then the rest.
_DIPHTHONGS = {"aw": ("aa", "uh"), "ay": ("aa", "iy"), "ey": ("eh", "iy"), "ow": ("ao", "uw"), "oy": ("ao", "iy")}
_ALIASES = {"ix": "ih", "axr": "er", "el": "l", "em": "m", "en": "n", "nx": "n", "q": "hh", "h#": "pau",
            "sil": "pau", "ssil": "pau", "#": "pau", "ax-h": "ax", "hv": "hh"}
BILABIALS = ("p", "b", "m")
_RELEASE_S = {"p": 0.012, "b": 0.010, "m": 0.0}  # burst at the end of a stop that is not closure
CLOSE_LEAD_S = 0.030  # lips start closing this long before the closure is heard
OPEN_LAG_S = 0.025  # and are apart again this long after the release
# dominance decay (s) before / after a phone: rounding anticipates about one phone
_TAU_BEFORE = np.array([0.035, 0.050, 0.070])  # jaw, wide, round
_TAU_AFTER = np.array([0.035, 0.040, 0.050])

# espeak-ng English phoneme mnemonics -> ARPAbet
_ESPEAK: dict[str, str] = {
    "n": "n", "d": "d", "t": "t", "I": "ih", "D": "dh", "s": "s", "a": "ae", "l": "l", "@": "ax",
    "m": "m", "V": "ah", "E": "eh", "r": "r", "v": "v", "z": "z", "i:": "iy", "w": "w", "0": "aa",
    "eI": "ey", "h": "hh", "k": "k", "b": "b", "f": "f", "aI": "ay", "p": "p", "@2": "ax", "I2": "ih",
    "oU": "ow", "a#": "ah", "g": "g", "U": "uh", "S": "sh", "3": "er", "O@": "ao", "aU": "aw",
    "T": "th", "O:": "ao", "3:": "er", "j": "y", "N": "ng", "u:": "uw", "i": "iy", "tS": "ch",
    "dZ": "jh", "e@": "eh", "@L": "l", "r-": "r", "A@": "aa", "o@": "ao", "aa": "ae", "I#": "ih",
    "aI2": "ay", "t2": "t", "i@3": "iy", "t[": "t", "A:": "aa", "t#": "dx", "OI": "oy", "aI@": "ay",
    "U@": "uh", "w#": "w", "i@": "iy", "@5": "ax", "O2": "ao", "VR": "ah", "Z": "zh", "aI3": "ay",
    "n-": "n", "IR": "ih", "e": "eh", "o": "ow", "O": "ao", "u": "uw", "A": "aa", "x": "k",
    "_:": "pau", "_": "pau", "_|": "pau", "_!": "hh", "?": "hh",
}
_ESPEAK_MODIFIERS = {";", "'", ",", "%", "=", ":"}  # marks that lengthen or colour the previous phone


def normalize_phone(label: str) -> str:
    """A synthesizer's phone label as a key of the articulation table (lower-case ARPAbet)."""
    label = re.sub(r"[0-9]+$", "", label.strip().lower())  # stress digits
    label = _ALIASES.get(label, label)
    if label in _PHONES or label in _DIPHTHONGS:
        return label
    return "hh"  # unknown: impose nothing, take the neighbours' shape


def _expand(phones: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    out = []
    for label, start, end in phones:
        label = normalize_phone(label)
        if label in _DIPHTHONGS:
            first, second = _DIPHTHONGS[label]
            mid = start + 0.55 * (end - start)
            out += [(first, start, mid), (second, mid, end)]
        elif end > start:
            out.append((label, start, end))
    return out


def articulation_targets(phones: list[tuple[str, float, float]], n_frames: int) -> np.ndarray:
    """Per-frame (jaw_open, lips_wide, lips_round, lips_closed) targets: (n_frames, 4) float32.

    phones: (label, start s, end s). Frame k covers [k, k+1) / FPS seconds.
    """
    segs = _expand(phones)
    t = (np.arange(n_frames * GRID_PER_FRAME) + 0.5) * GRID_S  # (n,)
    if not segs:
        return np.zeros((n_frames, 4), np.float32)
    start = np.array([s for _, s, _ in segs])[:, None]
    end = np.array([e for _, _, e in segs])[:, None]
    table = np.array([_PHONES[p] for p, _, _ in segs])  # (P, 5)
    target = table[:, :3]  # (P, 3)
    alpha = table[:, [3, 4, 4]].copy()  # jaw, wide, round dominance
    is_pause = np.array([p == "pau" for p, _, _ in segs])
    # short pauses between words must not drop the jaw: pause dominance grows with its length
    alpha[is_pause] *= np.clip((end - start)[is_pause] / 0.15, 0.05, 1.0)

    before = np.clip(start - t[None, :], 0, None)[:, :, None]  # (P, n, 1)
    after = np.clip(t[None, :] - end, 0, None)[:, :, None]
    weight = alpha[:, None, :] * np.exp(-before / _TAU_BEFORE - after / _TAU_AFTER)  # (P, n, 3)
    blend = (weight * target[:, None, :]).sum(0) / (weight.sum(0) + 1e-6)  # (n, 3)

    closed = np.zeros(len(t))
    for label, s, e in segs:
        if label not in BILABIALS:
            continue
        mid = 0.5 * (s + e)
        hold_from = min(s + 0.005, mid)
        hold_to = max(e - _RELEASE_S[label], mid)
        rise = np.clip((t - (hold_from - CLOSE_LEAD_S)) / CLOSE_LEAD_S, 0, 1)
        fall = np.clip(((hold_to + OPEN_LAG_S) - t) / OPEN_LAG_S, 0, 1)
        closed = np.maximum(closed, np.minimum(rise, fall))
    blend[:, 0] *= 1.0 - 0.9 * closed  # closed lips hold the jaw nearly shut

    frames = blend.reshape(n_frames, GRID_PER_FRAME, 3).mean(axis=1)
    # the closure is sharp: a frame that contains a full closure is closed
    closed_frames = closed.reshape(n_frames, GRID_PER_FRAME).max(axis=1)
    return np.concatenate([frames, closed_frames[:, None]], axis=1).astype(np.float32)


def bilabial_midpoints(phones: list[tuple[str, float, float]]) -> np.ndarray:
    """Frame index of each bilabial's midpoint (for the closure detection metric)."""
    mids = [0.5 * (s + e) for p, s, e in _expand(phones) if p in BILABIALS]
    return np.floor(np.array(mids, dtype=np.float64) * FPS).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

CONVERSATION = (
    "Hi everyone, can you all hear me okay?",
    "Let me share my screen for a moment.",
    "I think we should move the meeting to Thursday afternoon.",
    "Maybe we could meet at the bookshop tomorrow morning.",
    "Sorry, I was on mute the whole time.",
    "Could you repeat the last part, please?",
    "The numbers look much better than last month.",
    "We'll probably need more time to finish the report.",
    "My boss asked me to bring the blue folder.",
    "Who would like to go first?",
    "Good morning, and thank you for joining us today.",
    "That's a really good point, I hadn't thought about that.",
    "Please remember to book the room before Monday.",
    "Our new product will be ready by the beginning of June.",
    "Would you mind opening the window a bit?",
    "I'm happy to help if you need anything.",
    "The bus was late again, so I missed the first part.",
    "Before we begin, let's do a quick round of introductions.",
    "We measured the pressure at seven different points.",
    "Do you prefer coffee or tea?",
    "Two plus two is four, and four plus four is eight.",
    "Peter picked a bunch of purple plums from the market.",
    "Mom made a big bowl of warm soup for lunch.",
    "Bob bought a brand new bike with bright blue wheels.",
    "You should look at the moon through the telescope.",
    "Who knew the room would be so full of people?",
    "We were waiting by the water for over an hour.",
    "Please pass me the paper and the purple pen.",
    "The weather was wonderful for the whole week.",
    "I'd like to thank my team for all their hard work.",
    "Let's take a five minute break and come back at three.",
    "Our budget for the project is about two million.",
    "Can everybody see the slide with the blue chart?",
    "I'll send you the minutes after the meeting.",
    "How about we grab some food after work?",
    "The baby is sleeping, so please keep your voice down.",
    "Remember, the deadline is the end of the month.",
    "Excuse me, is this seat taken?",
    "What time does the museum open on Sunday?",
    "My phone battery is almost empty.",
    "I wonder whether the shop will still be open.",
    "We need a much simpler way to manage this.",
    "Honestly, I have no idea what happened.",
    "Maybe the problem is in the microphone.",
    "Oh wow, that is amazing news!",
    "Could you please summarize the main points?",
    "Let me know if you have any questions.",
    "Anyway, moving on to the next item on the agenda.",
    "I'm afraid I have to leave a bit early today.",
    "It's been a pleasure working with all of you.",
    "You know, I really enjoyed the movie.",
    "Um, I'm not sure about that, but maybe.",
    "The cheese pizza was cheaper than the chicken one.",
    "She sells sea shells by the sea shore.",
    "Which one would you choose?",
    "Beautiful blue balloons floated up into the sky.",
    "Push the button and wait for the beep.",
    "We moved from Boston to Memphis in May.",
    "Books and maps are on the bottom shelf.",
    "Few people knew about the new rules.",
    "Thank you so much, see you next week.",
    "Welcome back, it's good to see you again.",
    "The food was good, but the music was too loud.",
    "Happy birthday! I hope you have a wonderful day.",
    "Our office moved to the fourth floor.",
    "Everyone agreed to postpone the vote.",
    "I'm looking forward to your presentation.",
    "Please mute your microphone when you are not speaking.",
    "Umbrella, lemon, hammer, summer, number, member.",
    "Open the map and point to the mountain.",
)


def _bible_clauses() -> list[tuple[str, str]]:
    """(book reference, clause) pairs from the KJV; raises AvatarError without the bible tool."""
    try:
        text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise AvatarError("the KJV text is missing: apt-get install bible-kjv bible-kjv-text") from e
    out = []
    for line in text.splitlines():
        ref, _, verse = line.partition(" ")
        book = re.match(r"[0-9]?[A-Za-z]+", ref)
        for clause in re.split(r"(?<=[.;:?!])\s+", verse):
            words = clause.split()
            if 4 <= len(words) <= 24:
                out.append((book.group(0) if book else "", clause))
    return out


def text_pools(seed: int) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences). Held out: Psalms and every fifth conversational one."""
    rng = np.random.default_rng(seed)
    clauses = _bible_clauses()
    train = [c for b, c in clauses if b != "Ps"]
    held = [c for b, c in clauses if b == "Ps"]
    rng.shuffle(train)
    rng.shuffle(held)
    conv_train = [s for i, s in enumerate(CONVERSATION) if i % 5 != 4]
    conv_held = [s for i, s in enumerate(CONVERSATION) if i % 5 == 4]
    return conv_train + train, conv_held + held


def _clean_text(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ,.;:?!'-]", " ", text).strip()


# --------------------------------------------------------------------------------------------
# Synthesizers
# --------------------------------------------------------------------------------------------


class _EspeakEvent(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.POINTER(_EspeakEvent))


class Espeak:
    """libespeak-ng in synchronous mode with phoneme events: the start of every phone, in ms."""

    _EVENT_PHONEME = 7
    _RATE, _PITCH, _RANGE = 1, 3, 4

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        # AUDIO_OUTPUT_SYNCHRONOUS = 2, espeakINITIALIZE_PHONEME_EVENTS = 1
        self.rate = self.lib.espeak_Initialize(2, 0, None, 1)
        if self.rate <= 0:
            raise AvatarError("libespeak-ng failed to initialise")
        self._audio: list[np.ndarray] = []
        self._events: list[tuple[int, str]] = []
        self._callback = _SYNTH_CALLBACK(self._on_synth)  # kept alive as long as self
        self.lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._audio.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:
            if events[i].type == self._EVENT_PHONEME:
                self._events.append((events[i].audio_position, events[i].id.decode(errors="replace")))
            i += 1
        return 0

    def synth(self, text: str, voice: Voice, range_: int = 50) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
        self._audio, self._events = [], []
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise AvatarError(f"espeak-ng has no voice {voice.name!r}")
        self.lib.espeak_SetParameter(self._RATE, voice.rate_wpm, 0)
        self.lib.espeak_SetParameter(self._PITCH, voice.pitch, 0)
        self.lib.espeak_SetParameter(self._RANGE, range_, 0)
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self._audio).astype(np.float32) / 32768.0 if self._audio else np.zeros(1, np.float32)
        audio = scipy.signal.resample_poly(audio, SAMPLE_RATE, self.rate).astype(np.float32)
        duration = len(audio) / SAMPLE_RATE
        phones: list[tuple[str, float, float]] = []
        for i, (ms, name) in enumerate(self._events):
            if name in _ESPEAK_MODIFIERS:
                continue  # the previous phone simply runs on
            start = ms / 1000.0
            label = _ESPEAK.get(name, _ESPEAK.get(name.rstrip(";'#:"), "hh"))
            if phones:
                phones[-1] = (phones[-1][0], phones[-1][1], start)
            phones.append((label, start, duration))
        return audio, [p for p in phones if p[2] > p[1]]


def _read_wav(path: Path) -> np.ndarray:
    """Any wav -> 16 kHz mono float32."""
    import scipy.io.wavfile

    rate, data = scipy.io.wavfile.read(path)
    data = data.astype(np.float32) / (32768.0 if data.dtype == np.int16 else 1.0)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        data = scipy.signal.resample_poly(data, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return data


def _flite(text: str, voice: Voice, tmp: Path) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    wav = tmp / "flite.wav"
    cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={voice.stretch:.3f}", "-psdur", "-t", text, "-o", str(wav)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    audio = _read_wav(wav)
    phones, prev = [], 0.0
    for item in out.split():
        label, _, end = item.rpartition(":")
        end_s = float(end)
        phones.append((label, prev, end_s))
        prev = end_s
    return audio, phones


def _festival(text: str, voice: Voice, tmp: Path) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    wav = tmp / "festival.wav"
    script = tmp / "say.scm"
    quoted = text.replace("\\", " ").replace('"', " ")
    script.write_text(
        f"(voice_{voice.name})\n"
        f"(Parameter.set 'Duration_Stretch {voice.stretch:.3f})\n"
        f'(set! utt (Utterance Text "{quoted}"))\n'
        "(utt.synth utt)\n"
        f'(utt.save.wave utt "{wav}" \'riff)\n'
        '(mapcar (lambda (s) (format t "SEG %s %f %f\\n" (item.name s) (item.feat s "segment_start") '
        "(item.feat s \"end\"))) (utt.relation.items utt 'Segment))\n"
    )
    out = subprocess.run(["festival", "-b", str(script)], capture_output=True, text=True, check=True, timeout=120).stdout
    phones = [(p[1], float(p[2]), float(p[3])) for p in (line.split() for line in out.splitlines()) if len(p) == 4 and p[0] == "SEG"]
    return _read_wav(wav), phones


def _sox_pitch(audio: np.ndarray, semitones: float) -> np.ndarray:
    """Shift pitch and formants together (timing kept) with sox's WSOLA pitch effect."""
    if abs(semitones) < 1e-3:
        return audio
    raw = np.clip(audio * 32767, -32768, 32767).astype("<i2").tobytes()
    fmt = ["-t", "raw", "-r", str(SAMPLE_RATE), "-e", "signed", "-b", "16", "-c", "1"]
    out = subprocess.run(["sox", *fmt, "-", *fmt, "-", "pitch", f"{100 * semitones:.0f}", "rate", str(SAMPLE_RATE)],
                         input=raw, capture_output=True, check=True, timeout=60).stdout
    shifted = np.frombuffer(out, "<i2").astype(np.float32) / 32768.0
    return np.pad(shifted, (0, max(0, len(audio) - len(shifted))))[: len(audio)]


def synthesize(text: str, voice: Voice, tmp: Path, espeak: Espeak | None = None):
    """-> (16 kHz float32 audio, phones [(ARPAbet, start s, end s)]) with silence padded around."""
    text = _clean_text(text)
    if voice.engine == "espeak":
        audio, phones = (espeak or Espeak()).synth(text, voice)
    elif voice.engine == "flite":
        audio, phones = _flite(text, voice, tmp)
    elif voice.engine == "festival":
        audio, phones = _festival(text, voice, tmp)
    else:
        raise ValueError(voice.engine)
    audio = _sox_pitch(audio, voice.semitones)
    duration = len(audio) / SAMPLE_RATE
    # synthesizers' final pause may overrun the audio (flite kal): clip every phone to the audio
    phones = [(p, min(s, duration), min(e, duration)) for p, s, e in phones]
    lead = int(LEAD_SILENCE_S * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(int(TAIL_SILENCE_S * SAMPLE_RATE), np.float32)])
    audio = np.pad(audio, (0, -len(audio) % SAMPLES_PER_FRAME))
    phones = [("pau", 0.0, LEAD_SILENCE_S)] + [(p, s + LEAD_SILENCE_S, e + LEAD_SILENCE_S) for p, s, e in phones if e > s]
    phones.append(("pau", phones[-1][2], len(audio) / SAMPLE_RATE))
    return audio.astype(np.float32), phones


def hum(rng: np.random.Generator, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """A voiced, vowel-like harmonic sound with a gliding f0 (teaches voicing and pitch on
    sustained tones): -> (audio, f0 per sample in Hz, 0 where silent)."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f_start, f_end = np.exp(rng.uniform(np.log(70), np.log(380), 2))
    f0 = np.exp(np.linspace(np.log(f_start), np.log(f_end), n)) * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tilt = rng.uniform(0.7, 1.6)
    wave = sum(np.sin(k * phase + rng.uniform(0, 6.28)) / k**tilt * (k * f0 < 7500) for k in range(1, 60))
    for formant in rng.uniform([250, 800, 2200], [900, 2400, 3200]):  # a random vowel colour
        b, a = scipy.signal.iirpeak(formant, formant / rng.uniform(60, 150), SAMPLE_RATE)
        wave = wave + 2.0 * scipy.signal.lfilter(b, a, wave)
    on = np.ones(n)
    gap = rng.uniform(0.1, 0.4)
    on[: int(gap * SAMPLE_RATE)] = 0
    on[n - int(gap * SAMPLE_RATE):] = 0
    wave = (wave * on / (np.abs(wave).max() + 1e-9) * 0.5).astype(np.float32)
    return wave, (f0 * on).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f^exponent: 0 white, 1 pink, 2 brown."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    noise = np.fft.irfft(spec / f ** (exponent / 2), n)
    return noise / (noise.std() + 1e-12)


def room_response(rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: direct sound, then exponentially decaying noise
    (RT60 0.1-0.7 s) that starts after a few ms, lowpassed as walls absorb high frequencies."""
    rt60 = rng.uniform(0.1, 0.7)
    n = int(min(rt60, 0.6) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail[: int(rng.uniform(0.002, 0.012) * SAMPLE_RATE)] = 0
    b, a = scipy.signal.butter(1, rng.uniform(2500, 7000), fs=SAMPLE_RATE)
    tail = scipy.signal.lfilter(b, a, tail)
    drr_db = rng.uniform(-3, 12)  # direct-to-reverberant ratio
    tail *= 10 ** (-drr_db / 20) / (np.sqrt((tail**2).sum()) + 1e-12)
    tail[0] = 1.0
    return tail


def microphone_eq(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(["telephone", "laptop", "tilt"])
    if kind == "telephone":  # 8 kHz codec band: 300-3400 Hz
        sos = scipy.signal.butter(4, [rng.uniform(200, 400), rng.uniform(3000, 3600)], "bandpass", fs=SAMPLE_RATE, output="sos")
        return scipy.signal.sosfilt(sos, audio)
    if kind == "laptop":  # small capsule: weak bass, a presence peak, early rolloff
        sos = scipy.signal.butter(2, rng.uniform(150, 400), "highpass", fs=SAMPLE_RATE, output="sos")
        audio = scipy.signal.sosfilt(sos, audio)
        f = rng.uniform(1500, 5000)
        b, a = scipy.signal.iirpeak(f, rng.uniform(1, 3), SAMPLE_RATE)
        audio = audio + rng.uniform(0.5, 1.5) * scipy.signal.lfilter(b, a, audio)
        sos = scipy.signal.butter(4, rng.uniform(5000, 7500), fs=SAMPLE_RATE, output="sos")
        return scipy.signal.sosfilt(sos, audio)
    # spectral tilt with a first-order shelf
    b, a = scipy.signal.butter(1, rng.uniform(500, 3000), "highpass" if rng.random() < 0.5 else "lowpass", fs=SAMPLE_RATE)
    mix = rng.uniform(0.3, 0.8)
    return mix * scipy.signal.lfilter(b, a, audio) + (1 - mix) * audio


def augment(clean: np.ndarray, rng: np.random.Generator, babble: list[np.ndarray]) -> tuple[np.ndarray, dict]:
    """What a microphone in a room might hear of `clean`. Same length, timing unchanged."""
    info: dict = {}
    x = clean.astype(np.float64)
    speech_rms = np.sqrt(np.mean(x[np.abs(x) > 1e-4] ** 2)) if np.any(np.abs(x) > 1e-4) else 1e-3
    if rng.random() < 0.8:  # 20% stay clean apart from level
        if rng.random() < 0.4:
            x = scipy.signal.fftconvolve(x, room_response(rng))[: len(x)]
            info["reverb"] = True
        if rng.random() < 0.75:
            kind = rng.choice(["white", "pink", "brown", "babble"], p=[0.25, 0.3, 0.15, 0.3])
            if kind == "babble" and babble:
                noise = np.zeros(len(x))
                for _ in range(rng.integers(3, 7)):
                    b = babble[rng.integers(len(babble))]
                    offset = rng.integers(0, max(1, len(b) - 1))
                    noise += np.resize(np.roll(b, -offset), len(x))
                noise /= noise.std() + 1e-12
            else:
                noise = _colored_noise(rng, len(x), {"white": 0.0, "pink": 1.0, "brown": 2.0, "babble": 1.0}[kind])
            snr = rng.uniform(5, 30)
            x = x + noise * speech_rms * 10 ** (-snr / 20)
            info["noise"], info["snr_db"] = str(kind), float(snr)
        if rng.random() < 0.5:
            x = microphone_eq(x, rng)
            info["eq"] = True
    level_db = rng.uniform(-42, -14)  # speech level; +-14 dB around -28 dBFS
    active = np.abs(clean) > 1e-4
    rms = np.sqrt(np.mean(x[active] ** 2)) if active.any() else np.sqrt(np.mean(x**2)) + 1e-9
    x = x * (10 ** (level_db / 20) / (rms + 1e-12))
    info["level_db"] = float(level_db)
    if rng.random() < 0.75:
        # a real microphone's self-noise (-90..-60 dBFS), so a muted or silent room is learned as
        # silence; the other quarter keeps digital zeros between words
        floor_db = rng.uniform(-90, -60)
        x = x + _colored_noise(rng, len(x), float(rng.choice([0.0, 1.0]))) * 10 ** (floor_db / 20)
        info["floor_db"] = float(floor_db)
    return np.clip(x, -1.0, 1.0).astype(np.float32), info


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    voice: Voice
    text: str
    clean: np.ndarray  # (N,) float32 16 kHz, N a multiple of SAMPLES_PER_FRAME
    heard: np.ndarray  # (N,) the augmented version the network hears
    articulation: np.ndarray  # (N / 400, 4) jaw, wide, round, closed per frame; NaN where unknown
    phones: list  # [(ARPAbet, start s, end s)]
    augmentation: dict
    f0_hz: np.ndarray | None = None  # per frame, only for hums and room tone (known exactly)


def _shift_semitones(rng: np.random.Generator) -> float:
    # every flite/festival training voice is male; shifting up to +7 semitones (pitch and formants
    # together) gives higher, shorter-tract voices too
    return float(rng.uniform(-3, 7)) if rng.random() < 0.8 else 0.0


def random_voice(rng: np.random.Generator, held_out: bool) -> Voice:
    """A voice drawn from the training pool, or from the held-out pool."""
    while True:
        engine = rng.choice(["espeak", "flite", "festival"], p=[0.55, 0.3, 0.15])
        if engine == "espeak":
            dialect = str(rng.choice(ESPEAK_DIALECTS))
            variant = str(rng.choice(ESPEAK_VARIANTS))
            name = dialect + (f"+{variant}" if variant else "")
            voice = Voice("espeak", name, rate_wpm=int(rng.integers(120, 221)), pitch=int(rng.integers(30, 71)))
        elif engine == "flite":
            voice = Voice("flite", str(rng.choice(FLITE_VOICES)), stretch=float(rng.uniform(0.8, 1.3)),
                          semitones=_shift_semitones(rng))
        else:
            voice = Voice("festival", str(rng.choice(FESTIVAL_VOICES)), stretch=float(rng.uniform(0.8, 1.3)),
                          semitones=_shift_semitones(rng))
        if voice.held_out == held_out:
            return voice


def make_job(index: int, seed: int, held_out: bool, text: str, hum_fraction: float = 0.0,
             silence_fraction: float = 0.0):
    rng = np.random.default_rng([seed, index, int(held_out)])
    draw = rng.random()
    if draw < hum_fraction:
        return ("hum", index, seed, held_out, text)
    if draw < hum_fraction + silence_fraction:
        return ("silence", index, seed, held_out, text)
    return (random_voice(rng, held_out), index, seed, held_out, text)


def room_tone(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Nobody speaking: microphone self-noise and room noise, -90..-45 dBFS, sometimes EQ'd.
    Teaches that steady quiet noise is silence (relaxed lips), not a stop closure."""
    n = int(seconds * SAMPLE_RATE)
    noise = _colored_noise(rng, n, float(rng.choice([0.0, 1.0, 2.0])))
    if rng.random() < 0.5:
        noise = microphone_eq(noise, rng)
    noise = noise / (np.std(noise) + 1e-12) * 10 ** (rng.uniform(-90, -45) / 20)
    return np.pad(noise, (0, -n % SAMPLES_PER_FRAME)).astype(np.float32)


_WORKER: dict = {}


def _worker_espeak() -> Espeak:
    if "espeak" not in _WORKER:
        _WORKER["espeak"] = Espeak()
        _WORKER["tmp"] = Path(tempfile.mkdtemp(prefix="vasa-speech-"))
    return _WORKER["espeak"]


def _babble_bank(seed: int) -> list[np.ndarray]:
    if "babble" not in _WORKER:
        rng = np.random.default_rng([seed, 99])
        espeak = _worker_espeak()
        texts = [s for s in CONVERSATION[::7]]
        bank = []
        for text in texts:
            voice = Voice("espeak", str(rng.choice(["en-us", "en-gb-x-rp", "en"])) + "+" + str(rng.choice(["m1", "f1", "m3", "f2"])),
                          rate_wpm=int(rng.integers(140, 200)), pitch=int(rng.integers(30, 70)))
            audio, _ = espeak.synth(_clean_text(text), voice)
            bank.append(audio / (audio.std() + 1e-9))
        _WORKER["babble"] = bank
    return _WORKER["babble"]


def render_job(job) -> Utterance:
    """Synthesize, label and augment one utterance (runs in a worker process)."""
    voice, index, seed, held_out, text = job
    espeak = _worker_espeak()
    tmp = _WORKER["tmp"]
    rng = np.random.default_rng([seed, index, int(held_out), 1])
    if voice == "hum":
        audio, f0 = hum(rng, rng.uniform(0.8, 2.5))
        audio = np.pad(audio, (0, -len(audio) % SAMPLES_PER_FRAME))
        f0 = np.pad(f0, (0, len(audio) - len(f0)))
        n_frames = len(audio) // SAMPLES_PER_FRAME
        frame_f0 = f0.reshape(n_frames, SAMPLES_PER_FRAME)
        # a frame is voiced (with its mean f0) only where the tone covers all of it
        frame_hz = np.where(frame_f0.min(axis=1) > 0, frame_f0.mean(axis=1), 0.0)
        art = np.full((n_frames, 4), np.nan, np.float32)
        heard, info = augment(audio, rng, _babble_bank(seed))
        return Utterance(Voice("hum", "hum"), "", audio, heard, art, [], info, frame_hz.astype(np.float32))
    if voice == "silence":
        heard = room_tone(rng, rng.uniform(1.0, 4.0))
        n_frames = len(heard) // SAMPLES_PER_FRAME
        zeros = np.zeros((n_frames, 4), np.float32)
        return Utterance(Voice("silence", "room"), "", np.zeros_like(heard), heard, zeros, [], {"room_tone": True},
                         np.zeros(n_frames, np.float32))
    clean, phones = synthesize(text, voice, tmp, espeak)
    n_frames = len(clean) // SAMPLES_PER_FRAME
    art = articulation_targets(phones, n_frames)
    heard, info = augment(clean, rng, _babble_bank(seed))
    return Utterance(voice, text, clean, heard, art, phones, info)


def tool_versions() -> dict[str, str]:
    out = {}
    for cmd in (["espeak-ng", "--version"], ["flite", "--version"], ["festival", "--version"], ["sox", "--version"]):
        try:
            out[cmd[0]] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0][:80]
        except (OSError, subprocess.SubprocessError, IndexError):
            out[cmd[0]] = "missing"
    return out


def voice_dict(voice: Voice) -> dict:
    return dataclasses.asdict(voice)
