"""Media I/O through ffmpeg (``ffmpeg-python`` builds the commands).

- ``load_audio``: any common container/codec, any rate and channel count -> mono float32.
- ``load_image``: any image Pillow decodes -> RGB uint8, EXIF orientation applied.
- ``VideoWriter``: uint8 RGB frames through a pipe -> H.264 yuv420p constant-frame-rate mp4
  with a keyframe on its first frame. Every segment is encoded with identical settings, so
- ``concat_videos`` can join segments with the concat demuxer and stream copy, muxing the
  original audio (AAC) with ``+faststart`` in the same pass.
- ``probe``: streams, packet counts and durations (the static ffmpeg build has no ffprobe,
  so packets are listed with the ``framemd5`` muxer, which also hashes them).

Bad input raises ``MediaError`` naming the file and the problem. Outputs are written to a
temporary name and renamed when complete, so a failure never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO, Any, cast

import ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emo.errors import EmoError, MediaError
from emo.files import temp_beside
from emo.settings import get_settings

# Lines ffmpeg prints when input data is damaged although it carries on decoding.
DAMAGE = re.compile(
    r"corrupt|decoding error|invalid data found|truncat|error while decoding|"
    r"invalid residual|partial file|end of file",
    re.IGNORECASE,
)
FFMPEG_PREFIX = re.compile(r"^\s*(\[[^\]]*@ 0x[0-9a-f]+\]\s*)+")
DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
# What a vocal track may be: audio containers and the video containers a take comes in. No
# demuxer that opens other files by name (hls playlists, concat scripts, image2 patterns,
# tee), and only local files and pipes: a ".wav" that is really a playlist would otherwise make
# ffmpeg read the files or URLs named inside it.
AUDIO_DEMUXERS = (
    "wav,w64,mp3,flac,ogg,mov,matroska,aac,aiff,caf,avi,asf,mpeg,mpegts,ac3,eac3,dts,amr,au,wv,flv"
)
AUDIO_NAMES = (
    "wav, mp3, flac, ogg/opus, m4a/mp4/mov, mkv/webm, aac, aiff, caf, avi, wma, mpeg/ts, "
    "ac3, e-ac3, dts, amr, au, wavpack, flv"
)
INPUT_PROTOCOLS = "file,pipe"
# Declared vs decoded duration may differ by codec priming/padding, never by more.
TRUNCATION_TOLERANCE_SECONDS = 0.1
TRUNCATION_TOLERANCE_FRACTION = 0.02

# One set of encoder settings for every segment (the concat demuxer needs them identical).
VIDEO_CODEC = "libx264"
VIDEO_CRF = 18
VIDEO_PRESET = "veryfast"
VIDEO_TIMESCALE = 90000  # divisible by 24, 25, 30, 50, 60: exact frame timestamps
AUDIO_BITRATE = "192k"


def ffmpeg_exe() -> str:
    """The ffmpeg binary: ``EMO_FFMPEG`` if set, else the one inside imageio-ffmpeg."""
    configured = get_settings().ffmpeg
    if configured:
        return configured
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _not_started(args: list[str], what: Path | str, error: OSError) -> MediaError:
    """ffmpeg itself could not be started (missing, not executable, not a binary)."""
    return MediaError(
        f"ffmpeg at {args[0]!r} cannot be started ({error.strerror or error}; needed for "
        f"{what}); set EMO_FFMPEG to an ffmpeg binary"
    )


def _run(args: list[str], what: Path | str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL, check=False)
    except OSError as error:
        raise _not_started(args, what, error) from None


def _start(args: list[str], what: Path | str, **streams: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(args, **streams)
    except OSError as error:
        raise _not_started(args, what, error) from None


def _plain(line: str) -> str:
    """An ffmpeg message without its ``[component @ 0xaddress]`` prefix."""
    return FFMPEG_PREFIX.sub("", line).strip()


def _last_error(stderr: str) -> str:
    lines = [_plain(line) for line in stderr.splitlines() if _plain(line)]
    for line in reversed(lines):
        if "rror" in line or "nvalid" in line or "not" in line:
            return line
    return lines[-1] if lines else "no message"


def _declared_seconds(stderr: str) -> float | None:
    match = DURATION.search(stderr)
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def require_file(path: Path | str, kind: str) -> Path:
    """``path`` as a Path if it is a non-empty regular file; else ``MediaError``."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{kind} file {str(path)!r} does not exist")
    if not path.is_file():
        raise MediaError(f"{kind} path {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise MediaError(f"{kind} file {str(path)!r} is empty (0 bytes)")
    return path


# -- audio ---------------------------------------------------------------------------------


def _vocal_input(path: Path) -> ffmpeg.nodes.FilterableStream:
    """A user's vocal track as an ffmpeg input, opened with only the allowed demuxers and
    protocols (``AUDIO_DEMUXERS``, ``INPUT_PROTOCOLS``)."""
    return ffmpeg.input(
        str(path.resolve()),  # absolute: a name with a colon is never taken for a protocol
        protocol_whitelist=INPUT_PROTOCOLS,
        format_whitelist=AUDIO_DEMUXERS,
    )


AUDIO_CHUNK_BYTES = 1 << 20  # read from ffmpeg's pipe at a time (a multiple of 4: whole samples)


@dataclass(frozen=True)
class DecodedAudio:
    """What one decode of a vocal track gave: the samples (when kept) and their count."""

    samples: np.ndarray | None  # (N,) float32 mono, or None when only counted
    count: int


def _decode_audio(
    path: Path, sample_rate: int, max_seconds: float | None, *, keep: bool
) -> DecodedAudio:
    """Decode ``path`` once, streaming ffmpeg's output: each chunk is checked for NaN and
    either appended in place (``keep``) or only counted. Memory is one copy of the samples at
    most; ffmpeg's messages go to a temporary file, so a damaged file that prints an error per
    frame cannot fill the pipe and stall the decode."""
    limit = {"t": max_seconds + 1} if max_seconds is not None else {}
    args = (
        _vocal_input(path)
        .output(
            "pipe:",
            map="0:a:0",
            format="f32le",
            acodec="pcm_f32le",
            ac=1,
            ar=sample_rate,
            **limit,
        )
        .global_args("-hide_banner", "-nostdin", "-nostats")
        .compile(cmd=ffmpeg_exe())
    )
    kept, count, broken = bytearray(), 0, 0
    with tempfile.TemporaryFile() as messages:
        process = _start(
            args, path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=messages
        )
        with process:
            stdout = cast(IO[bytes], process.stdout)
            while chunk := stdout.read(AUDIO_CHUNK_BYTES):
                block = np.frombuffer(chunk, np.float32, count=len(chunk) // 4)  # (n,)
                count += block.size
                broken += int(block.size - np.count_nonzero(np.isfinite(block)))
                if keep:
                    kept += chunk
        messages.seek(0)
        stderr = messages.read().decode(errors="replace")
    _check_decode(path, process.returncode, stderr)
    _check_length(path, count / sample_rate, _declared_seconds(stderr), max_seconds)
    damage = [_plain(line) for line in stderr.splitlines() if DAMAGE.search(line)]
    if damage:
        raise MediaError(
            f"audio file {str(path)!r} is truncated or corrupt ({damage[0].rstrip('.')}); "
            "export it again"
        )
    if count == 0:
        raise MediaError(f"audio file {str(path)!r} contains no audio samples (zero length)")
    if broken:
        raise MediaError(
            f"audio file {str(path)!r} has {broken} samples that are not numbers (NaN or "
            "infinite); export it again"
        )
    samples = np.frombuffer(kept, np.float32, count=count) if keep else None  # no copy
    return DecodedAudio(samples=samples, count=count)


def _check_decode(path: Path, returncode: int, stderr: str) -> None:
    """A failed decode as one ``MediaError`` naming the file; ffmpeg killed by a signal (the
    machine's out-of-memory killer, a stop) says nothing of the file, so it is not one."""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        raise EmoError(
            f"ffmpeg was stopped by signal {-returncode} {name} while decoding {str(path)!r}; "
            "the file was not judged: try again (out of memory ends ffmpeg with SIGKILL)"
        )
    if returncode != 0:
        if "matches no streams" in stderr:
            raise MediaError(f"audio file {str(path)!r} has no audio stream")
        if "not on whitelist" in stderr:
            raise MediaError(
                f"audio file {str(path)!r} is not in a format emo reads (not audio, or a "
                f"playlist or script that names other files); give a {AUDIO_NAMES} file"
            )
        if "Invalid data found when processing input" in stderr:
            raise MediaError(
                f"audio file {str(path)!r} cannot be decoded: it is not audio, or it is damaged; "
                f"give a {AUDIO_NAMES} file"
            )
        raise MediaError(f"audio file {str(path)!r} cannot be decoded: {_last_error(stderr)}")


def _check_length(
    path: Path, decoded: float, declared: float | None, max_seconds: float | None
) -> None:
    """Refuse a track over the length limit, or one whose header promises more than decodes
    (a truncated upload, or a header that lies about its length)."""
    if max_seconds is not None and max(decoded, declared or 0.0) > max_seconds:
        raise MediaError(
            f"audio file {str(path)!r} is longer than {max_seconds:g} s, the longest track "
            "allowed (EMO_MAX_TRACK_SECONDS): split it, or raise the limit"
        )
    if declared is not None:
        tolerance = max(TRUNCATION_TOLERANCE_SECONDS, TRUNCATION_TOLERANCE_FRACTION * declared)
        if decoded < declared - tolerance:
            raise MediaError(
                f"audio file {str(path)!r} is truncated: its header says "
                f"{declared:.2f} s but only {decoded:.2f} s decode"
            )


def load_audio(
    path: Path | str, sample_rate: int, *, max_seconds: float | None = None
) -> np.ndarray:
    """Decode the first audio stream of ``path`` as mono float32 at ``sample_rate``: (N,).

    With ``max_seconds``, a longer track is refused (``EMO_MAX_TRACK_SECONDS``) after decoding
    at most a second past the limit, so a 10-hour file never fills memory."""
    decoded = _decode_audio(require_file(path, "audio"), sample_rate, max_seconds, keep=True)
    return cast(np.ndarray, decoded.samples)


def audio_sample_count(
    path: Path | str, sample_rate: int, *, max_seconds: float | None = None
) -> int:
    """The number of samples ``load_audio`` would return, with every check it makes, while
    holding none of them (validation needs the length, not the track)."""
    return _decode_audio(require_file(path, "audio"), sample_rate, max_seconds, keep=False).count


# -- images --------------------------------------------------------------------------------


MIN_PORTRAIT_SIDE = 64  # pixels; the smallest model renders at 64


def _rgb8(image: Image.Image) -> np.ndarray:
    """RGB uint8 of any mode: 16- and 32-bit grey scaled down (Pillow would clip them to
    white), CMYK and palettes converted, alpha dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.float64)  # (H, W)
        scale = 65535.0 if image.mode.startswith("I;16") or grey.max() <= 65535 else grey.max()
        grey8 = np.clip(np.round(grey / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)  # (H, W, 3)
    return np.asarray(image.convert("RGB")).copy()


def load_image(path: Path | str) -> np.ndarray:
    """Decode ``path`` as an upright RGB image: (H, W, 3) uint8."""
    path = require_file(path, "image")
    most = get_settings().max_image_pixels
    too_big = (
        f"image file {str(path)!r} has more than {most:,} pixels, the largest portrait allowed "
        "(EMO_MAX_IMAGE_PIXELS): scale it down, or raise the limit"
    )
    try:
        with Image.open(path) as image:
            if image.width * image.height > most:  # read from the header: nothing decoded yet
                raise MediaError(too_big)
            if min(image.size) < MIN_PORTRAIT_SIDE:
                raise MediaError(
                    f"image file {str(path)!r} is {image.width}x{image.height} pixels; give a "
                    f"portrait at least {MIN_PORTRAIT_SIDE} pixels on each side"
                )
            # An MPO is a camera JPEG with a preview or gain map, not an animation.
            if getattr(image, "is_animated", False) and image.format != "MPO":
                raise MediaError(
                    f"image file {str(path)!r} is animated ({image.n_frames} frames); give a "
                    "still portrait"
                )
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _rgb8(upright)
    except UnidentifiedImageError:
        raise MediaError(f"image file {str(path)!r} is not an image Pillow can read") from None
    except Image.DecompressionBombError:  # Pillow's own ceiling, above any sane limit
        raise MediaError(too_big) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise MediaError(
            f"image file {str(path)!r} cannot be decoded ({error}); it may be truncated or corrupt"
        ) from None


# -- video ---------------------------------------------------------------------------------


def _partial_path(path: Path) -> Path:
    fd, name = temp_beside(path, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    return name


class VideoWriter:
    """Pipe uint8 RGB frames into an H.264 mp4; the file appears at ``path`` on close.

    Usage::

        with VideoWriter(out, width=512, height=512, fps=25) as writer:
            writer.write(frames)  # (N, H, W, 3) or (H, W, 3) uint8
    """

    def __init__(self, path: Path | str, *, width: int, height: int, fps: int) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise MediaError(
                f"video {str(path)!r}: {width}x{height} is not encodable as "
                "yuv420p; width and height must be positive and even"
            )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height, self.fps = width, height, fps
        self.frames = 0
        self._partial = _partial_path(self.path)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close/abort)
        args = (
            ffmpeg.input(
                "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps
            )
            .output(
                str(self._partial),
                format="mp4",
                vcodec=VIDEO_CODEC,
                pix_fmt="yuv420p",
                crf=VIDEO_CRF,
                preset=VIDEO_PRESET,
                r=fps,
                fps_mode="cfr",
                video_track_timescale=VIDEO_TIMESCALE,
                movflags="+faststart",
            )
            .global_args("-hide_banner", "-nostats", "-loglevel", "error")
            .overwrite_output()
            .compile(cmd=ffmpeg_exe())
        )
        self._process = _start(args, path, stdin=subprocess.PIPE, stderr=self._log)
        self._stdin = cast(IO[bytes], self._process.stdin)

    def write(self, frames: np.ndarray) -> None:
        """Append frames: (H, W, 3) or (N, H, W, 3), uint8 RGB."""
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames of shape (N, {self.height}, {self.width}, "
                f"3), got {frames.dtype} {frames.shape}"
            )
        try:
            self._stdin.write(np.ascontiguousarray(frames).data)
        except BrokenPipeError:
            self._fail("ffmpeg stopped accepting frames")
        self.frames += frames.shape[0]

    def _fail(self, message: str) -> None:
        self._process.kill()
        self._process.wait()
        self._log.seek(0)
        detail = self._log.read().decode(errors="replace").strip()
        self._partial.unlink(missing_ok=True)
        raise MediaError(f"encoding {str(self.path)!r} failed: {message}: {detail}")

    def close(self) -> Path:
        """Finish the file and move it into place; returns its path."""
        with contextlib.suppress(BrokenPipeError):  # ffmpeg exited; its status says why
            self._stdin.close()
        if self._process.wait() != 0:
            self._fail(f"ffmpeg exited with {self._process.returncode}")
        if self.frames == 0:
            self._partial.unlink(missing_ok=True)
            raise MediaError(f"video {str(self.path)!r}: no frames were written")
        os.replace(self._partial, self.path)
        self._log.close()
        return self.path

    def abort(self) -> None:
        """Stop encoding and remove the partial file."""
        self._process.kill()
        self._process.wait()
        self._partial.unlink(missing_ok=True)
        self._log.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def concat_videos(
    videos: list[Path],
    output: Path | str,
    *,
    audio: Path | str | None = None,
) -> Path:
    """Join segment videos by stream copy (no re-encode) and mux ``audio`` as AAC.

    The segments must come from ``VideoWriter`` (identical encoder settings). The output has
    exactly the sum of the segments' frames; audio is encoded once from the original track.
    """
    if not videos:
        raise MediaError("nothing to concatenate: no segment videos given")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for video in videos:
        require_file(video, "segment video")
    with tempfile.TemporaryDirectory(prefix="emo-concat-") as scratch:
        listing = Path(scratch) / "segments.txt"
        listing.write_text(
            "".join(
                "file '{}'\n".format(str(Path(v).absolute()).replace("'", "'\\''")) for v in videos
            )
        )
        # auto_convert=0: copy packets exactly as the segments hold them. Segments share one
        # set of encoder settings, so no parameter sets need re-inserting at the joins.
        concat = ffmpeg.input(str(listing), format="concat", safe=0, auto_convert=0)
        streams = [concat["v:0"]]
        options: dict[str, object] = {"vcodec": "copy", "movflags": "+faststart", "format": "mp4"}
        if audio is not None:
            streams.append(_vocal_input(require_file(audio, "audio"))["a:0"])
            options.update(acodec="aac", audio_bitrate=AUDIO_BITRATE)
        partial = _partial_path(output)
        args = (
            ffmpeg.output(*streams, str(partial), **options)
            .global_args("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error")
            .overwrite_output()
            .compile(cmd=ffmpeg_exe())
        )
        result = _run(args, output)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            stderr = result.stderr.decode(errors="replace")
            raise MediaError(f"assembling {str(output)!r} failed: {_last_error(stderr)}")
        os.replace(partial, output)
    return output


def iter_frames(path: Path | str, width: int, height: int, chunk: int = 64, fps: int | None = None):
    """Decode a video's frames as (N, height, width, 3) uint8 chunks, streaming; with
    ``fps``, resampled to that constant rate (frames dropped or repeated by timestamp)."""
    path = require_file(path, "video")
    rate = {"r": fps, "fps_mode": "cfr"} if fps else {}
    args = (
        ffmpeg.input(str(path))
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", **rate)
        .global_args("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error")
        .compile(cmd=ffmpeg_exe())
    )
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as log:
        process = _start(args, path, stdout=subprocess.PIPE, stderr=log)
        stdout = cast(IO[bytes], process.stdout)
        try:
            while data := stdout.read(frame_bytes * chunk):
                count = len(data) // frame_bytes
                yield np.frombuffer(data[: count * frame_bytes], np.uint8).reshape(
                    count, height, width, 3
                )
        finally:
            stdout.close()
            if process.wait() != 0:
                log.seek(0)
                raise MediaError(
                    f"video {str(path)!r} cannot be decoded: "
                    f"{_last_error(log.read().decode(errors='replace'))}"
                )


def _ffmpeg_convert(source: Path, target: str, what: str, **options: object) -> None:
    """One ffmpeg pass from ``source`` to ``target``; raises ``MediaError`` naming ``what``."""
    args = (
        ffmpeg.input(str(require_file(source, "video")))
        .output(target, **options)
        .global_args("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error")
        .overwrite_output()
        .compile(cmd=ffmpeg_exe())
    )
    result = _run(args, target)
    if result.returncode != 0:
        raise MediaError(
            f"{what} to {target!r} failed: {_last_error(result.stderr.decode(errors='replace'))}"
        )


def to_prores(source: Path, output: Path) -> Path:
    """ProRes 422 HQ .mov with PCM audio, from an assembled mp4 (written atomically)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(output)
    try:
        _ffmpeg_convert(
            source,
            str(partial),
            "ProRes export",
            format="mov",
            vcodec="prores_ks",
            profile="3",
            pix_fmt="yuv422p10le",
            acodec="pcm_s16le",
        )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output)
    return output


def to_png_sequence(source: Path, directory: Path) -> list[Path]:
    """frame_000001.png, ... in ``directory``, which appears complete or not at all."""
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _ffmpeg_convert(
            source, str(staging / "frame_%06d.png"), "PNG export", format="image2", start_number=1
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, directory)
    return sorted(directory.glob("frame_*.png"))


# -- probing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamInfo:
    """One stream of a media file, measured from its packets."""

    index: int
    kind: str  # video | audio | data | subtitle
    codec: str
    packets: int
    duration: float  # seconds, from the first packet's pts to the last packet's end
    width: int | None = None
    height: int | None = None
    sample_rate: int | None = None


@dataclass(frozen=True)
class MediaInfo:
    """What ``probe`` found in a media file."""

    path: Path
    duration: float | None  # as the container declares it
    streams: tuple[StreamInfo, ...]

    def first(self, kind: str) -> StreamInfo | None:
        return next((s for s in self.streams if s.kind == kind), None)

    @property
    def video_frames(self) -> int:
        """Frames of the first video stream (one H.264 packet per frame in mp4)."""
        stream = self.first("video")
        return stream.packets if stream else 0


@dataclass(frozen=True)
class PacketListing:
    """Per-stream headers and packet rows (stream, dts, pts, duration, size, md5)."""

    headers: dict[int, dict[str, str]]
    rows: list[list[str]]
    stderr: str


def packet_listing(path: Path | str) -> PacketListing:
    """List every packet of ``path`` with the framemd5 muxer (stream copy, no decoding)."""
    path = require_file(path, "media")
    args = (
        ffmpeg.input(str(path))
        .output("pipe:", format="framemd5", codec="copy", map="0")
        .global_args("-hide_banner", "-nostdin", "-nostats")
        .compile(cmd=ffmpeg_exe())
    )
    result = _run(args, path)
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != 0:
        raise MediaError(f"media file {str(path)!r} cannot be read: {_last_error(stderr)}")
    headers: dict[int, dict[str, str]] = {}
    rows = []
    for line in result.stdout.decode().splitlines():
        if line.startswith("#"):
            match = re.match(r"#(\w+) (\d+): (.*)", line)
            if match:
                headers.setdefault(int(match[2]), {})[match[1]] = match[3].strip()
        elif line.strip():
            rows.append([part.strip() for part in line.split(",")])
    return PacketListing(headers=headers, rows=rows, stderr=stderr)


def frame_md5s(video: Path | str) -> list[str]:
    """The md5 of every decoded video frame (ffmpeg's framemd5 muxer): two videos with equal
    lists show the same pixels, whatever their containers or timestamps."""
    done = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(video), "-map", "0:v", "-f", "framemd5", "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.rsplit(",", 1)[1].strip() for line in done.stdout.splitlines() if line[:1] != "#"]


def probe(path: Path | str) -> MediaInfo:
    """Streams, packet counts and durations of ``path``."""
    listing = packet_listing(path)
    streams = []
    for index, fields in sorted(listing.headers.items()):
        time_base = Fraction(fields["tb"])
        own = [row for row in listing.rows if int(row[0]) == index]
        duration = 0.0
        if own:
            first_pts = int(own[0][2])
            end = max(int(row[2]) + int(row[3]) for row in own)
            duration = float((end - first_pts) * time_base)
        width = height = None
        if "dimensions" in fields:
            width, height = (int(v) for v in fields["dimensions"].split("x"))
        rate = fields.get("sample_rate")
        streams.append(
            StreamInfo(
                index=index,
                kind=fields.get("media_type", "unknown"),
                codec=fields.get("codec_id", "unknown"),
                packets=len(own),
                duration=duration,
                width=width,
                height=height,
                sample_rate=int(rate) if rate else None,
            )
        )
    return MediaInfo(
        path=Path(path), duration=_declared_seconds(listing.stderr), streams=tuple(streams)
    )


def video_packet_hashes(path: Path | str) -> list[str]:
    """md5 of every packet of the first video stream, in order (for stream-copy checks)."""
    listing = packet_listing(path)
    video = next(
        (i for i, fields in sorted(listing.headers.items()) if fields.get("media_type") == "video"),
        None,
    )
    if video is None:
        raise MediaError(f"media file {str(path)!r} has no video stream")
    return [row[5] for row in listing.rows if int(row[0]) == video]
