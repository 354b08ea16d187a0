"""The preprocessing contract, and the only code that implements it.

Every stage (training, training-time validation, export parity, INT8 calibration, serving,
``serve.validate``) builds its input tensors through this module, from a :class:`Preprocessing`
that travels inside each artifact's manifest. Nothing else in the project resizes, crops or
normalises an image, so drift between training and serving cannot happen by construction.

Contract (NVIDIA's ResNet50 v1.5 recipe, scaled with the image size):

* decode to RGB (grayscale is replicated, CMYK converted), EXIF orientation applied; samples
  wider than 8 bits are scaled to 0-255 as DALI's decoder does: 16-bit v to round(v * 255 / 65535),
  float f to round(f * 255) clamped (see :func:`_to_8bit` for what PIL can and cannot match);
* train: random resized crop to ``image_size`` (area 8%-100%, aspect 3/4-4/3), horizontal
  flip with p=0.5;
* val/serve: resize the shorter side to ``resize_size`` (about image_size * 256 / 224, with an
  even margin: 224 -> 256, 64 -> 74, 32 -> 36), centre crop ``image_size``;
* both: bilinear antialiased interpolation, ``(x - mean) / std`` with ImageNet's statistics on
  the 0-255 scale, float32 NCHW (channels_last is a memory format chosen by the trainer, not part
  of the contract: ONNX inputs are always NCHW).

Two implementations: DALI (``dali_*``; CPU or GPU) is what the pipeline runs; torchvision/PIL
(``torchvision_*``) is the reference the tests compare DALI against, and the ``pytorch`` data
backend for machines without DALI.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CONTRACT_VERSION = 1
# the smallest crop size the contract accepts; python -m train refuses smaller --image-size before any work
MIN_IMAGE_SIZE = 16


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_scale: tuple[float, float] = (0.08, 1.0)
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    interpolation: str = "bilinear-antialias"
    color: str = "RGB"
    layout: str = "NCHW"
    exif_orientation: bool = True
    version: int = field(default=CONTRACT_VERSION)

    def __post_init__(self) -> None:
        """ValueError naming the field when a value is one the implementations below cannot honour.
        A Preprocessing is mostly read back from a manifest on disk, where a bad value would
        otherwise surface only as a DALI error on every image (a mean of two entries, a std of 0)
        or, for a method this module does not implement, be silently replaced by the one it does."""
        why = _problem(self)
        if why:
            raise ValueError(why)

    @classmethod
    def for_image_size(cls, image_size: int, **kw: Any) -> Preprocessing:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image size {image_size} is too small (ResNet50 needs at least {MIN_IMAGE_SIZE} px)")
        # 256/224 of the crop, rounded so that the margin (resize - crop) is even: then the centre
        # crop starts on a whole pixel and DALI and torchvision cut exactly the same window.
        margin = 2 * int(round((image_size * 256 / 224 - image_size) / 2))
        return cls(image_size=image_size, resize_size=image_size + margin, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-normal form (tuples as lists), so a manifest compares equal after a round trip."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        if not isinstance(d, dict):
            raise TypeError(f"preprocessing must be a JSON object of the contract's fields, not {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        if d.get("version", CONTRACT_VERSION) != CONTRACT_VERSION:
            raise ValueError(f"preprocessing contract version {d.get('version')} is not {CONTRACT_VERSION}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)


def _numbers(v: Any, n: int) -> bool:
    """``v`` is ``n`` finite numbers (JSON true/false are not numbers here)."""
    return (
        isinstance(v, tuple)
        and len(v) == n
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    )


def _problem(p: Preprocessing) -> str | None:
    """What is wrong with ``p``'s values, field first, or None. The string fields have one value
    each because one is all that DALI's and torchvision's code below implements."""

    def show(v: Any) -> str:
        return repr(list(v) if isinstance(v, tuple) else v)

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not whole(p.image_size) or p.image_size < MIN_IMAGE_SIZE:
        return f"image_size must be a whole number of pixels, at least {MIN_IMAGE_SIZE}, not {show(p.image_size)}"
    if not whole(p.resize_size) or p.resize_size < p.image_size:
        return (
            f"resize_size must be a whole number of pixels, at least image_size {p.image_size}, "
            f"not {show(p.resize_size)}"
        )
    if not _numbers(p.mean, 3):
        return f"mean must be 3 finite numbers (R, G, B on the 0-255 scale), not {show(p.mean)}"
    if not _numbers(p.std, 3) or min(p.std) <= 0:
        return f"std must be 3 finite numbers above 0 (R, G, B on the 0-255 scale), not {show(p.std)}"
    if not _numbers(p.train_scale, 2) or not 0 < p.train_scale[0] <= p.train_scale[1] <= 1:
        return f"train_scale must be [min, max] crop areas with 0 < min <= max <= 1, not {show(p.train_scale)}"
    if not _numbers(p.train_ratio, 2) or not 0 < p.train_ratio[0] <= p.train_ratio[1]:
        return f"train_ratio must be [min, max] aspect ratios with 0 < min <= max, not {show(p.train_ratio)}"
    if not _numbers((p.flip_prob,), 1) or not 0 <= p.flip_prob <= 1:
        return f"flip_prob must be a probability from 0 to 1, not {show(p.flip_prob)}"
    implemented = {"interpolation": "bilinear-antialias", "color": "RGB", "layout": "NCHW", "exif_orientation": True}
    for name, value in implemented.items():
        got = getattr(p, name)
        if got != value or type(got) is not type(value):
            return f"{name} must be {value!r} (the only one implemented), not {show(got)}"
    return None


# --------------------------------------------------------------------------- PIL / torchvision


def load_rgb(path: str | os.PathLike[str], data: bytes | None = None):
    """Open an image file (or its ``data``, already read) as an RGB PIL image, EXIF orientation
    applied; DataError naming ``path`` and PIL's cause on failure. Single-channel samples wider
    than 8 bits are brought to 8 bits the way DALI's decoder does (:func:`_to_8bit`)."""
    import io

    from PIL import Image, ImageOps

    from .errors import DataError

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            fmt = im.format  # exif_transpose returns a copy without it
            im = ImageOps.exif_transpose(im) if im.getexif() else im
            return _to_8bit(im, fmt).convert("RGB")
    except Exception as e:  # PIL raises many types
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _to_8bit(im, fmt: str | None):
    """``im`` as an 8-bit ``L`` image when PIL keeps it wider than 8 bits and DALI decodes it, else
    ``im`` unchanged. PIL's ``convert("RGB")`` clips such samples to 0-255 (a 16-bit 1000 becomes
    255, a float 0.5 becomes 0), while DALI's decoder (2.4, measured on the CPU) scales them to uint8:

    * 16-bit unsigned (PNG, TIFF, JPEG 2000 ``I;16*``; 16-bit PGM, ``I`` in PIL): round(v * 255 / 65535);
    * 32-bit float TIFF (``F``): round(f * 255) of the float32 product, half away from zero,
      clamped to 0-255, NaN to 0.

    Both equal DALI's decoded pixels for all 65536 16-bit values and for float products at
    k + 0.5 (``tests/serve/test_infer.py`` checks photographs in each of these formats). Images
    DALI refuses (32-bit integer or signed 16-bit TIFF; ``I`` or ``F`` from formats it does not
    read) keep PIL's clipping. 16-bit RGB, RGBA and gray + alpha images need nothing here: PIL
    opens them as 8-bit, keeping each sample's high byte (v >> 8), which is at most 1 level below
    DALI's rounding. Not matched either: a PGM/PPM whose maxval is not 255 or 65535, which PIL
    rescales to the full range and DALI does not."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (im.mode == "I" and fmt in ("PNG", "PPM")):
        v = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8))
    if im.mode == "F" and fmt == "TIFF":
        with np.errstate(over="ignore", invalid="ignore"):
            x = (np.asarray(im, dtype=np.float32) * np.float32(255)).astype(np.float64)
            x = np.floor(np.clip(np.nan_to_num(x, nan=0.0), 0, 255) + 0.5)
        return Image.fromarray(x.astype(np.uint8))
    return im


def undecodable(files: Sequence[str]) -> list[str]:
    """``path: cause`` for each of ``files`` that DALI cannot decode: the culprits of a batch that
    DALI failed on, since DALI names the operator but not the file (:func:`undecodable_causes`)."""
    return [f"{f}: {cause}" for f, cause in undecodable_causes(files)]


def undecodable_causes(files: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, cause)`` for each of ``files`` that DALI cannot decode. A file is one if the header
    check refuses it (:func:`rn50.layout.check_header`: PIL reads GIF and other formats DALI does
    not, whatever the file's suffix) or PIL cannot decode it."""
    from .errors import DataError
    from .layout import check_header, read_encoded, strip_path

    bad = []
    for f in files:
        try:
            cause = check_header(read_encoded(f).tobytes())
            if cause:
                bad.append((f, cause))
                continue
            load_rgb(f)
        except DataError as e:
            bad.append((f, strip_path(f, str(e))))
    return bad


