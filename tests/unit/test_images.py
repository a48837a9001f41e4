import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode, picture
from vlm_serving.preprocessing.images import ImageError, ImageLimits, decode_image, sniff_format


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_decodes_every_supported_format_to_rgb(fmt):
    data = encode(picture(37, 23), fmt)
    assert sniff_format(data) == fmt
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (37, 23)


def test_png_pixels_are_exact():
    source = picture(16, 9)
    assert np.array_equal(np.asarray(decode_image(encode(source))), np.asarray(source))


def test_gif_takes_the_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    buffer = io.BytesIO()
    red.save(buffer, "GIF", save_all=True, append_images=[blue])
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    source = picture(40, 20, noise=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    upright = decode_image(encode(source, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 40)
    pixels = np.asarray(upright, dtype=np.int16)
    right = np.abs(pixels - np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)).mean()
    wrong = np.abs(pixels - np.asarray(source.transpose(Image.Transpose.ROTATE_90), dtype=np.int16)).mean()
    assert right < 6 and wrong > 4 * right  # JPEG loss only, and turned the right way


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half red over white
    rgb = decode_image(encode(rgba))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0))[0] == 255 and 125 <= rgb.getpixel((1, 0))[1] <= 129


def test_palette_with_transparency_uses_white():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    rgb = decode_image(encode(palette, "PNG", transparency=0))
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (255, 0, 0)


def test_rgb_png_with_a_transparent_colour_key_equals_transformers():
    from transformers.image_transforms import convert_to_rgb

    keyed = Image.new("RGB", (3, 1), (0, 0, 0))
    keyed.putpixel((1, 0), (10, 200, 30))
    data = encode(keyed, "PNG", transparency=(0, 0, 0))  # black is the transparent colour (tRNS)
    ours = decode_image(data)
    assert ours.getpixel((0, 0)) == (255, 255, 255) and ours.getpixel((1, 0)) == (10, 200, 30)
    assert np.array_equal(np.asarray(ours), convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))


def test_cmyk_jpeg_converts_to_rgb():
    rgb = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG"))
    red, green, blue = rgb.getpixel((1, 1))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_greyscale_keeps_the_high_byte():
    values = np.array([[0, 0x8000, 0xFFFF]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    rgb = np.asarray(decode_image(data))
    assert rgb[0, :, 0].tolist() == [0, 0x80, 0xFF] and rgb.shape == (1, 3, 3)


def test_empty_data_is_refused():
    with pytest.raises(ImageError, match="empty image data"):
        decode_image(b"")


def test_non_image_is_refused_naming_the_formats():
    with pytest.raises(ImageError, match="not a supported image file.*JPEG, PNG, WEBP, GIF, BMP"):
        decode_image(b"%PDF-1.7 this is a document")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_data_is_refused(fmt):
    data = encode(picture(64, 64), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt|cannot read"):
        decode_image(data[: len(data) // 2], index=3)


def test_corrupt_header_is_refused():
    with pytest.raises(ImageError, match="image 0: cannot read the PNG header"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with one tiny IDAT: decoding it would explode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageError, match="image 0: .*3600000000 pixels.*decompression-bomb guard"):
        decode_image(_png_header_only(60000, 60000))


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageError, match="over the limit of 1000 pixels"):
        decode_image(encode(picture(50, 50)), ImageLimits(max_pixels=1000))


def test_byte_limit():
    with pytest.raises(ImageError, match="bytes is over the limit of 100 bytes"):
        decode_image(encode(picture(50, 50)), ImageLimits(max_bytes=100))


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(ImageError, match="aspect ratio"):
        decode_image(encode(picture(1000, 2)))


def test_upright_size_reads_headers_only_and_leaves_bad_data_to_decoding():
    from vlm_serving.preprocessing.images import upright_size

    png = encode(picture(120, 80))
    assert upright_size(png[:200]) == (120, 80)  # truncated pixels: the header still gives the size
    with pytest.raises(ImageError, match="truncated or corrupt PNG data"):
        decode_image(png[:200])


def png_chunks(data: bytes) -> list[bytes]:
    """A PNG's chunks, each whole (length, type, body, CRC)."""
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    return chunks


def late_exif_png(png: bytes, orientation: int) -> bytes:
    """`png` with an eXIf chunk holding `orientation` after its pixel data (IDAT), just before IEND:
    where some writers put it, and where Pillow reads it only once the pixels are decoded."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[6:]  # the TIFF structure, without the "Exif\0\0" of JPEG's APP1
    late = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    *rest, end = png_chunks(png)
    return png[:8] + b"".join(rest) + late + end


def test_a_png_whose_exif_follows_its_pixels_is_turned_the_same_everywhere():
    """The size and orientation read before decoding (the context check, the gateway's box mapping)
    agree with the decoded picture the model sees, and nothing is decoded to read them."""
    from vlm_serving.preprocessing.images import stored_geometry, upright_size

    data = late_exif_png(encode(picture(120, 80)), 6)
    assert "exif" not in Image.open(io.BytesIO(data)).info  # Pillow has not seen it from the header
    assert decode_image(data).size == (80, 120)
    assert stored_geometry(data) == (120, 80, 6) and upright_size(data) == (80, 120)
    header_only = late_exif_png(_png_header_only(6000, 4000), 8)  # pixels that would fail to decode
    assert stored_geometry(header_only) == (6000, 4000, 8) and upright_size(header_only) == (4000, 6000)
