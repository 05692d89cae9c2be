"""Media through the real ffmpeg: audio decoding, encoding, stream-copy assembly, bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emo import media
from emo.errors import MediaError
from tests.conftest import emo_in_process, tone, write_wav

FPS = 25


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        [media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True
    )


@pytest.fixture(scope="module")
def stereo_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2.5 s of a 440 Hz tone, 44.1 kHz stereo: every format below is made from it."""
    folder = tmp_path_factory.mktemp("audio")
    path = folder / "tone.wav"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=2.5",
        "-ar",
        "44100",
        "-ac",
        "2",
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [
        (".wav", []),
        (".flac", []),
        (".mp3", []),
        (".m4a", ["-c:a", "aac"]),
        (".ogg", ["-c:a", "libvorbis"]),
        (".opus", ["-c:a", "libopus", "-ar", "48000"]),
        (".aiff", []),
        (".mkv", ["-c:a", "aac"]),
        (".webm", ["-c:a", "libopus", "-ar", "48000"]),
        (".mov", ["-c:a", "aac"]),
        (".wma", []),
        (".ac3", []),
        (".eac3", ["-c:a", "eac3"]),
        (".au", []),
        (".wv", []),
        (".amr", ["-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1"]),
        (".flv", ["-c:a", "aac"]),
        (".dts", ["-c:a", "dca", "-strict", "-2", "-ar", "48000"]),
    ],
)
def test_load_audio_any_container_as_mono_16k(
    stereo_wav: Path, suffix: str, codec: list[str]
) -> None:
    path = stereo_wav.with_suffix(suffix)
    if not path.exists():
        _ffmpeg("-i", str(stereo_wav), *codec, str(path))
    audio = media.load_audio(path, 16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 2.5 * 16000) <= 0.06 * 16000  # codec padding at most ~60 ms
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * 16000 / audio.size
    assert abs(peak_hz - 440) < 2  # resampled to the requested rate, not just relabelled


def _segments(folder: Path, sizes: list[int], size: int = 32) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for k, count in enumerate(sizes):
        frames = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
        path = folder / f"seg{k}.mp4"
        with media.VideoWriter(path, width=size, height=size, fps=FPS) as writer:
            for frame in frames:  # frame by frame, as a renderer delivers them
                writer.write(frame)
        paths.append(path)
    return paths


def test_encoded_segment_is_cfr_h264_with_a_leading_keyframe(tmp_path: Path) -> None:
    [path] = _segments(tmp_path, [30])
    info = media.probe(path)
    video = info.first("video")
    assert video.codec == "h264" and video.packets == 30
    assert (video.width, video.height) == (32, 32)
    assert video.duration == pytest.approx(30 / FPS)
    rows = [r for r in media.packet_listing(path).rows if r[0] == "0"]
    assert len({int(r[3]) for r in rows}) == 1  # constant frame duration
    decoded = subprocess.run(
        [
            media.ffmpeg_exe(),
            "-v",
            "info",
            "-i",
            str(path),
            "-vf",
            "showinfo",
            "-frames:v",
            "1",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        text=True,
    ).stderr
    assert "iskey:1" in decoded and "type:I" in decoded


def test_five_segments_concatenate_by_stream_copy_with_audio(tmp_path: Path) -> None:
    sizes = [24, 12, 36, 12, 13]
    total = sum(sizes)  # 97 frames = 3.88 s; the audio is a little shorter, as at assembly
    audio_seconds = 3.85
    audio = write_wav(tmp_path / "vocal.wav", tone(audio_seconds, 48000), 48000)
    segments = _segments(tmp_path, sizes)
    output = media.concat_videos(segments, tmp_path / "final.mp4", audio=audio)

    info = media.probe(output)
    assert info.video_frames == total
    expected = [h for path in segments for h in media.video_packet_hashes(path)]
    assert media.video_packet_hashes(output) == expected  # the inputs' packets, unchanged
    assert info.first("audio") is not None and info.first("audio").codec == "aac"
    assert abs(info.duration - audio_seconds) < 1 / FPS
    assert media.load_audio(output, 16000).size == pytest.approx(audio_seconds * 16000, abs=1)
    head = output.read_bytes()[:4096]
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head  # +faststart
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (160, 80), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "portrait.jpg", exif=exif)
    pixels = media.load_image(tmp_path / "portrait.jpg")
    assert pixels.shape == (160, 80, 3) and pixels.dtype == np.uint8


