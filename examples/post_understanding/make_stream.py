"""Write the example's stream of posts, ``data/posts.jsonl``, for ``dagserve stream``.

    python examples/post_understanding/make_stream.py [--count 300] [--seed 0] [--out FILE]

One JSON object a line, in the record format of ``dagserve stream``: each pipeline input by
name as one item (``text`` a string, ``image`` the base64 of an encoded JPEG/PNG), beside
fields that pass through to the sink untouched (``id``; ``labelled_topic`` and
``labelled_spam`` for a text taken from ``data/labelled_texts.csv``; ``scene`` for an image).

Built from code with a fixed seed, from what the example already has, so nothing binary is
shipped and the file is the same on every machine:

- first the sample posts of ``data/posts.json`` (``client.load_posts``);
- then ``--count`` posts drawn at random: a third text only (any labelled text, spam included),
  a quarter image only (a scene of ``client.draw_image`` at a random size, format and quality),
  the rest both (a scene with a labelled text of the scene's topic);
- and :data:`INVALID_LINES`, spread through the stream at fixed places, each of which must
  reach the dead-letter output, not the sink: see their ``why``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_models import read_labelled_texts
from client import SCENES, Post, draw_image, load_posts

HERE = Path(__file__).resolve().parent
STREAM = HERE / "data" / "posts.jsonl"
#: the topic of ``labelled_texts.csv`` each scene of ``client.SCENES`` shows ("tech": none)
SCENE_TOPICS = {
    "beach_sunset": "travel",
    "pizza": "food",
    "football_pitch": "sport",
    "cat": "pets",
    "guitar": "music",
}
#: sizes ([W, H]) and encodings a drawn image is given at random
SIZES = ((256, 256), (320, 240), (200, 260), (160, 160), (480, 360))
FORMATS = (("JPEG", 60), ("JPEG", 75), ("JPEG", 90), ("PNG", 90))


@dataclass(frozen=True)
class InvalidLine:
    """A source line that must go to the dead-letter output, and why it must."""

    line: str
    why: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: the deliberately invalid lines: the first three are refused by the job before any call
#: (the line is not a record of the pipeline); the last is sent, and the server refuses it
#: with a typed error naming the ``decode`` node
INVALID_LINES = (
    InvalidLine('{"id": "bad-json", "text": "a line cut short', "not valid JSON"),
    InvalidLine('["bad-not-an-object", "a JSON list"]', "valid JSON, but not an object"),
    InvalidLine(
        '{"id": "bad-text-type", "text": 42}', "text is a STRING input: a number is not one item"
    ),
    InvalidLine(
        json.dumps({"id": "bad-image-bytes", "image": _b64(b"these bytes are not an image")}),
        "valid base64 of bytes that no image decoder reads: the server's decode node refuses it",
    ),
)


@functools.cache
def _image(scene: str, size: tuple[int, int], fmt: str, quality: int) -> bytes:
    return draw_image(scene, size, fmt, quality)


def record(post: Post, **passthrough: Any) -> dict[str, Any]:
    """The stream line of ``post``: its inputs (image as base64) and the pass-through fields."""
    line: dict[str, Any] = {"id": post.id}
    if post.text is not None:
        line["text"] = post.text
    if post.image is not None:
        line["image"] = _b64(post.image)
    return {**line, **passthrough}


def random_posts(count: int, seed: int) -> Iterator[dict[str, Any]]:
    """``count`` records drawn with ``random.Random(seed)``: text only, image only, or both."""
    rng = random.Random(seed)
    texts, topics, spam = read_labelled_texts()
    labelled = list(zip(texts, topics, spam, strict=True))
    by_topic = {t: [row for row in labelled if row[1] == t and not row[2]] for t in set(topics)}
    scenes = sorted(SCENES)
    for i in range(count):
        kind = rng.choices(("text", "image", "both"), weights=(4, 3, 5))[0]
        fields: dict[str, Any] = {}
        text = image = None
        if kind != "text":
            scene = rng.choice(scenes)
            size = rng.choice(SIZES)
            fmt, quality = rng.choice(FORMATS)
            image = _image(scene, size, fmt, quality)
            fields["scene"] = f"{scene} {size[0]}x{size[1]} {fmt}"
        if kind == "text":
            text, topic, is_spam = rng.choice(labelled)
        elif kind == "both":
            text, topic, is_spam = rng.choice(by_topic[SCENE_TOPICS[scene]])
        if text is not None:
            fields["labelled_topic"], fields["labelled_spam"] = topic, bool(is_spam)
        yield record(Post(f"post-{i:04d}", text, image), **fields)


def lines(count: int = 300, seed: int = 0) -> list[str]:
    """The whole stream: the samples, ``count`` random posts, the invalid lines among them."""
    valid = [json.dumps(record(p)) for p in load_posts().posts]
    valid += [json.dumps(r) for r in random_posts(count, seed)]
    out = list(valid)
    # spread the invalid lines evenly, from the second tenth of the stream on
    for k, invalid in enumerate(INVALID_LINES):
        out.insert((k + 1) * len(out) // (len(INVALID_LINES) + 1), invalid.line)
    return out


def write_stream(path: Path = STREAM, count: int = 300, seed: int = 0) -> Path:
    """Write the stream to ``path`` (a temporary name, then moved: never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines(count, seed)) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--count", type=int, default=300, help="random posts after the samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=STREAM)
    args = parser.parse_args(argv)
    path = write_stream(args.out, args.count, args.seed)
    total = sum(1 for _ in path.open(encoding="utf-8"))
    print(f"wrote {path}: {total} lines, {len(INVALID_LINES)} of them invalid on purpose")
    return 0


if __name__ == "__main__":
    sys.exit(main())
