from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.images import UnreadableImageError, check_image_header, load_image
from conftest import write_bad_files, write_odd_good_files


def test_every_mode_and_format_becomes_rgb_uint8(tmp_path):
    names = write_odd_good_files(tmp_path)
    assert len(names) == 9
    for name in names:
        array = load_image(tmp_path / name, size=16)
        assert array.shape == (16, 16, 3), name
        assert array.dtype == np.uint8, name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "ramp16.png")
    array = load_image(tmp_path / "ramp16.png")
    assert array.min() == 0 and array.max() == 255
    assert 100 < array.mean() < 155  # a ramp, not a white image


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)
    # doctor's reader gives the size as displayed, and the thumbnail turned: the left half dark, the right light.
    from cnnkit.data.images import inspect_image

    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels).save(tmp_path / "halves.png")
    for name, orientation in (("turned.png", 6), ("plain.png", 1)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / name, exif=exif)
    plain, turned = inspect_image(tmp_path / "plain.png", 16), inspect_image(tmp_path / "turned.png", 16)
    assert (plain.width, plain.height, turned.width, turned.height) == (40, 20, 20, 40)
    np.testing.assert_array_equal(plain.thumbnail, inspect_image(tmp_path / "halves.png", 16).thumbnail)
    assert turned.thumbnail[:8].mean() < 10 and turned.thumbnail[8:].mean() > 245  # light half now at the bottom


def test_first_frame_of_animated_gif(tmp_path):
    frames = [Image.new("P", (8, 8), 1), Image.new("P", (8, 8), 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    array = load_image(tmp_path / "anim.gif")
    assert tuple(array[0, 0]) == (255, 0, 0)


def test_centre_crop_keeps_the_middle(tmp_path):
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, 10:20] = 200  # the middle third is bright
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", size=10)
    assert out.mean() > 190


@pytest.mark.parametrize("kind", ["truncated.jpg", "empty.png", "notes.txt", "fake.png"])
def test_bad_files_raise_a_named_error(tmp_path, kind):
    write_bad_files(tmp_path)
    with pytest.raises(UnreadableImageError) as info:
        load_image(tmp_path / kind, size=16)
    assert str(tmp_path / kind) in str(info.value)


def test_header_check_passes_truncated_but_catches_the_rest(tmp_path):
    write_bad_files(tmp_path)
    assert check_image_header(tmp_path / "truncated.jpg") is None
    assert check_image_header(tmp_path / "empty.png") == "empty file"
    assert check_image_header(tmp_path / "notes.txt") is not None
    with pytest.raises(UnreadableImageError, match="no such file"):
        load_image(Path(tmp_path / "missing.png"))


def test_pillows_warnings_stay_quiet_when_many_threads_decode(tmp_path):
    """A JPEG with corrupt EXIF decodes, and Pillow's "Corrupt EXIF data" warning never reaches the user, even
    with eight threads decoding at once (as ``cnnkit.data.pipeline`` does): ``warnings.catch_warnings`` around
    each decode swapped the process's filter list under the other threads and let it through now and then."""
    import io
    import subprocess
    import sys

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    (tmp_path / "bad_exif.jpg").write_bytes(jpeg[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\x00\x00\x00\xff" + jpeg[2:])
    script = (
        "import sys, warnings\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from cnnkit.data.images import inspect_image, load_image\n"
        f"path = {str(tmp_path / 'bad_exif.jpg')!r}\n"
        "def work(_):\n"
        "    for _ in range(100):\n"
        "        assert load_image(path, 16).shape == (16, 16, 3) and inspect_image(path).width == 8\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    list(pool.map(work, range(16)))\n"
        "warnings.warn_explicit('Corrupt EXIF data.', UserWarning, 'TiffImagePlugin.py', 1, module='PIL.TiffImagePlugin')\n"
        "warnings.warn('a warning of the caller is still shown', UserWarning)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "EXIF" not in result.stderr and "a warning of the caller is still shown" in result.stderr, result.stderr
