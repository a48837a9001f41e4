"""Video decoding (issue 27, item 2): clips made here with PyAV's own encoders (libx264 for H.264,
libvpx for VP8 and VP9) and Pillow (animated GIF), sampled and checked by pixel colour and timestamp."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from vlm_serving.preprocessing import video
from vlm_serving.preprocessing.video import (
    VideoError,
    VideoLimits,
    decode_video,
    probe_video,
    sample_times,
)

CODECS = {"h264": ("mp4", "libx264"), "vp8": ("webm", "libvpx"), "vp9": ("webm", "libvpx-vp9")}


def grey(index: int) -> int:
    """Frame `index`'s grey level: distinct for 25 frames, far enough apart to survive lossy coding."""
    return (index * 10) % 250


def encode(
    codec: str = "h264",
    frames: int = 50,
    rate: int = 10,
    size: tuple[int, int] = (64, 48),
    keyframe_every: int | None = None,
    paint=None,
) -> bytes:
    """A clip of `frames` frames at `rate` fps; frame i is solid grey(i) unless `paint(i)` draws it."""
    container_format, encoder = CODECS[codec]
    width, height = size
    options = {"g": str(keyframe_every)} if keyframe_every else {}
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(encoder, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = paint(index) if paint else np.full((height, width, 3), grey(index), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def gif(colours, durations_ms) -> bytes:
    pictures = [Image.new("RGB", (40, 30), colour) for colour in colours]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:], duration=durations_ms, loop=0)
    return buffer.getvalue()


def greys(result) -> list[int]:
    return [int(np.asarray(frame)[..., 0].mean().round()) for frame in result.frames]


class DecodeSpy:
    """Wraps av.open's container: records seeks and counts the frames the decoder made."""

    def __init__(self, container):
        self._container, self.seeks, self.decoded = container, [], 0

    def __getattr__(self, name):
        return getattr(self._container, name)

    def seek(self, *args, **kwargs):
        self.seeks.append(args[0])
        return self._container.seek(*args, **kwargs)

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


