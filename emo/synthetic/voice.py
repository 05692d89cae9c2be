"""Synthetic vocal tracks with exact per-frame mouth labels.

A source-filter voice: a glottal pulse train (harmonics of a time-varying pitch f0, phase
accumulated so pitch glides are smooth) whose harmonic amplitudes follow a formant envelope
(F1, F2, F3 resonances of the current vowel), shaped by per-syllable envelopes, with short
noise bursts for consonant onsets. A track alternates spoken phrases (syllables of 90-280 ms,
declining pitch, accents) and sung phrases (held notes on a scale with vibrato), separated
by pauses.

The mouth labels are a deterministic function of what was synthesised: opening = loudness
envelope x vowel openness (F1), width = vowel frontness (F2), both averaged over each video
frame's samples and smoothed lightly. A model that learns lip sync from this corpus has to
map audio to exactly these numbers, so evaluation can compare against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Vowel formants (Hz) of an adult voice: F1 rises with jaw opening, F2 with tongue frontness.
VOWELS = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (300.0, 2250.0, 2890.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (320.0, 870.0, 2240.0),
}
F1_RANGE = (300.0, 730.0)  # closed ... open
F2_RANGE = (840.0, 2250.0)  # rounded ... spread
BANDWIDTHS = (80.0, 100.0, 140.0)
MAX_HARMONIC_HZ = 6000.0


@dataclass
class VoiceTrack:
    """A synthetic vocal track and its per-frame ground truth."""

    audio: np.ndarray  # (N,) float32 in [-1, 1]
    mouth_open: np.ndarray  # (F,) float32 in [0, 1]
    mouth_width: np.ndarray  # (F,) float32 in [0, 1]
    sung: np.ndarray  # (F,) bool: frame lies in a sung phrase
    phrases: list[dict]  # [{"kind": "speech"|"song", "start": s, "end": s}]


@dataclass
class _Score:
    """Sample-rate control curves of the voice, filled phrase by phrase."""

    f0: np.ndarray
    gain: np.ndarray
    f1: np.ndarray
    f2: np.ndarray
    f3: np.ndarray
    noise: np.ndarray


def _blank_score(samples: int) -> _Score:
    zeros = np.zeros(samples, np.float32)
    first = VOWELS["a"]
    return _Score(
        f0=np.full(samples, 150.0, np.float32),
        gain=zeros.copy(),
        f1=np.full(samples, first[0], np.float32),
        f2=np.full(samples, first[1], np.float32),
        f3=np.full(samples, first[2], np.float32),
        noise=zeros.copy(),
    )


def _envelope(length: int, attack: int, release: int) -> np.ndarray:
    """Raised-cosine attack and release around a flat middle."""
    env = np.ones(length, np.float32)
    attack, release = min(attack, length // 2), min(release, length // 2)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, attack))
    if release:
        env[length - release :] = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, release))
    return env


def _put_vowel(
    score: _Score, span: tuple[int, int], vowel: str, f0: np.ndarray, loud: float, sr: int
) -> None:
    """Write one voiced syllable nucleus into the score at samples [start, end)."""
    start, end = span[0], min(span[1], len(score.gain))
    length = end - start
    if length <= 0:
        return
    env = _envelope(length, attack=min(int(0.025 * sr), length // 3), release=int(0.04 * sr))
    score.gain[start:end] = np.maximum(score.gain[start:end], loud * env)
    score.f0[start:end] = f0[:length]
    score.f1[start:end], score.f2[start:end], score.f3[start:end] = VOWELS[vowel]


def _speech_phrase(
    rng: np.random.Generator, score: _Score, start: int, end: int, sr: int, base: float
) -> None:
    """Syllables with declining pitch and accents, from ``start`` to at most ``end``."""
    position = start
    while position < end:
        length = int(rng.uniform(0.09, 0.28) * sr)
        if position + length > end:
            break
        onset = int(rng.uniform(0.0, 0.05) * sr) if rng.random() < 0.7 else 0
        if onset:  # a consonant: a short noise burst, mouth nearly closed
            burst = _envelope(onset, onset // 4, onset // 2) * rng.uniform(0.08, 0.2)
            score.noise[position : position + onset] = burst
        t = np.arange(length - onset) / sr
        progress = (position - start) / max(1, end - start)
        accent = 1.25 if rng.random() < 0.25 else 1.0
        f0 = base * accent * (1.0 - 0.2 * progress) * (1 + 0.04 * np.sin(2 * np.pi * 3 * t))
        vowel = str(rng.choice(list(VOWELS)))
        span = (position + onset, position + length)
        _put_vowel(score, span, vowel, f0, float(rng.uniform(0.5, 1.0)), sr)
        position += length + (int(rng.uniform(0.02, 0.12) * sr) if rng.random() < 0.4 else 0)


def _song_phrase(
    rng: np.random.Generator, score: _Score, start: int, end: int, sr: int, base: float
) -> None:
    """Held notes of a major scale with vibrato, legato."""
    scale = np.array([0, 2, 4, 5, 7, 9, 11, 12])
    position, step = start, int(rng.integers(0, 5))
    while position < end:
        length = int(rng.uniform(0.3, 0.9) * sr)
        if position + length > end:
            break
        step = int(np.clip(step + rng.integers(-2, 3), 0, len(scale) - 1))
        t = np.arange(length) / sr
        vibrato = 2 ** (0.4 / 12 * np.sin(2 * np.pi * 5.5 * t) * np.clip(t / 0.2, 0, 1))
        f0 = base * 1.3 * 2 ** (scale[step] / 12) * vibrato
        vowel = str(rng.choice(["a", "o", "e", "u", "i"], p=[0.35, 0.25, 0.2, 0.1, 0.1]))
        _put_vowel(
            score, (position, position + length), vowel, f0, float(rng.uniform(0.8, 1.0)), sr
        )
        position += length + int(0.03 * sr)


def _render_audio(score: _Score, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Additive synthesis: harmonics of f0 weighted by the formant envelope at k*f0."""
    phase = 2 * np.pi * np.cumsum(score.f0.astype(np.float64)) / sr
    audio = np.zeros(len(score.f0), np.float64)
    for k in range(1, int(MAX_HARMONIC_HZ / 80.0) + 1):
        freq = k * score.f0
        weight = np.zeros_like(freq)
        for formant, bandwidth in zip((score.f1, score.f2, score.f3), BANDWIDTHS, strict=True):
            weight += 1.0 / (1.0 + ((freq - formant) / bandwidth) ** 2)
        weight *= (freq < MAX_HARMONIC_HZ) / k**0.5
        audio += weight * np.sin(k * phase)
    audio *= score.gain
    noise = rng.standard_normal(len(audio))
    noise = np.convolve(noise, np.ones(4) / 4, mode="same")  # softer hiss
    audio += 3.0 * score.noise * noise
    peak = np.max(np.abs(audio)) or 1.0
    return (0.8 * audio / peak).astype(np.float32)


