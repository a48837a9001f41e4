"""Decode untrusted video bytes into upright RGB frames sampled at a requested rate.

Decoding uses PyAV (FFmpeg's libraries inside the `av` wheel: nothing is fetched at run time).
Accepted: MP4 with H.264, WebM with VP8 or VP9, animated GIF.

Like `images.py`, the checks run in the order of their cost: empty data, size, magic bytes (which
also pick the one FFmpeg demuxer allowed to read the data: nothing else probes it), then the header
(video stream present, codec, frame size, duration, and the frames the request would sample against
the pixel budget), and only then the decode. The frame size is a decompression-bomb guard: a GIF's
logical screen is read from its first bytes before FFmpeg sees them, and FFmpeg's own probe decode
runs under `max_pixels`, so a header claiming a huge frame is refused before a frame that size is
allocated. A header without the clip's length (a WebM recorded live, as browsers write it) gets
it from its packets' timestamps, read without decoding. Every refusal is a `VideoError` whose
message names the limit and the fix.

Sampling: frames are taken at times 0, step, 2*step, ... before the end of the clip, with
step = max(1/fps, 1/stream rate, duration/max_frames): the requested rate, never faster than the
stream's average rate (a constant-rate stream gives no frame twice), spread evenly over the whole
clip when max_frames would otherwise cut it short. The frame for a time is the one on screen then
(the last frame whose timestamp is at or before it); each returned timestamp is that frame's own.

Seeking: decoding goes forward through the stream and seeks only when the container's keyframe
index shows a keyframe after the last decoded frame and at or before the next sample time: the
frames in between would be decoded and thrown away, and a seek skips them. Seeking to every sample
time instead would redecode from the previous keyframe each time, which costs more whenever samples
are closer together than keyframes (the usual case at 1-2 fps: encoders put a keyframe every 2-10 s).
MP4 has its keyframe index in the header; WebM's cues are read by one seek to the start;
a GIF has no keyframes, so it is decoded in order.
"""

from __future__ import annotations

import io
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

# Container name -> (FFmpeg demuxer, codecs accepted in it).
_CONTAINERS = {
    "MP4": ("mov", ("h264",)),
    "WebM": ("matroska", ("vp8", "vp9")),
    "GIF": ("gif", ("gif",)),
}
SUPPORTED = "MP4 (H.264), WebM (VP8, VP9), animated GIF"
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


class VideoError(ValueError):
    """A video that cannot be served; the message is meant for the caller."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds applied to every video before its frames are decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_duration_s: float = 600.0
    # The most frames one clip may be sampled to (a request's max_frames is refused above it).
    max_frames: int = 256
    # Checked against the header's width x height before decoding (decompression-bomb guard): 4K UHD.
    max_frame_pixels: int = 3840 * 2160
    # Sampled frames x frame pixels, from the header before decoding: 32 frames of 1920x1080 fit.
    max_total_pixels: int = 2**26


@dataclass(frozen=True)
class VideoInfo:
    """What the container's header says, read without decoding a frame."""

    container: str  # "MP4", "WebM" or "GIF"
    codec: str  # FFmpeg's decoder name: "h264", "vp8", "vp9", "gif"
    width: int  # the stored frame size (a rotated clip's upright frames swap them)
    height: int
    duration_s: float
    fps: float  # the stream's average frame rate


@dataclass(frozen=True)
class SampledVideo:
    """Upright RGB frames and the time (seconds from the clip's start) each was shown at."""

    frames: list[Image.Image]
    timestamps_s: list[float]
    info: VideoInfo
    # Frames per second the samples were taken at (1 / the step between sample times): what the
    # model is told of the clip's timing (Qwen2.5-VL's seconds per temporal patch).
    sampling_fps: float


def check_encoded(data: bytes, limits: VideoLimits = VideoLimits()) -> str:
    """The container of `data` after the checks that need no parsing (empty, size, magic bytes)."""
    if len(data) == 0:
        raise VideoError("empty video data (0 bytes); send the encoded file's bytes")
    if len(data) > limits.max_bytes:
        raise VideoError(
            f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes; send a shorter or smaller clip"
        )
    if data[4:8] == b"ftyp":
        return "MP4"
    if data.startswith(_EBML_MAGIC):
        return "WebM"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    raise VideoError(f"not a supported video file (first bytes {data[:8]!r}); supported: {SUPPORTED}")


