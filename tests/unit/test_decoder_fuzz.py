"""The image and video decoders under generated bad input (Hypothesis): valid files of every supported
format, mutated (truncated, bit-flipped, bytes overwritten, wrong magic, huge declared sizes) or replaced
by random bytes behind a real magic number. Every input ends in the decoder's own error (ImageError,
VideoError: a message for the caller) or in a picture within the limits: never another exception, a
hang (each example has a deadline) or a picture larger than the limits allow.

Derandomized (the examples follow from the test's source, no example database): a CI run is
reproducible, and a failure prints the example that shows it.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from tests.conftest import encode, picture
from tests.unit.test_video import encode as encode_clip, gif as gif_clip
from vlm_serving.preprocessing.images import ImageError, ImageLimits, check_encoded, decode_image, upright_size
from vlm_serving.preprocessing.video import VideoError, VideoLimits, decode_video, probe_video

# Pillow warns of headers over its own (looser) bomb guard; the limits here refuse them.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
IMAGE_LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=1_000_000, max_aspect_ratio=200.0)
VIDEO_LIMITS = VideoLimits(max_bytes=1_000_000, max_duration_s=60.0, max_frames=16, max_frame_pixels=640 * 480,
                           max_total_pixels=8 * 640 * 480)
FUZZ = dict(derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: a quarter turn
    return encode(picture(40, 24, seed=2), "JPEG", exif=exif.tobytes())


IMAGE_SEEDS = [
    encode(picture(48, 32, seed=1)),
    encode(picture(48, 32, seed=1, mode="RGBA")),
    encode(picture(40, 30, seed=1, mode="L"), "PNG"),
    encode(picture(48, 32, seed=1), "JPEG", quality=80),
    encode(picture(48, 32, seed=1), "JPEG", progressive=True),
    _exif_jpeg(),
    encode(picture(48, 32, seed=1), "WEBP"),
    encode(picture(48, 32, seed=1, mode="P"), "GIF"),
    encode(picture(48, 32, seed=1), "BMP"),
]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


def _png_with_size(seed: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    """The PNG with its IHDR's width and height replaced (CRC recomputed or left stale)."""
    ihdr = bytearray(seed[8:33])  # length, "IHDR", 13 bytes of body, CRC
    struct.pack_into(">II", ihdr, 8, width, height)
    if fix_crc:
        struct.pack_into(">I", ihdr, 21, zlib.crc32(bytes(ihdr[4:21])))
    return seed[:8] + bytes(ihdr) + seed[33:]


def _declared_size(seed: bytes, width: int, height: int) -> bytes:
    """The file with its header's size fields overwritten, wherever the format keeps them."""
    data = bytearray(seed)
    if len(data) < 40:  # too short to hold a header's size fields
        return seed
    if data.startswith(b"\x89PNG"):
        return _png_with_size(seed, width, height, fix_crc=bool(width & 1))
    if data.startswith(b"GIF"):
        struct.pack_into("<HH", data, 6, width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM"):
        struct.pack_into("<ii", data, 18, width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif data.startswith(b"\xff\xd8"):
        marker = data.find(b"\xff\xc0") if data.find(b"\xff\xc0") >= 0 else data.find(b"\xff\xc2")
        if 0 <= marker < len(data) - 9:
            struct.pack_into(">HH", data, marker + 5, height & 0xFFFF, width & 0xFFFF)
    elif data[8:12] == b"WEBP" and data[12:16] == b"VP8 ":
        struct.pack_into("<HH", data, 26, width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


@st.composite
def mutated(draw, kind: str) -> bytes:
    """A seed file of `kind` ("image" or "video") changed in one to three ways, or random bytes behind
    a real magic number."""
    seeds, magics = SEEDS[kind]
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(magics)) + draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "magic", "size", "splice"]))
        if kind == "truncate":
            data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
        elif kind == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                position = draw(st.integers(0, len(data) - 1))
                data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite" and data:
            position = draw(st.integers(0, len(data) - 1))
            data[position:position + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "magic":
            data[:4] = draw(st.sampled_from([b"\x00\x00\x00\x00", b"GIF8", b"\x89PNG", b"\xff\xd8\xff\xe0", b"BM\x00\x00"]))
        elif kind == "size":
            dimension = st.one_of(st.integers(0, 4), st.integers(60_000, 2**31 - 1), st.integers(1, 70_000))
            data = bytearray(_declared_size(bytes(data), draw(dimension), draw(dimension)))
        elif kind == "splice":
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(max_examples=5000, deadline=2000, **FUZZ)
@given(mutated("image"))
def test_image_decoding_of_mutated_files_ends_in_an_image_error_or_a_bounded_picture(data):
    try:
        check_encoded(data, IMAGE_LIMITS)
        width, height = upright_size(data, IMAGE_LIMITS)
        decoded = decode_image(data, IMAGE_LIMITS)
    except ImageError as error:
        assert str(error), "an error with nothing to tell the caller"
        event("ImageError")
        return
    event("decoded")
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    assert width * height <= IMAGE_LIMITS.max_pixels
    assert np.asarray(decoded).shape == (height, width, 3)


def test_the_image_seeds_decode():  # the fuzzing starts from files the decoder takes
    for seed in IMAGE_SEEDS:
        assert decode_image(seed, IMAGE_LIMITS).mode == "RGB"
    assert upright_size(IMAGE_SEEDS[5], IMAGE_LIMITS) == (24, 40)  # the EXIF seed turns


VIDEO_SEEDS = [
    encode_clip("h264", frames=12, rate=6, size=(32, 24)),
    encode_clip("vp9", frames=12, rate=6, size=(32, 24)),
    gif_clip([(200, 0, 0), (0, 200, 0), (0, 0, 200)], [100, 200, 100]),
]
VIDEO_MAGICS = [b"\x00\x00\x00\x18ftypisom", b"\x1a\x45\xdf\xa3", b"GIF89a"]
SEEDS = {"image": (IMAGE_SEEDS, MAGICS), "video": (VIDEO_SEEDS, VIDEO_MAGICS)}


@settings(max_examples=1000, deadline=5000, **FUZZ)
@given(mutated("video"), st.sampled_from([0.5, 2.0, 30.0]), st.integers(1, 16))
def test_video_probing_and_decoding_of_mutated_files_end_in_a_video_error_or_bounded_frames(data, fps, max_frames):
    try:
        info = probe_video(data, VIDEO_LIMITS)
        sampled = decode_video(data, fps, max_frames, VIDEO_LIMITS)
    except VideoError as error:
        assert str(error), "an error with nothing to tell the caller"
        event("VideoError")
        return
    event("decoded")
    assert info.width * info.height <= VIDEO_LIMITS.max_frame_pixels and info.duration_s <= VIDEO_LIMITS.max_duration_s
    assert 1 <= len(sampled.frames) <= max_frames and len(sampled.frames) == len(sampled.timestamps_s)
    assert sum(frame.width * frame.height for frame in sampled.frames) <= VIDEO_LIMITS.max_total_pixels
    assert all(frame.mode == "RGB" for frame in sampled.frames)


def test_the_video_seeds_decode():
    for seed in VIDEO_SEEDS:
        assert len(decode_video(seed, 2.0, 4, VIDEO_LIMITS).frames) >= 1
