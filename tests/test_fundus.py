"""fer.data.fundus: the retina found, cropped and padded round and centred on generated
photographs of known geometry; every file mode; EXIF orientation; the Graham filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fer.data.fundus as F
from fer import names
from fer.data import load_fundus


def fundus_photo(path: Path, size=(400, 300), centre=(150, 160), radius=100, colour=(200, 90, 40)) -> Path:
    """A bright disc (the retina) on a black canvas, as fundus cameras frame it."""
    im = Image.new("RGB", size)
    cx, cy = centre
    ImageDraw.Draw(im).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    im.save(path)
    return path


def bright_box(image: np.ndarray, level: int = F.BORDER_LEVEL) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the pixels brighter than the border."""
    mask = image.max(axis=2) > level
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def test_retina_offset_on_a_4_3_canvas_comes_out_round_and_centred(tmp_path):
    path = fundus_photo(tmp_path / "eye.png")
    image = load_fundus(path, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    left, top, width, height = bright_box(image)
    assert abs(width - height) <= 2 and width >= 60  # round, and filling the square
    assert abs(left + width / 2 - 32) <= 1.5 and abs(top + height / 2 - 32) <= 1.5  # centred
    squashed = load_fundus(path, 64, crop="squash")
    _, _, width, height = bright_box(squashed)
    assert height - width >= 8  # what the old resize did: 4:3 squeezed into a square, an upright ellipse


def test_retina_cut_off_top_and_bottom_is_padded_not_stretched(tmp_path):
    """The usual DDR / EyePACS framing: the disc is wider than the frame is high."""
    path = fundus_photo(tmp_path / "eye.png", size=(400, 300), centre=(200, 150), radius=170)
    image = load_fundus(path, 68)
    left, top, width, height = bright_box(image)
    assert width >= 66 and abs(height - 68 * 300 / 340) <= 2  # black bars above and below, not a stretch
    assert abs(top + height / 2 - 34) <= 1.5


def test_photograph_without_a_border_is_kept_whole(tmp_path):
    path = tmp_path / "flat.png"
    Image.new("RGB", (30, 20), (90, 90, 90)).save(path)
    image = load_fundus(path, 30)
    assert (image[5:25] > 80).all() and (image[:4] == 0).all() and (image[26:] == 0).all()  # padded, centred


def test_graham_filter_maps_the_local_average_to_grey_and_blanks_the_rim(tmp_path):
    path = fundus_photo(tmp_path / "eye.png", size=(300, 300), centre=(150, 150), radius=140)
    image = load_fundus(path, 96, filter="graham")
    assert image.shape == (96, 96, 3)
    assert (image[0, 0] == 128).all() and (image[48, 1] == 128).all()  # outside 0.9 of the radius
    assert np.abs(image[40:56, 40:56].astype(int) - 128).max() <= 3  # a flat retina -> its local average


def test_graham_filter_keeps_detail(tmp_path):
    im = Image.new("RGB", (200, 200))
    draw = ImageDraw.Draw(im)
    draw.ellipse((0, 0, 199, 199), fill=(150, 70, 30))
    draw.line((60, 100, 140, 100), fill=(90, 30, 10), width=3)  # a dark vessel
    im.save(tmp_path / "vessel.png")
    image = load_fundus(tmp_path / "vessel.png", 100, filter="graham")
    assert image[50, 50, 0] < 128 - 40 and image[35, 50, 0] >= 120  # the vessel darker than its grey surround


def same_image_in_mode(tmp_path: Path, mode: str, suffix: str = ".png") -> tuple[Path, np.ndarray]:
    """A 24x24 picture saved in `mode`, and the RGB it should load as."""
    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[4:20, 4:20] = (160, 120, 80)
    im = Image.fromarray(rgb)
    if mode == "L":
        im, rgb = im.convert("L"), np.repeat(np.asarray(im.convert("L"))[..., None], 3, axis=2)
    elif mode == "RGBA":
        alpha = np.full((24, 24), 255, np.uint8)
        alpha[:, :12] = 0  # transparent half: black, whatever colour it holds
        im = Image.fromarray(np.dstack([np.full_like(rgb, 255), alpha]), "RGBA")
        rgb = np.zeros_like(rgb)
        rgb[:, 12:] = 255
    elif mode == "P":
        im = im.convert("P")
        rgb = np.asarray(im.convert("RGB"))  # the palette's nearest colour
    elif mode == "CMYK":
        im = im.convert("CMYK")
    path = tmp_path / f"{mode}{suffix}"
    im.save(path, quality=100) if suffix == ".jpg" else im.save(path)
    return path, rgb


@pytest.mark.parametrize("mode,suffix", [("L", ".png"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"),
                                         ("RGB", ".jpg")])
def test_every_file_mode_loads_as_rgb(mode, suffix, tmp_path):
    path, expected = same_image_in_mode(tmp_path, mode, suffix)
    image = load_fundus(path, 24, crop="squash")
    tolerance = 24 if suffix == ".jpg" else 1  # JPEG: chroma subsampling blurs the square's edges
    assert image.shape == (24, 24, 3) and np.abs(image.astype(int) - expected).max() <= tolerance


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_fundus(tmp_path / "deep.png", 16, crop="squash")
    np.testing.assert_allclose(image[..., 0], values / 257, atol=1)
    assert (image[..., 0] == image[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((20, 30, 3), np.uint8)
    upright[:, :10] = 255  # bright left third
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: "rotate 90 degrees clockwise to display"
    Image.fromarray(np.rot90(upright, k=1).copy()).save(tmp_path / "rotated.png", exif=exif)
    image = load_fundus(tmp_path / "rotated.png", 30, crop="squash")
    expected = np.asarray(Image.fromarray(upright).resize((30, 30), Image.Resampling.BICUBIC))
    assert np.abs(image.astype(int) - expected).max() <= 2


def test_file_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "MAX_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"20x20 pixels is over the 100 allowed \(a decompression bomb"):
        load_fundus(tmp_path / "big.png", 8)


def test_registries_match_their_names():
    assert tuple(F.LOAD_CROPS) == names.LOAD_CROPS and tuple(F.LOAD_FILTERS) == names.LOAD_FILTERS