def sample_times(duration_s: float, fps: float, max_frames: int, stream_fps: float = 0.0) -> list[float]:
    """The times (seconds from the start) frames are sampled at; see the module's docstring."""
    step = max(1.0 / fps, duration_s / max_frames)
    if stream_fps > 0:
        step = max(step, 1.0 / stream_fps)
    # A sample exactly at the end would show nothing: the last frame ends there. The small margin
    # keeps a rounding error in duration / step from adding or dropping a sample.
    count = max(1, math.ceil(duration_s / step - 1e-6))
    return [i * step for i in range(min(count, max_frames))]


def sampling_rate(times: list[float], fps: float) -> float:
    """The rate `sample_times` sampled at: `fps` unless it had to step further apart (one sample: `fps`)."""
    return 1.0 / (times[1] - times[0]) if len(times) > 1 else fps


def probe_video(data: bytes, limits: VideoLimits = VideoLimits(), index: int = 0) -> VideoInfo:
    """The header's facts about `data`, within every limit the header can show; nothing is decoded."""
    with _open_checked(data, limits, f"video {index}") as (_, info):
        return info


def probe_sampling(data: bytes, fps: float, max_frames: int, limits: VideoLimits = VideoLimits(),
                   index: int = 0) -> tuple[VideoInfo, int]:
    """The header's facts about `data` and how many frames sampling it at `fps`, at most `max_frames`,
    takes, within every limit the header can show (the clip's pixel budget included); nothing is decoded."""
    info = probe_video(data, limits, index)
    frames = len(sample_times(info.duration_s, fps, max_frames, info.fps))
    check_sampled_pixels(info, frames, limits, f"video {index}")
    return info, frames


def check_sampled_pixels(info: VideoInfo, frames: int, limits: VideoLimits, where: str) -> None:
    total = frames * info.width * info.height
    if total > limits.max_total_pixels:
        raise VideoError(
            f"{where}: {frames} frames of {info.width}x{info.height} = {total} pixels is over the "
            f"budget of {limits.max_total_pixels} pixels per clip; lower fps or max_frames, or downscale"
        )


def decode_video(
    data: bytes,
    fps: float = 2.0,
    max_frames: int = 32,
    limits: VideoLimits = VideoLimits(),
    index: int = 0,
) -> SampledVideo:
    """Sample `data` at `fps` frames per second, at most `max_frames` frames, upright and in RGB.

    `index` only names the video in error messages ("video 1: ...").
    """
    where = f"video {index}"
    if not fps > 0 or not math.isfinite(fps):
        raise VideoError(f"{where}: fps {fps} must be a positive number of frames per second to sample")
    if max_frames < 1:
        raise VideoError(f"{where}: max_frames {max_frames} must be at least 1")
    if max_frames > limits.max_frames:
        raise VideoError(
            f"{where}: max_frames {max_frames} is over the limit of {limits.max_frames} frames per clip; "
            f"ask for {limits.max_frames} or fewer"
        )
    with _open_checked(data, limits, where) as (container, info):
        targets = sample_times(info.duration_s, fps, max_frames, info.fps)
        check_sampled_pixels(info, len(targets), limits, where)
        try:
            frames, times = _sample(container, info, targets, limits, where)
        except VideoError:
            raise
        except (av.FFmpegError, ValueError) as exc:
            raise VideoError(f"{where}: truncated or corrupt {info.container} data ({exc})") from None
    return SampledVideo(frames=frames, timestamps_s=times, info=info, sampling_fps=sampling_rate(targets, fps))


@contextmanager
def _open_checked(data: bytes, limits: VideoLimits, where: str):
    """The open container and its `VideoInfo`, every check the header allows passed."""
    try:
        kind = check_encoded(data, limits)
    except VideoError as exc:
        raise VideoError(f"{where}: {exc}") from None
    if kind == "GIF":
        # FFmpeg's probe decodes the first frame at the logical screen's size: check it first.
        _check_frame_size(*struct.unpack_from("<HH", data.ljust(10, b"\0"), 6), limits, where)
    demuxer, codecs = _CONTAINERS[kind]
    try:
        # max_pixels bounds the decoder FFmpeg's stream probe runs; options reach only that probe
        # and the demuxer, which ignores it.
        container = av.open(io.BytesIO(data), format=demuxer, options={"max_pixels": str(limits.max_frame_pixels)})
    except (av.FFmpegError, ValueError) as exc:
        raise VideoError(f"{where}: cannot read the {kind} header: truncated or corrupt data ({exc})") from None
    try:
        yield container, _read_header(container, data, kind, codecs, limits, where)
    finally:
        container.close()


