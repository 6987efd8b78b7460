"""``image_decode``: encoded images (JPEG, PNG, anything Pillow reads) -> float32 CHW pixels."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_plugins.errors import InvalidRequest
from model_plugins.params import Params
from model_plugins.plugin import Batch, LoadContext, ModelPlugin, Signature
from model_plugins.specs import TensorSpec

#: output size [H, W] when ``params.size`` is not given
DEFAULT_SIZE = (224, 224)
#: the ImageNet channel means (RGB), the default ``params.mean``
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: the ImageNet channel standard deviations (RGB), the default ``params.std``
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the default ``params.max_pixels``: larger images are refused before they are decoded
DEFAULT_MAX_PIXELS = 50_000_000

#: the ``params:`` keys of an ``image_decode`` node
KNOWN_PARAMS = ("size", "mean", "std", "normalize", "max_pixels", "exif_transpose")


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
    def read(cls, params: Params) -> DecodeParams:
        """Validate a node's ``params:``.

        >>> DecodeParams.read(Params({"size": [32, 48]}, KNOWN_PARAMS)).size
        (32, 48)
        >>> DecodeParams.read(Params({"size": [0, 1]}, KNOWN_PARAMS))
        Traceback (most recent call last):
        ...
        model_plugins.errors.PluginLoadError: params.size must be [H, W] of ... (got [0, 1])

        Raises:
            PluginLoadError: an unknown key or a bad value, named with the value that was given.
        """
        size = params.value(
            "size", DEFAULT_SIZE, ok=_height_width, must="[H, W] of positive integers"
        )
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=_three(params.numbers("mean", IMAGENET_MEAN, count=3)),
            std=_three(params.numbers("std", IMAGENET_STD, count=3, positive=True)),
            normalize=params.flag("normalize", True),
            max_pixels=params.positive_int("max_pixels", DEFAULT_MAX_PIXELS),
            exif_transpose=params.flag("exif_transpose", True),
        )


def _height_width(value: object) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )


def _three(values: tuple[float, ...]) -> tuple[float, float, float]:
    return (values[0], values[1], values[2])


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
    _inline: ClassVar[bool] = False

    settings: DecodeParams

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """``data`` bytes[] in, ``pixels`` float32[3, H, W] out, with [H, W] from ``params.size``.

        >>> ImageDecode.signature({"size": [32, 48]}, {})[1]["pixels"].describe()
        'float32[3, 32, 48]'

        Raises:
            PluginLoadError: the params are invalid.
        """
        height, width = DecodeParams.read(Params(params, KNOWN_PARAMS)).size
        return dict(cls.inputs), {"pixels": TensorSpec("float32", [3, height, width])}

    def load(self, context: LoadContext) -> None:
        """Validate the node's params; there is no model to load.

        Raises:
            PluginLoadError: the params are invalid
                (``node 'x' (plugin 'image_decode'): params.size must be [H, W] ...``).
        """
        self.settings = DecodeParams.read(Params.of(context, KNOWN_PARAMS))
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


__all__ = [
    "KNOWN_PARAMS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDecode",
]
