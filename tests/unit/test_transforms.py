"""The decode/geometry pieces every backend shares (``data.transforms``) and the one normalization
(``data.base``): a header's oriented size is the decoded image's size, a file that cannot be read
is a UserError naming it, and every normalized batch is (x / 255 - mean) / std in the asked
memory format."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from invasive_dist.data.base import IMAGENET_MEAN, IMAGENET_STD, mean_std, normalize_on_device
from invasive_dist.data.transforms import EXIF_ORIENTATION, decode_rgb, exif_orientation, oriented_size
from invasive_dist.errors import UserError


def write_jpeg(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    """A JPEG of ``size`` (width, height) as stored, with an EXIF orientation when given."""
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(buf, "JPEG", exif=exif.tobytes())
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_oriented_size_is_the_decoded_size(tmp_path, orientation):
    """Orientations 5-8 store the photo transposed: its upright height is the stored width."""
    path = write_jpeg(tmp_path / "a.jpg", (40, 30), orientation)
    with Image.open(path) as im:
        assert exif_orientation(im) == (orientation or 1)
    want = (40, 30) if orientation in (5, 6, 7, 8) else (30, 40)
    assert oriented_size(path) == want == tuple(decode_rgb(path).shape[1:])


@pytest.mark.parametrize("content", [None, b"", b"not an image at all"])
def test_oriented_size_names_a_file_it_cannot_read(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=str(path)) as err:
        oriented_size(path)
    assert "check-data" in str(err.value)


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_on_device_is_the_imagenet_normalization(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 7), generator=g, dtype=torch.uint8)
    out = normalize_on_device(x, torch.device("cpu"), channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, (x.float() / 255.0 - mean) / std)  # bit for bit, in either layout
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_mean_std_is_made_once_per_device():
    """The same tensors every batch: no host-to-device copy per step."""
    a = mean_std(torch.device("cpu"))
    b = mean_std("cpu")
    assert a[0] is b[0] and a[1] is b[1]
    assert torch.equal(a[1].view(3), torch.tensor(IMAGENET_STD))
