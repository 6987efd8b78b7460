"""The built-in nodes: identity, image_decode, concat_fusion, weighted_mean_fusion."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.runtime.remote import RemotePlugin
from model_plugins import InvalidRequest, LoadContext, PluginHarness, PluginLoadError, TensorSpec
from model_plugins.builtins.fusion import ConcatFusion, WeightedMeanFusion
from model_plugins.builtins.identity import Identity
from model_plugins.builtins.image_decode import IMAGENET_MEAN, IMAGENET_STD, ImageDecode
from model_plugins.registry import BUILTINS, resolve

F4 = TensorSpec("float32", [4])


def test_registry_names_resolve_to_these_classes() -> None:
    classes = {name: resolve(name) for name in BUILTINS if resolve(name).framework is None}
    assert classes == {
        "identity": Identity,
        "image_decode": ImageDecode,
        "concat_fusion": ConcatFusion,
        "weighted_mean_fusion": WeightedMeanFusion,
        "remote": RemotePlugin,
    }


def test_inline_hints() -> None:
    assert Identity._inline
    assert ConcatFusion._inline
    assert WeightedMeanFusion._inline
    assert not ImageDecode._inline


# -- identity ------------------------------------------------------------------------------


def test_identity_passes_every_input_through() -> None:
    batch = {"a": np.arange(3, dtype=np.int64), "b": np.array([b"x", b"y", b"z"], dtype=object)}
    with PluginHarness(Identity) as harness:
        out = harness.predict(batch)
    assert out.keys() == batch.keys()
    assert out["a"] is batch["a"]
    assert out["b"] is batch["b"]


def test_identity_signature_mirrors_known_upstream_and_omits_unknown() -> None:
    text = TensorSpec("string", [], optional=True)
    inputs, outputs = Identity.signature({}, {"x": F4, "t": text, "u": None})
    assert inputs == outputs == {"x": F4, "t": text}


# -- image_decode --------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    """A PNG of one colour; size is (W, H) as Pillow has it."""
    return encode(Image.new(mode, size, color), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims a size: enough for Image.open, (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def decode(items: list[bytes], **params: object) -> np.ndarray:
    with PluginHarness(ImageDecode, params=params) as harness:
        return harness.predict({"data": items})["pixels"]


def test_png_and_jpeg_decode_to_chw_float32() -> None:
    photo = Image.new("RGB", (64, 48), (250, 10, 10))
    items = [encode(photo, "PNG"), encode(photo, "JPEG", quality=95)]
    pixels = decode(items, size=[16, 32], normalize=False)
    assert pixels.shape == (2, 3, 16, 32)
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0.0
    assert pixels.max() <= 1.0
    np.testing.assert_allclose(pixels[0, :, 0, 0], np.array([250, 10, 10]) / 255, atol=1e-6)
    np.testing.assert_allclose(pixels[1, :, 0, 0], np.array([250, 10, 10]) / 255, atol=0.04)


def test_default_size_and_signature_follow_params() -> None:
    assert decode([solid((1, 2, 3))]).shape == (1, 3, 224, 224)
    _, outputs = ImageDecode.signature({"size": [32, 48]}, {"data": TensorSpec("bytes", [])})
    assert outputs == {"pixels": TensorSpec("float32", [3, 32, 48])}


def test_normalisation_matches_a_hand_computation() -> None:
    color = (200, 100, 50)
    pixels = decode([solid(color, size=(6, 4))], size=[4, 6])
    expected = [
        (c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)
    ]
    for channel in range(3):
        np.testing.assert_allclose(pixels[0, channel], expected[channel], rtol=1e-5)


def test_custom_mean_and_std() -> None:
    pixels = decode([solid((255, 0, 51))], size=[4, 6], mean=[0.5, 0.5, 0.5], std=[0.5, 1, 2])
    np.testing.assert_allclose(pixels[0, :, 0, 0], [1.0, -0.5, (0.2 - 0.5) / 2], rtol=1e-5)


def test_channels_first_keeps_positions() -> None:
    image = Image.new("RGB", (3, 2), (0, 0, 0))
    image.putpixel((2, 1), (255, 0, 0))  # x=2, y=1
    pixels = decode([encode(image, "PNG")], size=[2, 3], normalize=False)
    assert pixels[0, 0, 1, 2] == 1.0
    assert pixels[0].sum() == 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode: str) -> None:
    image = Image.new("RGB", (4, 4), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode([encode(image, fmt)], size=[4, 4]).shape == (1, 3, 4, 4)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    for x in range(4):
        image.putpixel((x, 0), (255, 255, 255))  # a white top row
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    data = encode(image, "PNG", exif=exif)
    upright = decode([data], size=[4, 4], normalize=False)
    raw = decode([data], size=[4, 4], normalize=False, exif_transpose=False)
    assert raw[0, :, 0].min() == 1.0
    assert upright[0, :, 3].min() == 1.0
    assert upright[0, :, 0].max() == 0.0


def test_a_corrupt_item_is_named() -> None:
    good = solid((1, 2, 3))
    with pytest.raises(InvalidRequest, match=r"item 1 of 'data' is not a decodable image: ") as e:
        decode([good, b"not an image at all", good])
    assert e.value.field == "inputs.data[1]"
    assert "cannot identify image file" in str(e.value)
    assert "BytesIO" not in str(e.value)


def test_a_truncated_item_gives_pillows_reason() -> None:
    good = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG", compress_level=0)
    with pytest.raises(InvalidRequest, match=r"item 2 of 'data' is not a decodable image: \w+"):
        decode([good, good, good[: len(good) // 2]])


def test_bomb_guard_refuses_from_the_header() -> None:
    # 8000 x 8000 = 64 M pixels: over our 50 M default, under Pillow's own limit (~89 M)
    with pytest.raises(InvalidRequest, match=r"item 0 of 'data': image of 8000x8000 = 64000000"):
        decode([png_header(8000, 8000)])
    with pytest.raises(InvalidRequest, match=r"over max_pixels \(100\)") as caught:
        decode([solid((0, 0, 0), size=(10, 10)), solid((0, 0, 0), size=(11, 10))], max_pixels=100)
    assert caught.value.field == "inputs.data[1]"


def test_pillows_own_bomb_limit_is_reported_too() -> None:
    # 12000 x 12000 is over Pillow's MAX_IMAGE_PIXELS: it warns (an error under pytest) first
    with pytest.raises(InvalidRequest, match=r"item 0 of 'data': image is too large to decode"):
        decode([png_header(12000, 12000)], max_pixels=10**9)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"size": [224]}, "params.size must be [H, W] of positive integers (got [224])"),
        ({"size": [0, 224]}, "params.size must be [H, W] of positive integers (got [0, 224])"),
        ({"size": [2.5, 3]}, "params.size must be [H, W] of positive integers (got [2.5, 3])"),
        ({"size": "224"}, "params.size must be [H, W] of positive integers (got '224')"),
        ({"size": [True, 3]}, "params.size must be [H, W] of positive integers (got [True, 3])"),
        ({"mean": [0.5, 0.5]}, "params.mean must be 3 numbers (got [0.5, 0.5])"),
        ({"std": [1, 0, 1]}, "params.std must be 3 positive numbers (got [1, 0, 1])"),
        ({"normalize": "yes"}, "params.normalize must be true or false (got 'yes')"),
        ({"max_pixels": 0}, "params.max_pixels must be a positive integer (got 0)"),
        ({"sise": [1, 1]}, "unknown params: sise (known: size, mean, std, normalize"),
    ],
)
def test_params_are_validated_at_load(params: dict[str, object], message: str) -> None:
    plugin = ImageDecode()
    # at load, the error names the node; at validation, the validator adds where
    where = "node 'decode' (plugin 'image_decode'): "
    with pytest.raises(PluginLoadError, match="^" + re.escape(where + message)):
        plugin.load(LoadContext(node="decode", plugin="image_decode", params=params))
    with pytest.raises(PluginLoadError, match="^" + re.escape(message)):
        ImageDecode.signature(params, {})


# -- concat_fusion -------------------------------------------------------------------------


def fuse(
    plugin: type[ConcatFusion | WeightedMeanFusion], batch: dict[str, np.ndarray], **params: object
) -> np.ndarray:
    fusion = plugin()
    fusion.load(LoadContext(node="fuse", plugin="fusion", params=params))
    return fusion.predict(batch)["embedding"]


def rows(*values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_concat_keeps_the_order_of_the_inputs() -> None:
    batch = {"text": rows([1, 2], [3, 4]), "image": rows([5], [6])}
    with PluginHarness(ConcatFusion) as harness:
        out = harness.predict(batch)["embedding"]
    np.testing.assert_array_equal(out, [[1, 2, 5], [3, 4, 6]])


def test_concat_without_dims_uses_what_is_present() -> None:
    np.testing.assert_array_equal(fuse(ConcatFusion, {"image": rows([5, 6])}), [[5, 6]])


def test_concat_with_dims_zero_fills_absent_inputs() -> None:
    dims = {"image": 2, "text": 3}
    out = fuse(ConcatFusion, {"text": rows([1, 2, 3])}, dims=dims)
    np.testing.assert_array_equal(out, [[0, 0, 1, 2, 3]])
    out = fuse(ConcatFusion, {"image": rows([7, 8])}, dims=dims)
    np.testing.assert_array_equal(out, [[7, 8, 0, 0, 0]])


def test_concat_with_dims_through_the_harness() -> None:
    upstream = {"image": TensorSpec("float32", [2]), "text": TensorSpec("float32", [3])}
    params = {"dims": {"image": 2, "text": 3}}
    with PluginHarness(ConcatFusion, params=params, upstream=upstream, join="available") as h:
        out = h.predict({"text": rows([1, 2, 3], [4, 5, 6])})["embedding"]
    assert out.shape == (2, 5)


def test_concat_normalize_l2s_each_part() -> None:
    out = fuse(ConcatFusion, {"a": rows([3, 4]), "b": rows([0, 2])}, normalize=True)
    np.testing.assert_allclose(out, [[0.6, 0.8, 0, 1]])


def test_concat_width_mismatch_with_dims() -> None:
    with pytest.raises(ValueError, match="input 'text' has width 2 but dims says 3"):
        fuse(ConcatFusion, {"text": rows([1, 2])}, dims={"text": 3})
    with pytest.raises(ValueError, match=r"dims gives no width for input\(s\) other"):
        fuse(ConcatFusion, {"other": rows([1])}, dims={"text": 3})


def test_concat_signature() -> None:
    _, outputs = ConcatFusion.signature({}, {"a": F4, "b": TensorSpec("float32", [2])})
    assert outputs["embedding"].shape == (6,)
    _, outputs = ConcatFusion.signature({}, {"a": F4, "b": None})
    assert outputs["embedding"].shape == (-1,)
    inputs, outputs = ConcatFusion.signature({"dims": {"a": 4, "b": 8}}, {"a": F4, "b": None})
    assert outputs["embedding"].shape == (12,)
    assert inputs["b"] == TensorSpec("float32", [8])
    with pytest.raises(PluginLoadError, match="in the order of the node's inputs"):
        ConcatFusion.signature({"dims": {"b": 8, "a": 4}}, {"a": F4, "b": None})
    with pytest.raises(PluginLoadError, match=r"^params.dims gives no width for input\(s\) b"):
        ConcatFusion.signature({"dims": {"a": 4}}, {"a": F4, "b": None})
    with pytest.raises(PluginLoadError, match=r"^params.dims must be .* positive integer"):
        ConcatFusion.signature({"dims": {"a": 0}}, {"a": F4})


# -- weighted_mean_fusion ------------------------------------------------------------------


def test_weighted_mean_renormalises_over_present_inputs() -> None:
    weights = {"image": 3.0, "text": 1.0}
    both = fuse(WeightedMeanFusion, {"image": rows([4, 0]), "text": rows([0, 4])},
                weights=weights, normalize=False)  # fmt: skip
    np.testing.assert_allclose(both, [[3, 1]])
    only_text = fuse(WeightedMeanFusion, {"text": rows([0, 4])}, weights=weights, normalize=False)
    np.testing.assert_allclose(only_text, [[0, 4]])


def test_weighted_mean_defaults_equal_weights_and_l2() -> None:
    with PluginHarness(WeightedMeanFusion) as harness:
        out = harness.predict({"a": rows([2, 0]), "b": rows([0, 2])})["embedding"]
    np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_weighted_mean_errors() -> None:
    with pytest.raises(ValueError, match=r"share one width \(got a: 2, b: 3\)"):
        fuse(WeightedMeanFusion, {"a": rows([1, 2]), "b": rows([1, 2, 3])})
    with pytest.raises(ValueError, match=r"present inputs \(a\) sum to 0"):
        fuse(WeightedMeanFusion, {"a": rows([1, 2])}, weights={"a": 0})
    with pytest.raises(PluginLoadError, match=r"^node 'fuse' \(plugin 'fusion'\): params.weights"):
        fuse(WeightedMeanFusion, {"a": rows([1])}, weights={"a": -1})
    with pytest.raises(ValueError, match=r"share one width \(got a: 4, b: 2\)"):
        WeightedMeanFusion.signature({}, {"a": F4, "b": TensorSpec("float32", [2])})


def test_weighted_mean_signature() -> None:
    inputs, outputs = WeightedMeanFusion.signature({}, {"a": None, "b": F4})
    assert inputs == {"a": F4, "b": F4}
    assert outputs == {"embedding": F4}