@pytest.fixture
def spies(monkeypatch):
    opened = []
    real_open = av.open

    def spying_open(file, mode="r", **kwargs):
        if mode == "w":  # the test's own encoding
            return real_open(file, mode, **kwargs)
        opened.append(DecodeSpy(real_open(file, mode, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(video.av, "open", spying_open)
    return opened


# --- containers and codecs -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["h264", "vp8", "vp9"])
def test_samples_each_codec_at_the_requested_rate(codec):
    result = decode_video(encode(codec, frames=50, rate=10), fps=2, max_frames=32)

    assert result.info.codec == codec
    assert result.info.container == ("MP4" if codec == "h264" else "WebM")
    assert (result.info.width, result.info.height) == (64, 48)
    assert result.info.duration_s == pytest.approx(5.0)
    assert result.info.fps == pytest.approx(10.0)
    assert result.timestamps_s == pytest.approx([0.5 * i for i in range(10)], abs=1e-6)
    # The frame shown at 0.5*i s is frame 5*i.
    assert greys(result) == pytest.approx([grey(5 * i) for i in range(10)], abs=3)
    assert all(frame.mode == "RGB" and frame.size == (64, 48) for frame in result.frames)


def test_webm_recorded_live_without_a_length_in_its_header():
    # Browsers' MediaRecorder writes WebM this way: no Duration element, no cues.
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), grey(index), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(io.BytesIO(buffer.getvalue())) as container:
        assert container.duration is None and container.streams.video[0].duration is None

    result = decode_video(buffer.getvalue(), fps=2)

    assert result.info.duration_s == pytest.approx(3.0)
    assert result.timestamps_s == pytest.approx([0.5 * i for i in range(6)])
    assert greys(result) == pytest.approx([grey(5 * i) for i in range(6)], abs=3)


def test_animated_gif_frames_follow_their_delays():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    data = gif(colours, [500, 500, 500, 500])

    result = decode_video(data, fps=2, max_frames=32)

    assert result.info.container == "GIF" and result.info.codec == "gif"
    assert result.info.duration_s == pytest.approx(2.0)
    assert result.timestamps_s == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert [frame.getpixel((20, 15)) for frame in result.frames] == colours


def test_gif_long_frame_is_shown_at_every_sample_time_it_covers():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    data = gif(colours, [500, 1000, 500])

    result = decode_video(data, fps=2, max_frames=32)

    # Samples at 0, 0.5, 1.0 and 1.5 s: the green frame is on screen from 0.5 s to 1.5 s.
    assert result.timestamps_s == pytest.approx([0.0, 0.5, 0.5, 1.5])
    assert [frame.getpixel((0, 0)) for frame in result.frames] == [colours[0], colours[1], colours[1], colours[2]]


# --- sampling ---------------------------------------------------------------------------------------


def test_sample_times_at_the_rate_then_spread_when_max_frames_cuts_the_clip_short():
    assert sample_times(5.0, fps=2, max_frames=32) == pytest.approx([0.5 * i for i in range(10)])
    assert sample_times(10.0, fps=2, max_frames=4) == pytest.approx([0.0, 2.5, 5.0, 7.5])
    assert sample_times(0.3, fps=2, max_frames=32) == [0.0]  # a short clip still gives its first frame
    assert sample_times(5.0, fps=30, max_frames=100, stream_fps=10) == pytest.approx([0.1 * i for i in range(50)])


def test_max_frames_spreads_samples_over_the_whole_clip():
    result = decode_video(encode("h264", frames=100, rate=10), fps=2, max_frames=4)

    assert result.timestamps_s == pytest.approx([0.0, 2.5, 5.0, 7.5])
    assert greys(result) == pytest.approx([grey(0), grey(25), grey(50), grey(75)], abs=3)


def test_sampling_faster_than_the_stream_gives_each_frame_once():
    result = decode_video(encode("vp8", frames=10, rate=5), fps=30, max_frames=100)

    assert result.timestamps_s == pytest.approx([0.2 * i for i in range(10)])
    assert greys(result) == pytest.approx([grey(i) for i in range(10)], abs=3)


@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_sparse_samples_seek_past_the_frames_between_them(codec, spies):
    # 20 s at 10 fps with a keyframe every second; one sample every 4 s.
    data = encode(codec, frames=200, rate=10, keyframe_every=10, paint=None)

    result = decode_video(data, fps=0.25, max_frames=32)

    assert result.timestamps_s == pytest.approx([0.0, 4.0, 8.0, 12.0, 16.0])
    assert greys(result) == pytest.approx([grey(i) for i in (0, 40, 80, 120, 160)], abs=3)
    assert len(spies[0].seeks) >= 4
    assert spies[0].decoded < 200 // 2  # the frames between samples were skipped, not decoded


def test_samples_one_frame_apart_decode_in_order_without_seeking(spies):
    data = encode("h264", frames=50, rate=10, keyframe_every=10)

    result = decode_video(data, fps=5, max_frames=32)

    assert greys(result) == pytest.approx([grey(2 * i) for i in range(25)], abs=3)
    assert spies[0].seeks == []  # no seek would skip more than the one frame between samples
    assert spies[0].decoded == 50


# --- rotation ---------------------------------------------------------------------------------------


def three_colours(_index: int) -> np.ndarray:
    """Stored picture: red top-left quarter, blue top-right quarter, green bottom half."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:24, :32] = (255, 0, 0)
    pixels[:24, 32:] = (0, 0, 255)
    pixels[24:] = (0, 255, 0)
    return pixels


def colour_in(frame: Image.Image, quarter: str) -> str:
    """The colour at the centre of a quarter ("TL", "TR", "BL", "BR") of the picture."""
    width, height = frame.size
    x = width // 4 if quarter[1] == "L" else 3 * width // 4
    y = height // 4 if quarter[0] == "T" else 3 * height // 4
    r, g, b = frame.getpixel((x, y))
    return {(True, False, False): "red", (False, True, False): "green", (False, False, True): "blue"}.get(
        (r > 200, g > 200, b > 200), f"{(r, g, b)}"
    )


@pytest.mark.parametrize(
    # The display matrix (counter-clockwise degrees, then mirrors) and the upright picture's quarters.
    ("rotation", "hflip", "vflip", "size", "quarters"),
    [
        (0, False, False, (64, 48), {"TL": "red", "TR": "blue", "BL": "green", "BR": "green"}),
        (90, False, False, (48, 64), {"BL": "red", "TL": "blue", "TR": "green", "BR": "green"}),
        # A phone held upright records "rotate=90" (clockwise): the matrix says -90 counter-clockwise.
        (-90, False, False, (48, 64), {"TR": "red", "BR": "blue", "TL": "green", "BL": "green"}),
        (180, False, False, (64, 48), {"BR": "red", "BL": "blue", "TL": "green", "TR": "green"}),
        (0, True, False, (64, 48), {"TR": "red", "TL": "blue", "BL": "green", "BR": "green"}),
        (0, False, True, (64, 48), {"BL": "red", "BR": "blue", "TL": "green", "TR": "green"}),
        (90, True, False, (48, 64), {"BR": "red", "TR": "blue", "TL": "green", "BL": "green"}),
        (90, False, True, (48, 64), {"TL": "red", "BL": "blue", "TR": "green", "BR": "green"}),
    ],
)
def test_display_matrix_turns_frames_upright(rotation, hflip, vflip, size, quarters):
    def encode_turned() -> bytes:
        buffer = io.BytesIO()
        with av.open(buffer, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
            frame = av.VideoFrame.from_ndarray(three_colours(0), format="rgb24")
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
        return buffer.getvalue()

    frame = decode_video(encode_turned(), fps=2).frames[0]

    assert frame.size == size
    assert {quarter: colour_in(frame, quarter) for quarter in quarters} == quarters


# --- refusals ---------------------------------------------------------------------------------------


def test_empty_and_unknown_bytes_are_refused():
    with pytest.raises(VideoError, match="empty video data"):
        decode_video(b"")
    with pytest.raises(VideoError, match="not a supported video file.*MP4 \\(H.264\\), WebM"):
        decode_video(b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(100))


def test_corrupt_bytes_are_refused():
    data = b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(0).bytes(4000)

    with pytest.raises(VideoError, match="video 0: cannot read the MP4 header: truncated or corrupt"):
        decode_video(data)


def test_corrupt_h264_frames_are_refused():
    rng = np.random.default_rng(2)

    def noise(_index: int) -> np.ndarray:  # incompressible: the coded frames fill most of the file
        return rng.integers(0, 256, (96, 128, 3), np.uint8)

    data = bytearray(encode("h264", frames=20, size=(128, 96), paint=noise))
    # Scramble coded frame data (the index, at the end, stays whole).
    damaged = int(len(data) * 0.6)
    data[damaged : damaged + 300] = np.random.default_rng(1).bytes(300)

    with pytest.raises(VideoError, match="video 0: truncated or corrupt MP4 data"):
        decode_video(bytes(data), fps=10, max_frames=32)


@pytest.mark.parametrize("codec", ["h264", "vp8"])
def test_truncated_files_are_refused(codec):
    data = encode(codec, frames=50, rate=10)

    with pytest.raises(VideoError, match="truncated"):
        decode_video(data[: len(data) // 2], fps=2)


def test_truncated_webm_names_where_its_frames_stop():
    data = encode("vp8", frames=50, rate=10)

    stops = r"frames stop at \d\.\d\d s of the 5.00 s its header gives; send the whole file"
    with pytest.raises(VideoError, match=stops):
        decode_video(data[: len(data) // 2], fps=2)


def audio_only() -> bytes:
    """An MP4 with an audio track and no video stream."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()


def zero_length() -> bytes:
    """A WebM whose video track holds no frames (its length comes from the audio beside it)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = 48000, 0
        for packet in [*audio.encode(frame), *audio.encode()]:
            container.mux(packet)
    return buffer.getvalue()


def test_audio_only_file_is_refused():
    with pytest.raises(VideoError, match="video 0: the MP4 file has audio only, no video stream; send a video"):
        decode_video(audio_only())


def test_zero_length_video_is_refused():
    with pytest.raises(VideoError, match="the WebM file has no frames \\(zero length\\)"):
        decode_video(zero_length())


def test_unsupported_codec_is_refused():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)

    with pytest.raises(VideoError, match="MP4 with mpeg4 video is not supported; supported: MP4 \\(H.264\\)"):
        decode_video(buffer.getvalue())


def test_oversized_bytes_duration_and_frame_requests_are_refused():
    data = encode("h264", frames=50, rate=10)  # 5 s

    with pytest.raises(VideoError, match=f"{len(data)} bytes is over the limit of 1000 bytes"):
        decode_video(data, limits=VideoLimits(max_bytes=1000))
    with pytest.raises(VideoError, match="5.0 s is over the limit of 2 s; trim the clip"):
        decode_video(data, limits=VideoLimits(max_duration_s=2))
    with pytest.raises(VideoError, match="max_frames 300 is over the limit of 256 frames per clip"):
        decode_video(data, max_frames=300)
    with pytest.raises(VideoError, match="fps 0 must be a positive number"):
        decode_video(data, fps=0)
    with pytest.raises(VideoError, match="max_frames 0 must be at least 1"):
        decode_video(data, max_frames=0)


def test_total_pixel_budget_counts_the_sampled_frames_from_the_header(spies):
    data = encode("h264", frames=50, rate=10)  # 10 samples at 2 fps, 64x48 = 3,072 pixels each

    with pytest.raises(
        VideoError, match="10 frames of 64x48 = 30720 pixels is over the budget of 30000 pixels per clip; lower fps"
    ):
        decode_video(data, fps=2, limits=VideoLimits(max_total_pixels=30_000))
    assert spies[0].decoded == 0
    assert len(decode_video(data, fps=2, max_frames=9, limits=VideoLimits(max_total_pixels=30_000)).frames) == 9


def test_huge_h264_frames_are_refused_from_the_header(spies):
    data = encode("h264", frames=1, size=(4096, 2304))  # 9.4 million pixels: over 4K UHD's 8.3 million

    with pytest.raises(
        VideoError,
        match="frames of 4096x2304 = 9437184 pixels are over the limit of 8294400 pixels \\(decompression-bomb",
    ):
        decode_video(data)
    assert spies[0].decoded == 0


def test_huge_vp9_frames_are_refused_before_decoding(spies):
    data = encode("vp9", frames=1, size=(640, 480))

    with pytest.raises(VideoError, match="cannot be read within the limit of 100000 pixels per frame"):
        decode_video(data, limits=VideoLimits(max_frame_pixels=100_000))
    assert spies[0].decoded == 0


def test_gif_claiming_a_huge_screen_is_refused_before_ffmpeg_reads_it(spies):
    data = bytearray(gif([(255, 0, 0), (0, 255, 0)], [100, 100]))
    data[6:10] = b"\xff\xff\xff\xff"  # logical screen 65535x65535: 4.3 billion pixels

    with pytest.raises(VideoError, match="frames of 65535x65535 = 4294836225 pixels are over the limit"):
        probe_video(bytes(data))
    assert spies == []  # refused before FFmpeg opened it


def test_probe_reads_the_header_without_decoding(spies):
    info = probe_video(encode("vp8", frames=30, rate=10, size=(96, 64)))

    assert (info.container, info.codec, info.width, info.height) == ("WebM", "vp8", 96, 64)
    assert info.duration_s == pytest.approx(3.0)
    assert spies[0].decoded == 0


def test_errors_name_the_video_by_index():
    with pytest.raises(VideoError, match="^video 3: empty video data"):
        decode_video(b"", index=3)


def test_gif_holding_its_last_frame_is_whole_not_truncated():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    data = gif(colours, [250, 250, 1500])  # 2 s, the last 1.5 s on the blue frame

    result = decode_video(data, fps=2, max_frames=32)

    assert result.timestamps_s == pytest.approx([0.0, 0.5, 0.5, 0.5])
    assert [frame.getpixel((0, 0)) for frame in result.frames] == [colours[0], colours[2], colours[2], colours[2]]
