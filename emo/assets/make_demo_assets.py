"""Regenerate the demo inputs: a drawn portrait and ~10 s of synthetic speech and song.

    .venv/bin/python emo/assets/make_demo_assets.py

The files are committed; this script documents how they were made (no recordings of people,
nothing downloaded). The synthetic corpus of issue "Training" will replace them with a
held-out identity of the demo model's own corpus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SR = 16000


def portrait(size: int = 256) -> Image.Image:
    image = Image.new("RGB", (size, size), (70, 110, 150))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse([60 * s, 30 * s, 196 * s, 210 * s], fill=(60, 40, 30))  # hair
    draw.ellipse([72 * s, 52 * s, 184 * s, 214 * s], fill=(226, 184, 150))  # face
    for x in (100, 156):
        draw.ellipse([(x - 12) * s, 108 * s, (x + 12) * s, 124 * s], fill=(255, 255, 255))
        draw.ellipse([(x - 5) * s, 110 * s, (x + 5) * s, 122 * s], fill=(50, 80, 40))
    draw.polygon(
        [(128 * s, 120 * s), (120 * s, 155 * s), (136 * s, 155 * s)], fill=(205, 160, 130)
    )  # nose
    draw.ellipse([108 * s, 168 * s, 148 * s, 184 * s], fill=(160, 60, 70))  # mouth
    return image


def vowel(f0: np.ndarray, formants: tuple[float, float], envelope: np.ndarray) -> np.ndarray:
    """A voiced sound: harmonics of the pitch contour f0, shaped by two formants."""
    phase = 2 * np.pi * np.cumsum(f0) / SR
    out = np.zeros_like(f0)
    for k in range(1, 30):
        freq = k * f0
        gain = sum(np.exp(-(((freq - f) / 120.0) ** 2)) for f in formants) + 0.05 / k
        out += gain * np.sin(k * phase)
    return out * envelope


def vocal(seconds: float = 10.0, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    track = np.zeros(int(seconds * SR), dtype=np.float64)
    vowels = [(730, 1090), (270, 2290), (300, 870), (530, 1840), (660, 1720)]
    t = 0.3
    while t < 5.5:  # speech: syllables with falling pitch and pauses
        length = rng.uniform(0.12, 0.3)
        n = int(length * SR)
        f0 = np.linspace(150, 115, n) * rng.uniform(0.9, 1.1)
        envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.6
        start = int(t * SR)
        track[start : start + n] += vowel(f0, vowels[rng.integers(len(vowels))], envelope)
        t += length + (rng.uniform(0.25, 0.5) if rng.random() < 0.2 else rng.uniform(0.02, 0.08))
    notes = [220.0, 246.9, 261.6, 293.7, 261.6, 246.9, 220.0]  # a sung phrase from 6 s
    t = 6.0
    for note in notes:
        n = int(0.5 * SR)
        vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5.5 * np.arange(n) / SR)
        envelope = np.minimum(1, np.linspace(0, 8, n)) * np.minimum(1, np.linspace(8, 0, n))
        start = int(t * SR)
        track[start : start + n] += vowel(note * vibrato, vowels[0], envelope)
        t += 0.52
    return (0.6 * track / np.abs(track).max()).astype(np.float32)


if __name__ == "__main__":
    portrait().save(HERE / "demo_portrait.png")
    soundfile.write(HERE / "demo_vocal.wav", vocal(), SR, subtype="PCM_16")
    print("wrote", HERE / "demo_portrait.png", HERE / "demo_vocal.wav")
