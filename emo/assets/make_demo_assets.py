"""Regenerate the demo inputs: a held-out synthetic person and ~10 s of their voice.

    .venv/bin/python emo/assets/make_demo_assets.py

The files are committed; this script documents how they were made (no recordings of people,
nothing downloaded). Both come from the synthetic corpus's ``heldout`` split (seed 7, video
110), which the demo model never trained on: the portrait is the person's neutral frontal
face drawn at 256x256, the vocal is their track (speech, then a sung phrase from 4.8 s).
``demo_portrait.json`` holds the face box the generator drew, which ``emo demo`` passes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import soundfile
from PIL import Image

from emo.eval.evaluate import portrait_of
from emo.synthetic.corpus import VideoSpec, voice_for

HERE = Path(__file__).resolve().parent
SPEC = VideoSpec(seed=7, split="heldout", index=110, seconds=10.0, size=256)


def main() -> None:
    frame, box = portrait_of(SPEC)
    Image.fromarray(frame).save(HERE / "demo_portrait.png", optimize=True)
    (HERE / "demo_portrait.json").write_text(
        json.dumps({"face_box": [round(v, 4) for v in box], "source": "emo synth heldout 7/110"})
    )
    voice = voice_for(VideoSpec(**{**SPEC.__dict__, "size": 64}))
    soundfile.write(HERE / "demo_vocal.wav", voice.audio, SPEC.sample_rate, subtype="PCM_16")
    print(f"portrait box {box}; phrases {voice.phrases}")


if __name__ == "__main__":
    main()
