"""Assembly cost vs encoding cost, for 10 and 100 segments.

Encodes N segments of identical-settings H.264 (what the renderer writes), then assembles them
with the concat demuxer + stream copy + one AAC mux of the vocal track (what a finished job
does). Prints assembly time / encode time for the same frames, and assembly time per segment,
measured in this run. Stream copy should make assembly a few percent of encoding, growing
linearly with the number of segments.

    .venv/bin/python bench/assembly.py [--size 256] [--frames-per-segment 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emo import media  # noqa: E402

FPS, SR = 25, 16000


def frames(count: int, size: int, seed: int) -> np.ndarray:
    """Smooth moving gradients (compressible like faces, unlike noise): (N, S, S, 3)."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        phase = (seed * count + i) / 25
        out[i, ..., 0] = 127 + 120 * np.sin(2 * np.pi * (x + phase))
        out[i, ..., 1] = 127 + 120 * np.sin(2 * np.pi * (y - phase / 2))
        out[i, ..., 2] = 127 + 120 * np.sin(2 * np.pi * (x + y + phase / 3))
    return out


def run(segments: int, size: int, per_segment: int, folder: Path) -> tuple[float, float, float]:
    """Seconds to encode the segments, to join them (stream copy only), and to assemble them
    with the vocal track (stream copy + AAC mux: what a finished job does)."""
    clip = frames(per_segment, size, seed=segments)
    paths = []
    encode = 0.0
    for k in range(segments):
        path = folder / f"seg{k:05d}.mp4"
        start = time.perf_counter()
        with media.VideoWriter(path, width=size, height=size, fps=FPS) as writer:
            writer.write(clip)
        encode += time.perf_counter() - start
        paths.append(path)
    seconds = segments * per_segment / FPS - 0.02  # audio a little shorter than the video
    t = np.arange(int(seconds * SR)) / SR
    audio = folder / "vocal.wav"
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR)
    start = time.perf_counter()
    media.concat_videos(paths, folder / "joined.mp4")
    join = time.perf_counter() - start
    start = time.perf_counter()
    final = media.concat_videos(paths, folder / "final.mp4", audio=audio)
    assemble = time.perf_counter() - start
    frames_out = media.probe(final).video_frames
    if frames_out != segments * per_segment:
        raise SystemExit(f"assembly lost frames: {frames_out} != {segments * per_segment}")
    return encode, join, assemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames-per-segment", type=int, default=50)
    args = parser.parse_args()
    print(f"{args.size}x{args.size}, {args.frames_per_segment} frames per segment, {FPS} fps")
    print(
        f"{'segments':>8} {'encode s':>9} {'join s':>7} {'join/enc':>9} {'+audio s':>9} "
        f"{'assemble/enc':>13} {'join ms/seg':>12}"
    )
    for segments in (10, 100):
        with tempfile.TemporaryDirectory(prefix="emo-bench-") as scratch:
            encode, join, assemble = run(
                segments, args.size, args.frames_per_segment, Path(scratch)
            )
        print(
            f"{segments:>8} {encode:>9.2f} {join:>7.3f} {join / encode:>9.1%} {assemble:>9.3f} "
            f"{assemble / encode:>13.1%} {1000 * join / segments:>12.2f}"
        )


if __name__ == "__main__":
    main()