def _per_frame(curve: np.ndarray, samples_per_frame: int, frames: int) -> np.ndarray:
    padded = np.zeros(frames * samples_per_frame, np.float32)
    padded[: min(len(curve), len(padded))] = curve[: len(padded)]
    return padded.reshape(frames, samples_per_frame).mean(axis=1)


def _smooth(values: np.ndarray) -> np.ndarray:
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    return np.convolve(np.pad(values, 1, mode="edge"), kernel, mode="valid")


def synthesize_voice(
    rng: np.random.Generator, *, seconds: float, sample_rate: int = 16000, fps: int = 25
) -> VoiceTrack:
    """A track of ``seconds`` alternating speech and song with pauses, and its mouth labels."""
    if sample_rate % fps:
        raise ValueError(f"sample rate {sample_rate} is not a multiple of fps {fps}")
    samples = int(round(seconds * sample_rate))
    score = _blank_score(samples)
    base = float(rng.uniform(95.0, 230.0))  # the voice's speaking pitch
    phrases: list[dict] = []
    position = int(rng.uniform(0.1, 0.4) * sample_rate)
    while position < samples - int(0.5 * sample_rate):
        kind = "song" if rng.random() < 0.35 else "speech"
        length = int(rng.uniform(1.0, 3.0 if kind == "speech" else 4.0) * sample_rate)
        end = min(samples - int(0.1 * sample_rate), position + length)
        if kind == "song":
            _song_phrase(rng, score, position, end, sample_rate, base)
        else:
            _speech_phrase(rng, score, position, end, sample_rate, base)
        phrases.append({"kind": kind, "start": position / sample_rate, "end": end / sample_rate})
        position = end + int(rng.uniform(0.15, 0.7) * sample_rate)
    audio = _render_audio(score, sample_rate, rng)

    spf = sample_rate // fps
    frames = int(np.ceil(samples / spf))
    openness = (score.f1 - F1_RANGE[0]) / (F1_RANGE[1] - F1_RANGE[0])
    opening = score.gain * (0.35 + 0.65 * np.clip(openness, 0, 1)) + 0.5 * score.noise
    frontness = np.clip((score.f2 - F2_RANGE[0]) / (F2_RANGE[1] - F2_RANGE[0]), 0, 1)
    loudness = _per_frame(score.gain, spf, frames)
    weighted = _per_frame(frontness * score.gain, spf, frames)
    width = np.where(loudness > 0.02, weighted / np.maximum(loudness, 1e-6), 0.5)  # rest: 0.5
    sung = np.zeros(frames, bool)
    for phrase in phrases:
        if phrase["kind"] == "song":
            sung[int(phrase["start"] * fps) : int(np.ceil(phrase["end"] * fps))] = True
    return VoiceTrack(
        audio=audio,
        mouth_open=np.clip(_smooth(_per_frame(opening, spf, frames)), 0, 1).astype(np.float32),
        mouth_width=np.clip(_smooth(width.astype(np.float32)), 0, 1).astype(np.float32),
        sung=sung,
        phrases=phrases,
    )
