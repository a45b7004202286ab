"""Decoding and the image geometry every backend shares: input size, EXIF orientation, training
crops, eval geometry.

    hw = image_hw(cfg.data.image_size)                 # 224 -> (224, 224); [336, 448] -> (336, 448)
    img = decode_rgb(path)                             # uint8 (3, H, W), EXIF applied, UserError naming the file
    h, w = oriented_size(path)                         # the same (H, W), from the header alone
    x = train_transform(img, hw, 0.35, True, True, False, seed)
    x = eval_transform(img, hw, 0.875, "center_crop")  # or "full"

Training crops (``random_resized_crop_params``): torchvision's RandomResizedCrop law with the aspect
range centred on the target's: log-uniform width/height in [3/4 a, 4/3 a] for an input of aspect
a = w / h (a = 1, the square, is torchvision's [3/4, 4/3]); after 10 tries that do not fit, the largest
centred box of aspect a. The torch backend draws it here; DALI (``dali.augment_params``) and gpu_cache
(``gpu_cache.crop_plan``) draw the same law vectorized. Quarter turns (``data.rot90``) of a
non-square input would swap its height and width, so there they are half turns only (0 or 180
degrees, ``quarter_turns``), in every backend.

Eval geometry (``data.eval_geometry``), the same in torch, gpu_cache and DALI:

- ``center_crop``: resize so that the image covers (h, w) / eval_crop_pct, keeping its aspect, then
  take the centre (h, w). For a square size that is torchvision's ``resize(size / crop_pct)`` of the
  shorter side and ``center_crop(size)``: a 4:3 photo loses about 17 % of its width on each side
  at crop_pct 0.875 (12.5 % to the square, the rest to crop_pct; ``eval_resized_shape``).
- ``full``: resize the whole frame to (h, w); nothing is cut. A 4:3 photo into a 4:3 size keeps its
  aspect; into a square it is squeezed by 3/4 in width (inside the [3/4, 4/3] aspect range training
  crops are drawn from, so the model has seen such shapes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from ..errors import UserError

# torchvision 0.29 deprecates its image decoders (decode_image here, decode_jpeg in gpu_cache) in
# favour of TorchCodec, with a DeprecationWarning at every call (each worker's every image). They still
# work, in torchvision 0.26 too: one filter, set once in the module every decoding module imports,
# so that no run repeats it (-W default or PYTHONWARNINGS included; pytest re-enables
# DeprecationWarnings per test, hence the same entry in pyproject.toml). gpu_cache decodes with DALI
# where it imports (data.gpu_cache.decoder).
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

EVAL_GEOMETRIES = ("center_crop", "full")
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the orientation: 1 = stored upright, 2-8 = flipped/rotated
# Orientations 5-8 store the image transposed (a quarter turn, possibly flipped): upright, its
# height and width swap.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of the model input from ``data.image_size`` (one side, or [height, width])."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def log_ratio_range(hw: tuple[int, int]) -> tuple[float, float]:
    """log of the training crops' width/height range: [3/4, 4/3] times the input's aspect."""
    a = hw[1] / hw[0]
    return math.log(3 / 4 * a), math.log(4 / 3 * a)


def fallback_box(h: int, w: int, hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the largest box of the input's aspect in an h x w image (centred when no
    random crop fits); the centre square for a square input."""
    th, tw = hw
    if w * th > h * tw:  # the image is wider than the input
        return h, min(w, int(round(h * tw / th)))
    return min(h, int(round(w * th / tw))), w


def quarter_turns(u: np.ndarray | float, hw: tuple[int, int]):
    """Rotation count (x 90 degrees, counter-clockwise) from uniforms in [0, 1): 0..3 for a square
    input, 0 or 2 for a non-square one (a quarter turn would swap its height and width)."""
    if hw[0] == hw[1]:
        return np.floor(np.asarray(u) * 4).astype(np.int64)
    return 2 * np.floor(np.asarray(u) * 2).astype(np.int64)


