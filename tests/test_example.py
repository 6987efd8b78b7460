"""The post_understanding example end to end: build its models, serve it, send posts.

The models are built by the example's own script in child processes (into the example's
``models/``; skipped when a build of the same fingerprint is there), and served by a real
server whose workers run PyTorch, TensorFlow and Paddle.  This process imports none of them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engine.transport.client import Client
from tests.serving import serving

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "post_understanding"
PIPELINE = "post_understanding"
FRAMEWORKS = ("torch", "tensorflow", "paddle")

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.frameworks, pytest.mark.timeout(300)]


def _load_client_module() -> ModuleType:
    """The example's client.py (it imports numpy, Pillow and engine.transport.client only)."""
    spec = importlib.util.spec_from_file_location(
        "post_understanding_client", EXAMPLE / "client.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load_client_module()


@pytest.fixture(scope="module")
def models() -> Path:
    """Build the example's models (a no-op when they are up to date)."""
    script = EXAMPLE / "build_models.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=280, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return EXAMPLE / "models"


@pytest.fixture(scope="module")
def client(models: Path) -> Iterator[Client]:
    with serving([EXAMPLE / "pipeline.yaml"]) as server, Client("127.0.0.1", server.port) as c:
        yield c


@pytest.fixture(scope="module")
def topics(models: Path) -> list[str]:
    names: list[str] = json.loads((models / "labels.json").read_text())["topics"]
    return names


@pytest.fixture(scope="module")
def samples(example: ModuleType) -> Any:
    return example.load_posts()


def _infer(client: Client, post: Any) -> Any:
    return client.infer(PIPELINE, post.inputs(), timeout_ms=60_000)


def _check_probabilities(outputs: dict[str, np.ndarray], n_topics: int, items: int = 1) -> None:
    tags = outputs["tag_probabilities"]
    assert tags.shape == (items, n_topics)
    assert tags.dtype == np.float32
    assert np.all((tags >= 0) & (tags <= 1))
    np.testing.assert_allclose(tags.sum(axis=1), 1.0, atol=1e-5)
    spam = outputs["spam_probability"]
    assert spam.shape == (items,)
    assert np.all((spam >= 0) & (spam <= 1))


def test_image_and_text_post_gets_every_output(
    client: Client, samples: Any, topics: list[str]
) -> None:
    post = samples.by_id("beach")
    assert post.image is not None
    assert post.text is not None
    result = _infer(client, post)
    out = result.outputs
    assert set(out) == {
        "embedding",
        "image_embedding",
        "text_embedding",
        "tag_probabilities",
        "spam_probability",
    }
    assert out["embedding"].shape == (1, 512 + 384)
    assert out["image_embedding"].shape == (1, 512)
    assert out["text_embedding"].shape == (1, 384)
    assert all(a.dtype == np.float32 for a in out.values())
    np.testing.assert_allclose(np.linalg.norm(out["text_embedding"], axis=1), 1.0, atol=1e-4)
    # concat_fusion with normalize: two unit-length parts
    np.testing.assert_allclose(np.linalg.norm(out["embedding"][0, :512]), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"][0, 512:]), 1.0, atol=1e-4)
    _check_probabilities(out, len(topics))
    assert topics[int(out["tag_probabilities"][0].argmax())] == "travel"
    assert float(out["spam_probability"][0]) < 0.5
    assert set(result.node_latency_us) == {
        "decode",
        "image_embed",
        "text_embed",
        "tags",
        "spam",
        "fuse",
    }


def test_image_only_post_skips_the_text_branch_and_heads(client: Client, samples: Any) -> None:
    post = samples.by_id("beach-reshared")
    assert post.text is None
    result = _infer(client, post)
    out = result.outputs
    assert set(out) == {"embedding", "image_embedding"}
    assert out["embedding"].shape == (1, 896)
    assert not out["embedding"][0, 512:].any()  # the text slot is zero-filled
    assert set(result.node_latency_us) == {"decode", "image_embed", "fuse"}


def test_text_only_post_skips_the_image_branch(
    client: Client, samples: Any, topics: list[str]
) -> None:
    post = samples.by_id("pizza-words")
    assert post.image is None
    result = _infer(client, post)
    out = result.outputs
    assert set(out) == {"embedding", "text_embedding", "tag_probabilities", "spam_probability"}
    assert not out["embedding"][0, :512].any()  # the image slot is zero-filled
    np.testing.assert_allclose(out["embedding"][0, 512:], out["text_embedding"][0], atol=1e-6)
    _check_probabilities(out, len(topics))
    assert topics[int(out["tag_probabilities"][0].argmax())] == "food"
    assert set(result.node_latency_us) == {"text_embed", "tags", "spam", "fuse"}


def test_several_posts_in_one_request(client: Client, topics: list[str]) -> None:
    texts = ["My dog chased the ball all afternoon", "The band played an encore at midnight"]
    result = client.infer(PIPELINE, {"text": texts}, timeout_ms=60_000)
    _check_probabilities(result.outputs, len(topics), items=2)
    assert [topics[i] for i in result.outputs["tag_probabilities"].argmax(axis=1)] == [
        "pets",
        "music",
    ]


def test_answers_mean_something(client: Client, samples: Any, example: ModuleType) -> None:
    answers = {a.post.id: a for a in example.analyse(client, samples, warmup=0)}
    # paraphrases are closer in text-embedding space than unrelated texts
    assert example.paraphrase_margin(list(answers.values()), samples) > 0.2
    # the spam head flags the prize scam, and only it
    flagged = {i for i, a in answers.items() if (a.spam_probability or 0.0) > 0.5}
    assert flagged == {"prize"}
    # a re-encoded, resized copy of an image is its near-duplicate (random-weight encoder,
    # but the same picture gives nearly the same features)
    reshared = answers["beach-reshared"].image_embedding
    assert example.cosine(reshared, answers["beach"].image_embedding) > 0.9
    assert example.cosine(reshared, answers["guitar-photo"].image_embedding) < 0.6
    assert example.nearest(list(answers.values()), list(answers).index("beach-reshared"))[0] == (
        "beach"
    )


def test_this_process_imported_no_framework() -> None:
    assert not [name for name in FRAMEWORKS if name in sys.modules]