def torchvision_train(p: Preprocessing):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(
                p.image_size,
                scale=p.train_scale,
                ratio=p.train_ratio,
                interpolation=T.InterpolationMode.BILINEAR,
                antialias=True,
            ),
            T.RandomHorizontalFlip(p.flip_prob),
            T.ToTensor(),
            T.Normalize([m / 255 for m in p.mean], [s / 255 for s in p.std]),
        ]
    )


def torchvision_val(p: Preprocessing):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(p.resize_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(p.image_size),
            T.ToTensor(),
            T.Normalize([m / 255 for m in p.mean], [s / 255 for s in p.std]),
        ]
    )


# --------------------------------------------------------------------------- DALI


def dali_decode(encoded, device: str = "cpu"):
    """Decode a batch of encoded images (DataNode) to HWC uint8 RGB. ``device``: cpu or mixed."""
    from nvidia.dali import fn, types

    return fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=True)


def dali_train(images, p: Preprocessing, dtype=None):
    """Random resized crop + flip + normalise a batch of decoded images (DataNode)."""
    from nvidia.dali import fn, types

    images = fn.random_resized_crop(
        images,
        size=(p.image_size, p.image_size),
        random_area=list(p.train_scale),
        random_aspect_ratio=list(p.train_ratio),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    return fn.crop_mirror_normalize(
        images,
        dtype=dtype or types.FLOAT,
        output_layout="CHW",
        mean=list(p.mean),
        std=list(p.std),
        mirror=fn.random.coin_flip(probability=p.flip_prob),
    )


def dali_val(images, p: Preprocessing, dtype=None):
    """Resize shorter side + centre crop + normalise a batch of decoded images (DataNode)."""
    from nvidia.dali import fn, types

    images = fn.resize(images, resize_shorter=p.resize_size, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(
        images,
        dtype=dtype or types.FLOAT,
        output_layout="CHW",
        crop=(p.image_size, p.image_size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=list(p.mean),
        std=list(p.std),
    )