def test_a_camera_jpeg_with_a_preview_is_a_still(tmp_path: Path) -> None:
    """Phones write MPO: a JPEG carrying a preview or gain map as a second image."""
    main, preview = Image.new("RGB", (96, 96), (10, 20, 30)), Image.new("RGB", (32, 32))
    main.save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=[preview])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    assert media.load_image(tmp_path / "phone.jpg").shape == (96, 96, 3)


def test_cmyk_and_16_bit_portraits_are_converted_not_clipped(tmp_path: Path) -> None:
    Image.new("CMYK", (64, 64), (0, 0, 0, 0)).save(tmp_path / "print.jpg")  # no ink: white
    assert media.load_image(tmp_path / "print.jpg").min() >= 250
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    pixels = media.load_image(tmp_path / "scan.png")
    assert pixels.shape == (64, 64, 3) and pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert pixels[32, 0, 0] == round(32 * 64 * 16 / 65535 * 255)  # scaled, not clipped


# -- bad input: one clear error naming the file --------------------------------------------


def _reads_other_files(tmp_path: Path, kind: str) -> Path:
    """A vocal track that is really a list of other files: decoded as such, ffmpeg would read
    ``secret.aac`` (or any file or URL named) and render it as the singer's voice."""
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(tmp_path / "secret.aac"))
    if kind == "concat":
        path = tmp_path / "vocal.wav"
        path.write_text("ffconcat version 1.0\nfile 'secret.aac'\n")
    else:  # an HLS playlist under the name ffmpeg trusts
        path = tmp_path / "vocal.m3u8"
        path.write_text(
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.aac\n#EXT-X-ENDLIST\n"
        )
    return path


@pytest.mark.parametrize("kind", ["concat", "hls"])
def test_a_vocal_track_that_names_other_files_is_refused(tmp_path: Path, kind: str) -> None:
    path = _reads_other_files(tmp_path, kind)
    # Without the allow-lists, this ffmpeg follows the list and decodes secret.aac.
    opened = subprocess.run(
        [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert opened.returncode == 0 and f"Input #0, {kind}" in opened.stderr, opened.stderr
    with pytest.raises(MediaError, match="not in a format emo reads") as caught:
        media.load_audio(path, 16000)
    assert path.name in str(caught.value) and "playlist" in str(caught.value)
    with pytest.raises(MediaError, match="assembling"):  # the muxed track is opened the same way
        media.concat_videos(_segments(tmp_path, [5]), tmp_path / "out.mp4", audio=path)
    assert not (tmp_path / "out.mp4").exists()


def _bad_audio(tmp_path: Path, kind: str, stereo_wav: Path) -> Path:
    path = tmp_path / f"{kind}.bin"
    if kind == "missing":
        return tmp_path / "nope.wav"
    if kind == "empty":
        path = tmp_path / "empty.wav"
        path.write_bytes(b"")
    elif kind == "zero_length":
        path = write_wav(tmp_path / "silence0.wav", np.zeros(0, dtype=np.float32))
    elif kind == "text":
        path = tmp_path / "notes.wav"
        path.write_text("this is not audio\n" * 20)
    elif kind in ("truncated_wav", "truncated_mp3", "truncated_flac", "truncated_m4a"):
        suffix = "." + kind.split("_")[1]
        full = tmp_path / f"full{suffix}"
        _ffmpeg("-i", str(stereo_wav), *(["-c:a", "aac"] if suffix == ".m4a" else []), str(full))
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 5])
    elif kind == "video_only":
        [path] = _segments(tmp_path, [5])
    elif kind == "not_numbers":  # a float WAV from a broken export
        import soundfile

        samples = np.zeros(16000, np.float32)
        samples[100:200] = np.nan
        path = tmp_path / "broken.wav"
        soundfile.write(path, samples, 16000, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("zero_length", "no audio samples"),
        ("text", "cannot be decoded"),
        ("truncated_wav", "truncated"),
        ("truncated_mp3", "truncated"),
        ("truncated_flac", "truncated"),
        ("truncated_m4a", "cannot be decoded"),
        ("video_only", "no audio stream"),
        ("not_numbers", "has 100 samples that are not numbers"),
    ],
)
def test_bad_audio_gives_one_clear_error(
    tmp_path: Path, stereo_wav: Path, kind: str, message: str
) -> None:
    path = _bad_audio(tmp_path, kind, stereo_wav)
    with pytest.raises(MediaError, match=message) as caught:
        media.load_audio(path, 16000)
    assert path.name in str(caught.value)


