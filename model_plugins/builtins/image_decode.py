"""``image_decode``: encoded images (JPEG, PNG, anything Pillow reads) -> float32 CHW pixels."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_plugins.errors import InvalidRequest
from model_plugins.plugin import Batch, LoadContext, ModelPlugin
from model_plugins.specs import TensorSpec

#: output size [H, W] when ``params.size`` is not given
DEFAULT_SIZE = (224, 224)
#: the ImageNet channel means (RGB), the default ``params.mean``
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: the ImageNet channel standard deviations (RGB), the default ``params.std``
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the default ``params.max_pixels``: larger images are refused before they are decoded
DEFAULT_MAX_PIXELS = 50_000_000

_KNOWN_PARAMS = ("size", "mean", "std", "normalize", "max_pixels", "exif_transpose")


@dataclass(frozen=True)
class DecodeParams:
    """The validated ``params:`` of an ``image_decode`` node."""

    size: tuple[int, int] = DEFAULT_SIZE
    """Output [H, W]; the image is resized to it (bilinear), ignoring its aspect ratio."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Subtracted from each RGB channel after scaling to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Each RGB channel is divided by it after subtracting ``mean``."""
    normalize: bool = True
    """False: leave the pixels in [0, 1]."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels (width x height, read from the header) are refused."""
    exif_transpose: bool = True
    """Turn the image upright as its EXIF orientation says (phone photos)."""

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> DecodeParams:
        """Validate a node's ``params:``.

        >>> DecodeParams.parse({"size": [32, 48]}).size
        (32, 48)
        >>> DecodeParams.parse({"size": [0, 1]})
        Traceback (most recent call last):
        ...
        ValueError: size must be [H, W] of positive ints (got [0, 1])

        Raises:
            ValueError: an unknown key or a bad value, named with the value that was given.
        """
        unknown = sorted(set(params) - set(_KNOWN_PARAMS))
        if unknown:
            msg = f"unknown params: {', '.join(unknown)} (known: {', '.join(_KNOWN_PARAMS)})"
            raise ValueError(msg)
        size = params.get("size", list(DEFAULT_SIZE))
        if not (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(_is_int(d) and d > 0 for d in size)
        ):
            msg = f"size must be [H, W] of positive ints (got {size!r})"
            raise ValueError(msg)
        mean = _three_numbers("mean", params.get("mean", IMAGENET_MEAN), positive=False)
        std = _three_numbers("std", params.get("std", IMAGENET_STD), positive=True)
        normalize = params.get("normalize", True)
        exif_transpose = params.get("exif_transpose", True)
        for name, flag in (("normalize", normalize), ("exif_transpose", exif_transpose)):
            if not isinstance(flag, bool):
                msg = f"{name} must be true or false (got {flag!r})"
                raise ValueError(msg)
        max_pixels = params.get("max_pixels", DEFAULT_MAX_PIXELS)
        if not (_is_int(max_pixels) and max_pixels > 0):
            msg = f"max_pixels must be a positive int (got {max_pixels!r})"
            raise ValueError(msg)
        return cls((int(size[0]), int(size[1])), mean, std, normalize, max_pixels, exif_transpose)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _three_numbers(name: str, value: object, *, positive: bool) -> tuple[float, float, float]:
    what = "positive numbers" if positive else "numbers"
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(v) and (v > 0 or not positive) for v in value)
    ):
        msg = f"{name} must be 3 {what}, one per RGB channel (got {value!r})"
        raise ValueError(msg)
    return (float(value[0]), float(value[1]), float(value[2]))


