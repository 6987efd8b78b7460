"""Send the sample posts to a running post_understanding server and print what it answers.

    python examples/post_understanding/client.py [--host 127.0.0.1] [--port 9090]

The posts are in ``data/posts.json``; their images are drawn here with Pillow (simple scenes:
a beach at sunset, a pizza, a football pitch, a cat, a guitar on a stage), so nothing binary
is shipped.  The functions are reusable: ``demo.py`` calls :func:`load_posts`, :func:`analyse`
and :func:`report`; the test suite calls :func:`load_posts` and :func:`infer_post`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from engine.transport.client import Client

HERE = Path(__file__).resolve().parent
POSTS = HERE / "data" / "posts.json"
LABELS = HERE / "models" / "labels.json"
PIPELINE = "post_understanding"
#: the nodes of the pipeline, in the order of the latency columns
NODES = ("decode", "image_embed", "text_embed", "tags", "spam", "fuse")
#: the size every scene is drawn at, before a post's own ``size`` resizes it
CANVAS = (256, 256)


# ------------------------------------------------------------------ images, drawn with Pillow


def _beach_sunset(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    horizon = int(h * 0.55)
    for y in range(horizon):  # sky: purple at the top to orange at the horizon
        t = y / horizon
        draw.line([(0, y), (w, y)], fill=(int(90 + 160 * t), int(40 + 100 * t), int(120 - 80 * t)))
    draw.ellipse([w * 0.38, horizon - 40, w * 0.62, horizon + 20], fill=(255, 210, 60))
    draw.rectangle([0, horizon, w, int(h * 0.8)], fill=(30, 70, 130))
    for i in range(6):  # the sun's reflection on the water
        y = horizon + 8 + i * 7
        draw.line([(w * 0.42 + i * 2, y), (w * 0.58 - i * 2, y)], fill=(250, 180, 80), width=2)
    draw.rectangle([0, int(h * 0.8), w, h], fill=(225, 195, 140))


def _pizza(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    draw.rectangle([0, 0, w, h], fill=(140, 90, 50))  # a wooden table
    for x in range(0, w, 24):
        draw.line([(x, 0), (x, h)], fill=(120, 75, 40), width=2)
    draw.ellipse([20, 20, w - 20, h - 20], fill=(225, 170, 90))  # crust
    draw.ellipse([36, 36, w - 36, h - 36], fill=(200, 40, 30))  # tomato sauce
    rng = np.random.default_rng(3)
    for cx, cy in rng.uniform(70, w - 70, (7, 2)):  # mozzarella
        draw.ellipse([cx - 16, cy - 13, cx + 16, cy + 13], fill=(250, 245, 225))
    for cx, cy in rng.uniform(70, w - 70, (5, 2)):  # basil
        draw.ellipse([cx - 9, cy - 5, cx + 9, cy + 5], fill=(40, 140, 50))


def _football_pitch(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    for i, x in enumerate(range(0, w, 32)):  # mown stripes
        draw.rectangle([x, 0, x + 32, h], fill=(40, 150, 60) if i % 2 else (50, 170, 70))
    white = (245, 245, 245)
    draw.rectangle([8, 8, w - 8, h - 8], outline=white, width=3)
    draw.line([(w // 2, 8), (w // 2, h - 8)], fill=white, width=3)
    draw.ellipse([w // 2 - 36, h // 2 - 36, w // 2 + 36, h // 2 + 36], outline=white, width=3)
    draw.rectangle([8, h // 2 - 50, 48, h // 2 + 50], outline=white, width=3)
    draw.rectangle([w - 48, h // 2 - 50, w - 8, h // 2 + 50], outline=white, width=3)
    draw.ellipse([w * 0.65, h * 0.6, w * 0.65 + 22, h * 0.6 + 22], fill=white, outline=(0, 0, 0))


def _cat(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    draw.rectangle([0, 0, w, h], fill=(110, 130, 160))  # a blue wall
    draw.rectangle([0, h * 0.78, w, h], fill=(60, 60, 65))  # a keyboard...
    for x in range(8, w, 20):  # ...with its keys
        draw.rectangle([x, h * 0.82, x + 14, h * 0.9], fill=(200, 200, 205))
    orange, dark = (235, 140, 50), (60, 40, 30)
    draw.polygon([(w * 0.25, h * 0.35), (w * 0.32, h * 0.08), (w * 0.45, h * 0.28)], fill=orange)
    draw.polygon([(w * 0.75, h * 0.35), (w * 0.68, h * 0.08), (w * 0.55, h * 0.28)], fill=orange)
    draw.ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=orange)
    for cx in (w * 0.38, w * 0.62):  # closed, sleeping eyes
        draw.arc([cx - 14, h * 0.42, cx + 14, h * 0.52], 0, 180, fill=dark, width=3)
    draw.polygon(
        [(w * 0.47, h * 0.56), (w * 0.53, h * 0.56), (w * 0.5, h * 0.6)], fill=(240, 120, 150)
    )
    for dy in (-6, 0, 6):  # whiskers
        draw.line([(w * 0.2, h * 0.6 + dy), (w * 0.42, h * 0.59)], fill=dark, width=1)
        draw.line([(w * 0.8, h * 0.6 + dy), (w * 0.58, h * 0.59)], fill=dark, width=1)


def _guitar(draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    draw.rectangle([0, 0, w, h], fill=(20, 15, 35))  # a dark stage
    draw.polygon([(w * 0.5, 0), (w * 0.15, h), (w * 0.85, h)], fill=(70, 60, 90))  # spotlight
    body, neck = (170, 80, 30), (90, 50, 20)
    draw.rectangle([w * 0.46, h * 0.05, w * 0.54, h * 0.5], fill=neck)
    draw.ellipse([w * 0.3, h * 0.42, w * 0.7, h * 0.7], fill=body)
    draw.ellipse([w * 0.25, h * 0.58, w * 0.75, h * 0.95], fill=body)
    draw.ellipse([w * 0.44, h * 0.6, w * 0.56, h * 0.72], fill=(30, 20, 10))  # sound hole
    for i in range(6):  # strings
        x = w * 0.475 + i * w * 0.01
        draw.line([(x, h * 0.06), (x, h * 0.85)], fill=(230, 230, 210), width=1)


SCENES: dict[str, Callable[[ImageDraw.ImageDraw, int, int], None]] = {
    "beach_sunset": _beach_sunset,
    "pizza": _pizza,
    "football_pitch": _football_pitch,
    "cat": _cat,
    "guitar": _guitar,
}


def draw_image(
    scene: str, size: Sequence[int] | None = None, fmt: str = "PNG", quality: int = 90
) -> bytes:
    """An encoded image of ``scene`` (drawn at 256 x 256, then resized to ``size`` = [W, H])."""
    image = Image.new("RGB", CANVAS)
    SCENES[scene](ImageDraw.Draw(image), *CANVAS)
    if size is not None:
        image = image.resize((int(size[0]), int(size[1])), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# ------------------------------------------------------------------ posts and answers


@dataclass(frozen=True)
class Post:
    """One sample post: an encoded image, a text, or both."""

    id: str
    text: str | None = None
    image: bytes | None = None
    image_about: str = ""  # e.g. "beach_sunset 320x240 JPEG"

    def inputs(self) -> dict[str, list[Any]]:
        """The pipeline inputs of this post, one item each; absent parts are left out."""
        inputs: dict[str, list[Any]] = {}
        if self.image is not None:
            inputs["image"] = [self.image]
        if self.text is not None:
            inputs["text"] = [self.text]
        return inputs

    @property
    def kind(self) -> str:
        return "+".join(p for p, v in (("image", self.image), ("text", self.text)) if v is not None)


@dataclass(frozen=True)
class Samples:
    """The sample posts and the pairs of post ids whose text similarity is worth showing."""

    posts: list[Post]
    paraphrases: list[tuple[str, str]]
    unrelated: list[tuple[str, str]]

    def by_id(self, post_id: str) -> Post:
        return next(post for post in self.posts if post.id == post_id)


def load_posts(path: Path = POSTS) -> Samples:
    """The sample posts of ``data/posts.json``, their images drawn and encoded."""
    data = json.loads(path.read_text(encoding="utf-8"))
    posts = []
    for item in data["posts"]:
        image, about = None, ""
        if "image" in item:
            spec = item["image"]
            fmt = spec.get("format", "PNG")
            size = spec.get("size")
            image = draw_image(spec["scene"], size, fmt, spec.get("quality", 90))
            w, h = size or CANVAS
            about = f"{spec['scene']} {w}x{h} {fmt}"
        posts.append(Post(item["id"], item.get("text"), image, about))
    return Samples(
        posts,
        [(str(a), str(b)) for a, b in data["paraphrases"]],
        [(str(a), str(b)) for a, b in data["unrelated"]],
    )


def load_topics(path: Path = LABELS) -> list[str]:
    """The topic of each index of ``tag_probabilities``, as the build script wrote them."""
    topics: list[str] = json.loads(path.read_text(encoding="utf-8"))["topics"]
    return topics


@dataclass
class Answer:
    """What the pipeline answered for one post (absent outputs are None)."""

    post: Post
    embedding: np.ndarray
    text_embedding: np.ndarray | None
    image_embedding: np.ndarray | None
    tag_probabilities: np.ndarray | None
    spam_probability: float | None
    node_ms: dict[str, float] = field(default_factory=dict)
    wall_ms: float = 0.0


def infer_post(client: Client, post: Post, timeout_ms: int = 30_000) -> Answer:
    """Send one post (one item) and unpack the answer."""
    started = time.perf_counter()
    result = client.infer(PIPELINE, post.inputs(), timeout_ms=timeout_ms)
    wall_ms = (time.perf_counter() - started) * 1000
    out = result.outputs

    def first(name: str) -> np.ndarray | None:
        return np.asarray(out[name][0]) if name in out else None

    spam = first("spam_probability")
    embedding = first("embedding")
    if embedding is None:
        msg = f"post {post.id!r}: the answer has no embedding (outputs: {', '.join(out)})"
        raise ValueError(msg)
    return Answer(
        post=post,
        embedding=embedding,
        text_embedding=first("text_embedding"),
        image_embedding=first("image_embedding"),
        tag_probabilities=first("tag_probabilities"),
        spam_probability=None if spam is None else float(spam),
        node_ms={node: us / 1000 for node, us in result.node_latency_us.items()},
        wall_ms=wall_ms,
    )


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0 when either is all zeros)."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norm if norm > 0 else 0.0


def nearest(answers: Sequence[Answer], index: int) -> tuple[str, float]:
    """The other post whose fused embedding is closest to post ``index``'s, and the cosine."""
    scores = [
        (cosine(answers[index].embedding, other.embedding), other.post.id)
        for j, other in enumerate(answers)
        if j != index
    ]
    score, post_id = max(scores)
    return post_id, score