def _read_header(
    container, data: bytes, kind: str, codecs: tuple[str, ...], limits: VideoLimits, where: str
) -> VideoInfo:
    if not container.streams.video:
        if container.streams.audio:
            raise VideoError(f"{where}: the {kind} file has audio only, no video stream; send a video")
        raise VideoError(f"{where}: the {kind} file has no video stream; send a video")
    stream = container.streams.video[0]
    codec = stream.codec_context.name if stream.codec_context else "unknown"
    if codec not in codecs:
        raise VideoError(f"{where}: {kind} with {codec} video is not supported; supported: {SUPPORTED}")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        # The capped probe leaves a VP9 stream's size unset when its frames are over max_pixels.
        raise VideoError(
            f"{where}: the frame size cannot be read within the limit of {limits.max_frame_pixels} "
            f"pixels per frame (decompression-bomb guard): frames over it, or a corrupt header; "
            f"downscale the video"
        )
    _check_frame_size(width, height, limits, where)
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    duration = _duration_s(container, stream)
    if duration is None:
        duration = _demuxed_duration_s(data, _CONTAINERS[kind][0], rate, limits)
    if duration is None or duration <= 0:
        raise _no_frames(kind, where)
    if duration > limits.max_duration_s:
        raise VideoError(f"{where}: {duration:.1f} s is over the limit of {limits.max_duration_s:g} s; trim the clip")
    return VideoInfo(kind, codec, width, height, duration, rate)


def _no_frames(kind: str, where: str) -> VideoError:
    return VideoError(f"{where}: the {kind} file has no frames (zero length); send a clip with frames")


def _check_frame_size(width: int, height: int, limits: VideoLimits, where: str) -> None:
    if width * height > limits.max_frame_pixels:
        raise VideoError(
            f"{where}: frames of {width}x{height} = {width * height} pixels are over the limit of "
            f"{limits.max_frame_pixels} pixels (decompression-bomb guard); downscale the video"
        )


def _duration_s(container, stream) -> float | None:
    """The clip's length from the header: the stream's own, else the container's (WebM has only that)."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _demuxed_duration_s(data: bytes, demuxer: str, rate: float, limits: VideoLimits) -> float | None:
    """The clip's length from its packets' timestamps (None without packets), for a file whose header
    has none: a WebM recorded live, as browsers' MediaRecorder writes it. Packets are read, none decoded."""
    # A second reader: the first stays at the start, where decoding begins (a live WebM has no index
    # to seek back by).
    options = {"max_pixels": str(limits.max_frame_pixels)}
    with av.open(io.BytesIO(data), format=demuxer, options=options) as scan:
        stream = scan.streams.video[0]
        first = last = None
        for packet in scan.demux(stream):
            if packet.pts is None:
                continue
            first = packet.pts if first is None else min(first, packet.pts)
            if last is None or packet.pts >= last[0]:
                last = (packet.pts, packet.duration)
    if first is None:
        return None
    # The last frame is on screen for its packet's duration, else one frame at the average rate.
    shown = float(last[1] * stream.time_base) if last[1] else (1.0 / rate if rate > 0 else 0.0)
    return float((last[0] - first) * stream.time_base) + shown