class ImageDecode(ModelPlugin):
    """Decodes one encoded image per item into normalised float32 pixels, channels first.

    Input ``data`` (bytes, one encoded image per item); output ``pixels``, float32[3, H, W]:
    the image is decoded with Pillow, turned upright (EXIF), converted to RGB, resized to
    ``params.size`` with bilinear filtering, scaled to [0, 1] and normalised per channel with
    ``params.mean`` and ``params.std`` (ImageNet's by default; ``normalize: false`` skips it).

    Params (all optional): ``size: [H, W]`` (default [224, 224]), ``mean``, ``std``,
    ``normalize``, ``max_pixels`` (default 50 million; bigger images are refused from their
    header, before decoding), ``exif_transpose`` (default true).  Pillow's own bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of ``max_pixels``.

    An item that does not decode raises :class:`~model_plugins.errors.InvalidRequest` naming
    its index and Pillow's reason, with ``field`` ``inputs.data[i]``.
    """

    inputs: ClassVar[Mapping[str, TensorSpec]] = {"data": TensorSpec("bytes", [])}
    outputs: ClassVar[Mapping[str, TensorSpec]] = {
        "pixels": TensorSpec("float32", [3, *DEFAULT_SIZE])
    }
    #: not inline: decoding is CPU-heavy; it runs in the thread pool (Pillow releases the GIL)
    inline: ClassVar[bool] = False

    settings: DecodeParams

    @classmethod
    def signature(
        cls,
        params: Mapping[str, Any],
        upstream: Mapping[str, TensorSpec | None],
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """``data`` bytes[] in, ``pixels`` float32[3, H, W] out, with [H, W] from ``params.size``.

        >>> ImageDecode.signature({"size": [32, 48]}, {})[1]["pixels"].describe()
        'float32[3, 32, 48]'

        Raises:
            ValueError: the params are invalid.
        """
        height, width = DecodeParams.parse(params).size
        return dict(cls.inputs), {"pixels": TensorSpec("float32", [3, height, width])}

    def load(self, context: LoadContext) -> None:
        """Validate the node's params; there is no model to load.

        Raises:
            ValueError: the params are invalid (``size must be [H, W] of positive ints ...``).
        """
        self.settings = DecodeParams.parse(context.params)
        std = np.asarray(self.settings.std, dtype=np.float32)
        # (x / 255 - mean) / std, folded into one multiply-add per pixel
        self._scale = 1.0 / (255.0 * std)
        self._offset = np.asarray(self.settings.mean, dtype=np.float32) / std

    def predict(self, batch: Batch) -> Batch:
        """Decode every item of ``batch["data"]`` into ``pixels``, float32[N, 3, H, W].

        Raises:
            InvalidRequest: an item is not a decodable image or has too many pixels.
        """
        data = batch["data"]
        height, width = self.settings.size
        pixels = np.empty((len(data), 3, height, width), dtype=np.float32)
        for index, item in enumerate(data):
            rgb = np.asarray(self._decode(index, item), dtype=np.float32)  # H, W, 3
            if self.settings.normalize:
                rgb = rgb * self._scale - self._offset
            else:
                rgb *= 1.0 / 255.0
            pixels[index] = rgb.transpose(2, 0, 1)
        return {"pixels": pixels}

    def _decode(self, index: int, item: object) -> Image.Image:
        """One item -> an RGB image of the output size."""
        height, width = self.settings.size
        cap = self.settings.max_pixels
        field = f"inputs.data[{index}]"
        buffer = io.BytesIO(item)  # type: ignore[arg-type]  # checked as bytes by the contract
        try:
            with Image.open(buffer) as image:
                # Image.open reads only the header: refuse a bomb before its pixels are decoded.
                pixel_count = image.width * image.height
                if pixel_count > cap:
                    msg = (
                        f"item {index} of 'data': image of {image.width}x{image.height} = "
                        f"{pixel_count} pixels is over max_pixels ({cap})"
                    )
                    raise InvalidRequest(msg, field=field)
                upright = ImageOps.exif_transpose(image) if self.settings.exif_transpose else image
                return upright.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        except InvalidRequest:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Pillow's own limit (the warning is raised where warnings are errors, as in tests).
            msg = f"item {index} of 'data': image is too large to decode: {exc}"
            raise InvalidRequest(msg, field=field) from exc
        except Exception as exc:
            # The bytes come from the client, and each Pillow codec fails its own way
            # (OSError, SyntaxError, ValueError, struct.error, EOFError...): all are a bad item.
            reason = str(exc).replace(repr(buffer), "").strip() or type(exc).__name__
            if isinstance(exc, UnidentifiedImageError):
                reason = f"{reason} (not a format Pillow knows)"
            msg = f"item {index} of 'data' is not a decodable image: {reason}"
            raise InvalidRequest(msg, field=field) from exc


__all__ = ["DEFAULT_MAX_PIXELS", "DEFAULT_SIZE", "IMAGENET_MEAN", "IMAGENET_STD", "ImageDecode"]
