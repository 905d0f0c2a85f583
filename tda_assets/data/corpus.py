"""The embedded synthetic music corpus: seeded melodies by a few "artists", each an audible style, rendered with a GM
SoundFont."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

if TYPE_CHECKING:
    import tinysoundfont

SAMPLE_RATE = 16000
CLIP_SECONDS = 4.096  # 65536 samples at 16 kHz
CLIP_SAMPLES = round(SAMPLE_RATE * CLIP_SECONDS)
PEAK = 0.9

_NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "pentatonic": (0, 2, 4, 7, 9),
    "blues": (0, 3, 5, 6, 7, 10),
}
_MODE_LABEL = {"pentatonic": "major pentatonic"}


@dataclass(frozen=True)
class ArtistStyle:
    """An "artist": an audible style (timbre, scale, tempo, rhythm, register, mood)."""

    name: str
    nickname: str
    program: int
    timbre_words: tuple[str, ...]
    tonic: int
    mode: str
    bpm: int
    rhythm: tuple[float, ...]
    register: str
    mood: str


ARTISTS: tuple[ArtistStyle, ...] = (
    ArtistStyle(
        "artist_00",
        "Glass Harbor",
        24,
        ("plucked", "nylon-string guitar"),
        62,
        "minor",
        72,
        (1, 0.5, 0.5, 1, 1),
        "mid",
        "wistful",
    ),
    ArtistStyle(
        "artist_01",
        "Copper Lantern",
        13,
        ("wooden", "xylophone"),
        72,
        "major",
        152,
        (0.5, 0.5, 0.25, 0.25, 0.5),
        "high",
        "playful",
    ),
    ArtistStyle("artist_02", "Velvet Cellar", 42, ("bowed", "cello"), 43, "phrygian", 58, (2, 1, 1), "low", "brooding"),
    ArtistStyle(
        "artist_03",
        "Neon Static",
        81,
        ("buzzing", "sawtooth synth lead"),
        57,
        "dorian",
        132,
        (0.75, 0.75, 0.5),
        "mid",
        "driving",
    ),
    ArtistStyle(
        "artist_04", "Willow Smoke", 73, ("breathy", "flute"), 79, "pentatonic", 88, (1.5, 0.5, 1, 1), "high", "calm"
    ),
    ArtistStyle(
        "artist_05",
        "Iron Tide",
        33,
        ("deep", "electric bass"),
        33,
        "blues",
        112,
        (0.5, 0.5, 1, 0.5, 0.5, 1),
        "low",
        "groovy",
    ),
    ArtistStyle(
        "artist_06",
        "Quiet Orchard",
        11,
        ("shimmering", "vibraphone"),
        65,
        "lydian",
        100,
        (2 / 3, 2 / 3, 2 / 3, 1, 1),
        "mid",
        "dreamy",
    ),
    ArtistStyle(
        "artist_07", "Red Compass", 56, ("brassy", "trumpet"), 70, "mixolydian", 120, (1, 0.5, 0.5, 2), "mid", "bold"
    ),
)


def _key_name(style: ArtistStyle) -> str:
    return f"{_NOTE_NAMES[style.tonic % 12]} {_MODE_LABEL.get(style.mode, style.mode)}"


def _tempo_word(bpm: int) -> str:
    return "slow" if bpm < 80 else "mid-tempo" if bpm < 115 else "fast"


def _register_word(register: str) -> str:
    return {"low": "low-register", "mid": "mid-range", "high": "high-pitched"}[register]


_PHRASINGS = (
    "a {tempo}, {mood} {adj} {inst} melody in {key} at {bpm} bpm",
    "{mood} {register} {inst} line in {key}, {adj} and {tempo}, {bpm} bpm",
    "solo {inst}: a {adj}, {mood} tune in {key} at {bpm} bpm",
    "{tempo} {key} melody played on {inst}, {register} and {mood}, {bpm} bpm",
    "{bpm} bpm {adj} {inst} phrase in {key}, {tempo} and {mood}",
)


def _caption(style: ArtistStyle, phrasing: int | str) -> str:
    adj, inst = style.timbre_words[0], style.timbre_words[-1]
    template = _PHRASINGS[phrasing] if isinstance(phrasing, int) else phrasing
    return template.format(
        tempo=_tempo_word(style.bpm),
        mood=style.mood,
        adj=adj,
        inst=inst,
        key=_key_name(style),
        bpm=style.bpm,
        register=_register_word(style.register),
    )


def style_caption(style: ArtistStyle, rng: random.Random) -> str:
    """A caption written from the style's parameters in one of several phrasings; never names the artist."""
    return _caption(style, rng.randrange(len(_PHRASINGS)))


_PROMPT = "{mood} {tempo} music for {adj} {inst} in {key}, around {bpm} bpm"  # a phrasing no training caption uses


def style_prompt(style: ArtistStyle) -> str:
    """The built-in query prompt for a style: held out, in a phrasing that no training caption uses."""
    return _caption(style, _PROMPT)


def soundfont_path() -> str:
    """The General MIDI SoundFont shipped in the pretty_midi (or tinysoundfont) package."""
    candidates = []
    for module in ("pretty_midi", "tinysoundfont"):
        try:
            pkg = __import__(module)
        except ImportError:
            continue
        candidates.append(os.path.join(os.path.dirname(pkg.__file__), "TimGM6mb.sf2"))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise RuntimeError(
        f"General MIDI SoundFont TimGM6mb.sf2 not found (looked in {candidates or 'no installed package'}): "
        "install it with `pip install pretty_midi` (and the synth with `pip install --no-deps tinysoundfont`)"
    )