def _sample(container, info: VideoInfo, targets: list[float], limits: VideoLimits, where: str):
    stream = container.streams.video[0]
    stream.codec_context.options = {
        # The caller's limit also bounds every frame the decoder makes, should the size change mid-stream.
        "max_pixels": str(limits.max_frame_pixels),
        # A damaged H.264 slice is an error, not a frame patched up from its neighbours. (VP8 and VP9
        # frames carry no checksums: damage inside one decodes as damaged pixels, undetected.)
        "err_detect": "crccheck+bitstream+buffer+explode",
    }
    start_timestamp = stream.start_time or 0
    start = float(start_timestamp * stream.time_base)
    if info.container == "WebM":
        try:
            container.seek(0, stream=stream)  # reads the cues: WebM's keyframe index
        except av.FFmpegError:
            pass  # no cues (or no frames to index): decoding goes in order from the start
    keyframes = _keyframe_times(stream) if info.container != "GIF" else []
    frame_interval = 1.0 / info.fps if info.fps > 0 else 0.0

    chosen: list[tuple[av.VideoFrame, float]] = []
    previous: tuple[av.VideoFrame, float] | None = None
    position = 0.0  # how far decoding has gone, in seconds from the start
    sought = 0.0  # the last keyframe sought to: seeks only go forward
    decoded = container.decode(stream)
    while len(chosen) < len(targets):
        target = targets[len(chosen)]
        skip_to = [time for time in keyframes if max(position + 1.5 * frame_interval, sought) < time <= target]
        if skip_to:
            position = sought = skip_to[-1]
            # Seeks go by presentation time, to the last keyframe at or before it: this one.
            container.seek(start_timestamp + round(sought / stream.time_base), stream=stream, backward=True)
            decoded, previous = container.decode(stream), None
        frame = next(decoded, None)
        if frame is None:  # end of stream: the last frame stays on screen to the end
            if previous is None:
                raise _no_frames(info.container, where)
            last_frame, last_time = previous
            # The last frame is on screen for its own duration (a GIF may hold it for seconds).
            shown = float(last_frame.duration * stream.time_base) if last_frame.duration else frame_interval
            if target > last_time + shown + 0.5 * frame_interval + 0.05:
                raise VideoError(
                    f"{where}: truncated {info.container} data: frames stop at {last_time:.2f} s of the "
                    f"{info.duration_s:.2f} s its header gives; send the whole file"
                )
            chosen.append(previous)
            continue
        if frame.pts is None:
            raise VideoError(f"{where}: corrupt {info.container} data: a frame has no timestamp")
        if frame.is_corrupt:
            raise VideoError(f"{where}: truncated or corrupt {info.container} data: a frame failed to decode")
        time = float(frame.pts * stream.time_base) - start
        if time > limits.max_duration_s:  # the header understated the length
            raise VideoError(
                f"{where}: frames run past the limit of {limits.max_duration_s:g} s; trim the clip"
            )
        # Every sample time this frame is later than shows the frame before it.
        while len(chosen) < len(targets) and time > targets[len(chosen)] + 1e-6:
            chosen.append(previous or (frame, time))
        previous, position = (frame, time), time
    # One converter for the clip: VideoFrame.to_ndarray builds a new one per frame (7x slower at 640x360).
    reformatter = VideoReformatter()
    return [_upright_rgb(frame, reformatter) for frame, _ in chosen], [round(time, 6) for _, time in chosen]


def _keyframe_times(stream) -> list[float]:
    """Each keyframe's time (seconds from the start) from the container's index.

    MP4's index holds decode timestamps, which trail the presentation times by the stream's reorder
    delay; counted from the first keyframe (shown first), they are presentation times again."""
    entries = [entry.timestamp for entry in stream.index_entries if entry.is_keyframe]
    return [float((timestamp - entries[0]) * stream.time_base) for timestamp in entries]


def _upright_rgb(frame: av.VideoFrame, reformatter: VideoReformatter) -> Image.Image:
    """The frame in RGB, turned as its display matrix says (FFmpeg's own autorotate rules)."""
    pixels = reformatter.reformat(frame, format="rgb24").to_ndarray()
    matrix = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if matrix is not None:
        pixels = _apply_display_matrix(pixels, struct.unpack("<9i", bytes(matrix)[:36]), frame.rotation)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def _apply_display_matrix(pixels: np.ndarray, matrix: tuple[int, ...], rotation: float) -> np.ndarray:
    """Quarter turns and flips as fftools' autorotate picks them (its transpose/hflip/vflip filters);
    `rotation` is counter-clockwise degrees (PyAV's `VideoFrame.rotation`). Other angles round to the
    nearest quarter turn."""
    clockwise = round(-rotation / 90) % 4
    if clockwise == 1:  # transpose=clock, or cclock_flip (a plain transpose) when mirrored
        return pixels.transpose(1, 0, 2) if matrix[3] > 0 else np.rot90(pixels, -1)
    if clockwise == 2:
        if matrix[0] < 0:
            pixels = pixels[:, ::-1]
        return pixels[::-1] if matrix[4] < 0 else pixels
    if clockwise == 3:  # transpose=cclock, or clock_flip (the anti-transpose) when mirrored
        return np.rot90(pixels, -1)[::-1] if matrix[3] < 0 else np.rot90(pixels, 1)
    return pixels[::-1] if matrix[4] < 0 else pixels