def analyse(client: Client, samples: Samples, warmup: int = 2) -> list[Answer]:
    """Warm every model up (first calls pay one-off costs), then send each post once."""
    both = next(p for p in samples.posts if p.image is not None and p.text is not None)
    for _ in range(warmup):
        infer_post(client, both)
    return [infer_post(client, post) for post in samples.posts]


# ------------------------------------------------------------------ printing


def _tags(probabilities: np.ndarray | None, topics: Sequence[str], threshold: float = 0.2) -> str:
    """The topics above ``threshold`` (at least the best one), best first, with probabilities."""
    if probabilities is None:
        return "-"
    order = np.argsort(-probabilities)
    shown = [i for i in order[:3] if probabilities[i] >= threshold] or [int(order[0])]
    return " ".join(f"{topics[i]} {probabilities[i]:.2f}" for i in shown)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(
    answers: Sequence[Answer], samples: Samples, topics: Sequence[str], out: Any = None
) -> None:
    """Print the posts, the answers table and a few text similarities."""
    write = print if out is None else (lambda *a: print(*a, file=out))
    write(f"{'post':<15} {'image':<28} text")
    for post in samples.posts:
        write(f"{post.id:<15} {post.image_about or '-':<28} {post.text or '-'}")

    widths = {node: max(len(node), 5) + 1 for node in NODES}
    header = (
        f"\n{'post':<15} {'inputs':<11} {'tags (p >= 0.2)':<22} {'spam':>5}  "
        f"{'near-duplicate (cos)':<21}"
        + "".join(f"{n:>{w}}" for n, w in widths.items())
        + f"{'wall':>7}"
    )
    write(header)
    write("-" * (len(header) - 1))
    for i, answer in enumerate(answers):
        post_id, score = nearest(answers, i)
        spam = "-" if answer.spam_probability is None else f"{answer.spam_probability:.2f}"
        write(
            f"{answer.post.id:<15} {answer.post.kind:<11} "
            f"{_tags(answer.tag_probabilities, topics):<22} {spam:>5}  "
            f"{f'{post_id} {score:.2f}':<21}"
            + "".join(f"{_ms(answer.node_ms.get(n)):>{w}}" for n, w in widths.items())
            + f"{answer.wall_ms:>7.1f}"
        )
    write("(ms per node as the server measured them; '-': skipped; wall: the round trip)")

    write("\ntext similarity (cosine of the MiniLM embeddings):")
    for label, pairs in (("paraphrase", samples.paraphrases), ("unrelated", samples.unrelated)):
        for (a, b), similarity in zip(pairs, text_similarities(answers, pairs), strict=True):
            texts = f"{samples.by_id(a).text!r} ~ {samples.by_id(b).text!r}"
            write(f"  {label:<11} {similarity:5.2f}  {texts}")


def text_similarities(answers: Sequence[Answer], pairs: Sequence[tuple[str, str]]) -> list[float]:
    """The cosine of the text embeddings of each pair of post ids (pairs without text: left out)."""
    by_id = {a.post.id: a.text_embedding for a in answers}
    return [
        cosine(ea, eb)
        for ea, eb in ((by_id[a], by_id[b]) for a, b in pairs)
        if ea is not None and eb is not None
    ]


def paraphrase_margin(answers: Sequence[Answer], samples: Samples) -> float:
    """The lowest paraphrase similarity minus the highest unrelated one (> 0: separated)."""
    lowest = min(text_similarities(answers, samples.paraphrases), default=math.nan)
    return lowest - max(text_similarities(answers, samples.unrelated), default=math.nan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args(argv)
    samples = load_posts()
    with Client(args.host, args.port) as client:
        answers = analyse(client, samples)
    report(answers, samples, load_topics())
    return 0


if __name__ == "__main__":
    sys.exit(main())