def test_a_track_over_the_length_limit_is_refused_without_decoding_it_all(
    stereo_wav: Path,
) -> None:
    with pytest.raises(MediaError, match="longer than 1 s.*EMO_MAX_TRACK_SECONDS") as caught:
        media.load_audio(stereo_wav, 16000, max_seconds=1.0)
    assert stereo_wav.name in str(caught.value)
    assert media.load_audio(stereo_wav, 16000, max_seconds=3.0).size == 40000  # 2.5 s fits


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    import struct
    import zlib

    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [8000, 30000])  # over EMO_MAX_IMAGE_PIXELS; over Pillow's own
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(
    tmp_path: Path, side: int
) -> None:
    path = _png_claiming(tmp_path / "huge.png", side, side)
    with pytest.raises(MediaError, match="more than 50,000,000 pixels.*EMO_MAX_IMAGE_PIXELS"):
        media.load_image(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello, not a picture", "not an image"),
        ("truncated", "cannot be decoded"),
        ("one_pixel", "is 1x1 pixels; give a portrait at least 64 pixels on each side"),
        ("animated", "is animated \\(3 frames\\); give a still portrait"),
    ],
)
def test_bad_image_gives_one_clear_error(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "portrait.png"
    if content == "truncated":
        Image.fromarray(
            np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        ).save(path)
        path.write_bytes(path.read_bytes()[:3000])
    elif content == "one_pixel":
        Image.new("RGB", (1, 1)).save(path)
    elif content == "animated":
        frames = [Image.new("RGB", (64, 64), (80 * i, 0, 0)) for i in range(3)]
        frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:])
    else:
        path.write_bytes(content)
    with pytest.raises(MediaError, match=message) as caught:
        media.load_image(path)
    assert "portrait.png" in str(caught.value)


def test_odd_sizes_and_failed_encodes_leave_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="must be positive and even"):
        media.VideoWriter(tmp_path / "odd.mp4", width=33, height=32, fps=FPS)
    with (
        pytest.raises(RuntimeError),
        media.VideoWriter(tmp_path / "x.mp4", width=32, height=32, fps=FPS) as writer,
    ):
        writer.write(np.zeros((3, 32, 32, 3), np.uint8))
        raise RuntimeError("renderer crashed")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_audio_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "take1.wav"
    bad.write_text("not audio")
    result = emo_in_process("plan", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "take1.wav" in lines[0] and lines[0].startswith("error:")


def test_an_ffmpeg_that_cannot_start_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMO_FFMPEG pointing at an executable that is not a program: one MediaError naming it
    and the setting, not an OSError traceback."""
    from emo.settings import get_settings

    fake = tmp_path / "ffmpeg"
    fake.write_bytes(b"\x00\x01 not a program")
    fake.chmod(0o755)
    track = write_wav(tmp_path / "a.wav", tone(1.0))
    monkeypatch.setenv("EMO_FFMPEG", str(fake))
    get_settings.cache_clear()
    try:
        wanted = r"ffmpeg at .*ffmpeg. cannot be started .*EMO_FFMPEG"
        with pytest.raises(MediaError, match=wanted):
            media.load_audio(track, 16000)
        with pytest.raises(MediaError, match="cannot be started"):
            media.VideoWriter(tmp_path / "v.mp4", width=64, height=64, fps=25)
    finally:
        monkeypatch.delenv("EMO_FFMPEG")
        get_settings.cache_clear()


def test_an_ffmpeg_killed_by_a_signal_is_not_called_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ffmpeg ended by SIGKILL (the out-of-memory killer) says nothing about the file: the
    error names the signal, and is not a MediaError (which would fail the job as bad input)."""
    from emo.errors import EmoError
    from emo.settings import get_settings

    killed = tmp_path / "ffmpeg"
    killed.write_text("#!/bin/sh\nkill -9 $$\n")
    killed.chmod(0o755)
    track = write_wav(tmp_path / "a.wav", tone(1.0))
    monkeypatch.setenv("EMO_FFMPEG", str(killed))
    get_settings.cache_clear()
    try:
        with pytest.raises(EmoError, match="stopped by signal 9 SIGKILL while decoding") as caught:
            media.load_audio(track, 16000)
        assert not isinstance(caught.value, MediaError) and caught.value.exit_code == 1
    finally:
        monkeypatch.delenv("EMO_FFMPEG")
        get_settings.cache_clear()