def eval_cover_size(hw: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """(height, width) the centre-crop geometry's resized image must cover: the input / crop_pct."""
    return int(round(hw[0] / crop_pct)), int(round(hw[1] / crop_pct))


def eval_resized_shape(h: int, w: int, hw: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """(height, width) an h x w image is resized to before the centre crop: the smallest scaling of
    it that covers ``eval_cover_size``, the other side truncated as torchvision truncates the
    longer side of ``resize(shorter)`` (for a square input it is exactly that)."""
    rh, rw = eval_cover_size(hw, crop_pct)
    if rh * w >= rw * h:  # the height binds
        return rh, int(rh * w / h)
    return int(rw * h / w), rw


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation of an open Pillow image (1, upright as stored, when it has none). The
    decoders (torchvision's ``decode_rgb``, DALI) apply it; nvJPEG does not. Raises what Pillow
    raises on a broken EXIF block."""
    return im.getexif().get(EXIF_ORIENTATION, 1)


def oriented_size(path: Path) -> tuple[int, int]:
    """(height, width) after EXIF orientation, as ``decode_rgb`` returns it, from the file header
    alone; a UserError naming the file when the header cannot be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if exif_orientation(im) in TRANSPOSED_ORIENTATIONS:
                w, h = h, w
    except FileNotFoundError:
        raise UserError(f"{path}: image file is missing (run `invasive-dist check-data`)") from None
    except Exception as e:
        raise UserError(
            f"{path}: cannot read the image header ({e}); run `invasive-dist check-data` "
            "or set data.on_bad_file=skip"
        ) from None
    return h, w


def decode_rgb(path: Path) -> torch.Tensor:
    """Read and decode an image file to uint8 (3, H, W), EXIF orientation applied.

    Any failure becomes a UserError that names the file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: image file is missing (run `invasive-dist check-data`)") from None
    if not raw:
        raise UserError(f"{path}: image file is empty (run `invasive-dist check-data`)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as e:
        raise UserError(
            f"{path}: cannot decode image ({str(e).splitlines()[0]}); "
            "run `invasive-dist check-data` or set data.on_bad_file=skip"
        ) from None


def random_resized_crop_params(
    h: int,
    w: int,
    scale_min: float,
    rng: np.random.Generator,
    hw: tuple[int, int] = (1, 1),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws them (area in
    [scale_min, 1], log-uniform aspect in ``log_ratio_range(hw)``, 10 tries, then the largest
    centred box of the input's aspect); ``hw`` the input size (only its aspect matters)."""
    area = h * w
    log_ratio = log_ratio_range(hw)
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ch, cw = fallback_box(h, w, hw)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(
    img: torch.Tensor,
    size: int | Sequence[int],
    scale_min: float,
    hflip: bool,
    vflip: bool,
    rot90: bool,
    seed: int,
) -> torch.Tensor:
    """A random-resized crop of ``img`` to ``size`` ((h, w) or one side), flips and turns, drawn
    from ``seed``."""
    hw = image_hw(size)
    rng = np.random.default_rng(seed)
    top, left, ch, cw = random_resized_crop_params(img.shape[1], img.shape[2], scale_min, rng, hw)
    out = TF.resized_crop(img, top, left, ch, cw, list(hw), antialias=True)
    if hflip and rng.random() < 0.5:
        out = out.flip(-1)
    if vflip and rng.random() < 0.5:
        out = out.flip(-2)
    if rot90:
        k = int(rng.integers(0, 4)) if hw[0] == hw[1] else 2 * int(rng.integers(0, 2))
        if k:
            out = torch.rot90(out, k, dims=(-2, -1))
    return out.contiguous()


def eval_transform(
    img: torch.Tensor, size: int | Sequence[int], crop_pct: float, geometry: str = "center_crop"
) -> torch.Tensor:
    """The evaluation/prediction view of ``img`` at ``size`` (see the module docstring)."""
    hw = image_hw(size)
    if geometry == "full":
        return TF.resize(img, list(hw), antialias=True).contiguous()
    if geometry != "center_crop":
        raise UserError(f"data.eval_geometry={geometry!r} is not one of {', '.join(EVAL_GEOMETRIES)}")
    out = TF.resize(img, list(eval_resized_shape(img.shape[-2], img.shape[-1], hw, crop_pct)), antialias=True)
    return TF.center_crop(out, list(hw)).contiguous()