@lru_cache(maxsize=1)
def _soundfont_bytes() -> bytes:
    with open(soundfont_path(), "rb") as f:
        return f.read()


def _new_synth(program: int) -> tinysoundfont.Synth:
    try:
        import tinysoundfont
    except ImportError as e:
        raise RuntimeError("tinysoundfont is not installed: `pip install --no-deps tinysoundfont`") from e
    synth = tinysoundfont.Synth(samplerate=SAMPLE_RATE)
    try:
        sfid = synth.sfload(_soundfont_bytes())
    except Exception as e:
        raise RuntimeError(
            f"could not load SoundFont {soundfont_path()}: {e}; reinstall with `pip install pretty_midi`"
        ) from e
    for chan in (0, 1):
        synth.program_select(chan, sfid, 0, program)
    return synth


def _scale_notes(style: ArtistStyle) -> list[int]:
    steps = SCALES[style.mode]
    return [n for n in range(style.tonic - 3, style.tonic + 16) if (n - style.tonic) % 12 in steps]


def _melody(style: ArtistStyle, rng: random.Random) -> list[tuple[float, float, int, int, int]]:
    """Events (start_beat, length_beats, midi_note, velocity, channel) for one clip: a random walk in the style's
    scale and rhythm."""
    notes = _scale_notes(style)
    beats = CLIP_SECONDS * style.bpm / 60
    idx = notes.index(style.tonic) + rng.choice((0, 0, 2))
    pattern = list(style.rhythm)
    shift = rng.randrange(len(pattern))
    pattern = pattern[shift:] + pattern[:shift]
    events: list[tuple[float, float, int, int, int]] = []
    t, k = rng.choice((0.0, 0.0, 0.25)), 0
    while t < beats:
        dur = pattern[k % len(pattern)]
        if dur >= 1 and rng.random() < 0.15:  # seeded variation: split a long note in two
            dur /= 2
        accent = k % len(pattern) == 0
        if rng.random() > 0.08 or accent:  # occasional rest
            events.append((t, dur, notes[idx], rng.randint(96, 118) if accent else rng.randint(72, 100), 0))
        step = rng.choice((-2, -1, -1, 0, 1, 1, 2)) if rng.random() > 0.1 else rng.choice((-4, -3, 3, 4))
        idx = min(max(idx + step, 0), len(notes) - 1)
        t, k = t + dur, k + 1
    if style.register != "low":  # accompaniment: the tonic an octave below on every bar
        events += [(float(bar), 3.5, style.tonic - 12, 58, 1) for bar in range(0, int(beats) + 1, 4)]
    return events


def render_clip(style: ArtistStyle, seed: int) -> np.ndarray:
    """A new melody in the style (float32 mono, SAMPLE_RATE, exactly CLIP_SECONDS), peak-normalized to 0.9."""
    rng = random.Random(f"{style.name}:{seed}")
    synth = _new_synth(style.program)
    spb = SAMPLE_RATE * 60 / style.bpm
    actions: list[
        tuple[int, int, int, int, int]
    ] = []  # (sample, order, channel, note, velocity): note-offs first at a tie
    for start, length, note, velocity, chan in _melody(style, rng):
        actions.append((round(start * spb), 1, chan, note, velocity))
        actions.append((round((start + 0.92 * length) * spb), 0, chan, note, 0))
    actions.sort()
    out = np.zeros((CLIP_SAMPLES, 2), dtype=np.float32)
    pos = 0
    for at, _, chan, note, velocity in actions:
        at = min(at, CLIP_SAMPLES)
        if at > pos:
            out[pos:at] = np.frombuffer(synth.generate(at - pos), dtype=np.float32).reshape(-1, 2)
            pos = at
        if velocity:
            synth.noteon(chan, note, velocity)
        else:
            synth.noteoff(chan, note)
    if pos < CLIP_SAMPLES:
        out[pos:] = np.frombuffer(synth.generate(CLIP_SAMPLES - pos), dtype=np.float32).reshape(-1, 2)
    audio = out.mean(axis=1)
    fade = int(0.02 * SAMPLE_RATE)
    audio[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    peak = float(np.abs(audio).max())
    if peak < 1e-4:
        raise RuntimeError(f"rendered a silent clip for {style.name} (program {style.program}) seed {seed}")
    return (audio * (PEAK / peak)).astype(np.float32)


def generate_corpus(
    out_dir: str | Path, clips_per_artist: int = 40, seed: int = 0, artists: int | None = None
) -> list[dict]:
    """Writes out_dir/<artist>/<item_id>.wav (16 kHz mono PCM_16) per clip; returns rows item_id, audio_path,
    caption, artist, duration_s."""
    out = Path(out_dir).resolve()
    rows: list[dict] = []
    for a, style in enumerate(ARTISTS[: len(ARTISTS) if artists is None else artists]):
        (out / style.name).mkdir(parents=True, exist_ok=True)
        for i in range(clips_per_artist):
            item_id = f"a{a:02d}-{i:04d}"
            clip_seed = seed * 1_000_003 + i
            path = out / style.name / f"{item_id}.wav"
            sf.write(path, render_clip(style, clip_seed), SAMPLE_RATE, subtype="PCM_16", format="WAV")
            caption = style_caption(style, random.Random(f"caption:{seed}:{a}:{i}"))
            rows.append(
                {
                    "item_id": item_id,
                    "audio_path": str(path),
                    "caption": caption,
                    "artist": style.name,
                    "duration_s": CLIP_SECONDS,
                }
            )
    return rows
