"""Build the example's models from code, with fixed seeds, into ``models/`` beside this file.

    python examples/post_understanding/build_models.py [--out DIR] [--force]

Nothing is downloaded.  Three steps, each in its own process, because TensorFlow and Paddle must
never share one (``import tensorflow`` then ``import paddle`` is a segmentation fault here):

1. ``torch``: exports the image encoder, a ResNet-18 with random weights (seed 0) that returns
   its 512-d pooled features, centred (see :func:`build_image_encoder`), as TorchScript
   (``image_encoder.pt``); then embeds the labelled texts of ``data/labelled_texts.csv`` with
   the real all-MiniLM-L6-v2, through the very plugin the pipeline serves, into
   ``training_set.npz``.
2. ``tensorflow`` (in parallel with 3): trains the topic tagger, softmax regression over the
   384-d text embedding, and saves it as a SavedModel (``topic_tagger/``).
3. ``paddle``: trains the spam head, logistic regression over the same embedding, and saves it
   as a Paddle inference model (``spam_head/inference.json`` + ``.pdiparams``).

Every fifth labelled text is held out; the held-out accuracy of both heads is printed and kept in
``build_info.json``, with a fingerprint of this script, the plugin module and the data.  When
``models/`` already holds a build with the same fingerprint, nothing is rebuilt.  A build is
written to a temporary folder and moved into place when it is complete.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MODELS = HERE / "models"
LABELLED_TEXTS = DATA / "labelled_texts.csv"

#: the files whose content decides what a build produces
FINGERPRINTED = (Path(__file__).resolve(), HERE / "post_understanding_plugins.py", LABELLED_TEXTS)
#: what a complete build holds
PRODUCTS = (
    "image_encoder.pt",
    "topic_tagger/saved_model.pb",
    "spam_head/inference.json",
    "spam_head/inference.pdiparams",
    "labels.json",
    "build_info.json",
)
#: every HOLDOUT-th labelled text (0, 5, 10...) is kept out of training, to measure accuracy
HOLDOUT = 5
SEED = 0
IMAGE_SIZE = 224
TEXT_DIM = 384
#: how many synthetic images the image encoder's feature mean is estimated on
CENTRING_IMAGES = 64


# --------------------------------------------------------------------- shared by every step


def fingerprint() -> str:
    """A hash of the files the build depends on."""
    digest = hashlib.sha256()
    for path in FINGERPRINTED:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def is_built(out: Path = MODELS) -> bool:
    """Whether ``out`` holds a complete build of the current fingerprint."""
    try:
        info = json.loads((out / "build_info.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("fingerprint") == fingerprint() and all((out / p).exists() for p in PRODUCTS)


def read_labelled_texts(path: Path = LABELLED_TEXTS) -> tuple[list[str], list[str], list[int]]:
    """``(texts, topics, spam flags)`` of the labelled CSV (columns text, topic, spam)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["topic"] for r in rows], [int(r["spam"]) for r in rows]


def topic_names(topics: list[str]) -> list[str]:
    """The topics in order of first appearance: index i of the tagger's output is topic i."""
    return list(dict.fromkeys(topics))


def _load_training_set(out: Path) -> dict[str, Any]:
    import numpy as np

    with np.load(out / "training_set.npz") as data:
        return {name: data[name] for name in data.files}


# --------------------------------------------------------------------- step 1: PyTorch


def build_image_encoder(seed: int = SEED) -> Any:
    """ResNet-18 (He et al., 2015) in plain PyTorch, random weights from ``seed``, no classifier.

    The same network as ``benchmarks/resnet18.py``, written out again on purpose: an example
    stands alone (it is copied and read as a whole), and ``benchmarks/`` is not part of the
    installed package.  ``forward(pixels)`` takes float32
    [N, 3, H, W] and returns the 512-d globally average-pooled features [N, 512] minus the
    buffer ``center`` (zeros here; :func:`step_torch` sets it).  Pooled ReLU features of a
    random network all point the same way (every image is ~0.9 cosine-similar to every
    other), so the feature mean over synthetic images is subtracted: then a re-encoded copy of
    an image stays at ~1.0 and different pictures drop to ~0-0.3.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: Any) -> Any:
            identity = x if self.down is None else self.down(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + identity)

    class ImageEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            ]
            cin = 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.trunk = nn.Sequential(*layers)
            self.register_buffer("center", torch.zeros(512))

        def forward(self, pixels: Any) -> Any:
            return self.trunk(pixels) - self.center

    return ImageEncoder().eval()


def _synthetic_pixels(count: int, seed: int = SEED) -> Any:
    """``count`` random images of coloured rectangles and ellipses, as the pipeline sees them.

    They are drawn with Pillow from a seeded generator (none is a sample post's image) and go
    through the built-in ``image_decode`` node with the pipeline's params, so their pixels are
    normalised exactly as served ones.
    """
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    from model_plugins import LoadContext
    from model_plugins.builtins.image_decode import ImageDecode

    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        red, green, blue = (int(v) for v in rng.integers(0, 256, 3))
        return red, green, blue

    encoded = []
    for _ in range(count):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0, width, height = (int(v) for v in rng.integers(0, IMAGE_SIZE - 24, 4))
            x1, y1 = x0 + 10 + width // 2, y0 + 10 + height // 2
            shape = draw.rectangle if rng.integers(0, 2) else draw.ellipse
            shape([x0, y0, x1, y1], fill=colour())
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    decode = ImageDecode()
    params = {"size": [IMAGE_SIZE, IMAGE_SIZE]}
    decode.load(LoadContext(node="decode", plugin="image_decode", params=params))
    return decode.predict({"data": np.array(encoded, dtype=object)})["pixels"]


def step_torch(out: Path) -> dict[str, Any]:
    """Export the image encoder; embed the labelled texts with the served MiniLM plugin."""
    import numpy as np
    import torch
    from post_understanding_plugins import MiniLMEncoder

    from model_plugins import LoadContext

    started = time.perf_counter()
    encoder = build_image_encoder()
    with torch.no_grad():
        synthetic = torch.from_numpy(_synthetic_pixels(CENTRING_IMAGES))
        encoder.center.copy_(encoder(synthetic).mean(0))
    example = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traced = torch.jit.trace(encoder, example)  # type: ignore[no-untyped-call]
        other = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
        if not torch.allclose(traced(other), encoder(other), atol=1e-5):
            msg = "the traced image encoder disagrees with the module"
            raise RuntimeError(msg)
    torch.jit.save(traced, str(out / "image_encoder.pt"))
    image_s = time.perf_counter() - started

    started = time.perf_counter()
    texts, topics, spam = read_labelled_texts()
    names = topic_names(topics)
    text_encoder = MiniLMEncoder()
    text_encoder.load(LoadContext(node="text_embed", plugin="MiniLMEncoder", pipeline_dir=HERE))
    embeddings = np.concatenate(
        [
            text_encoder.predict({"text": np.array(texts[i : i + 32], dtype=object)})["embedding"]
            for i in range(0, len(texts), 32)
        ]
    )
    holdout = np.arange(len(texts)) % HOLDOUT == 0
    np.savez(
        out / "training_set.npz",
        embedding=embeddings,
        topic=np.array([names.index(t) for t in topics], np.int64),
        spam=np.array(spam, np.int64),
        holdout=holdout,
    )
    return {
        "image_encoder_s": round(image_s, 2),
        "embed_texts_s": round(time.perf_counter() - started, 2),
        "texts": len(texts),
    }


# --------------------------------------------------------------------- step 2: TensorFlow


def step_tensorflow(out: Path) -> dict[str, Any]:
    """Train the topic tagger (softmax regression) and save it as a SavedModel."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.random.set_seed(SEED)
    data = _load_training_set(out)
    n_topics = int(data["topic"].max()) + 1
    train = ~data["holdout"]
    x = tf.constant(data["embedding"][train])
    y = tf.constant(data["topic"][train])

    class TopicTagger(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.zeros([TEXT_DIM, n_topics]), name="w")
            self.b = tf.Variable(tf.zeros([n_topics]), name="b")

        def logits(self, embedding: Any) -> Any:
            return tf.matmul(embedding, self.w) + self.b

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[tf.TensorSpec([None, TEXT_DIM], tf.float32, "embedding")]
        )
        def serve(self, embedding: Any) -> dict[str, Any]:
            return {"probabilities": tf.nn.softmax(self.logits(embedding))}

    model = TopicTagger()
    optimizer = tf.optimizers.Adam(0.05)

    @tf.function  # type: ignore[untyped-decorator]
    def train_step() -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, model.logits(x))
            ) + 1e-3 * tf.reduce_sum(model.w**2)
        variables = [model.w, model.b]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    for _ in range(300):
        loss = train_step()
    tf.saved_model.save(
        model, str(out / "topic_tagger"), signatures={"serving_default": model.serve}
    )

    def accuracy(rows: np.ndarray) -> float:
        predicted = model.serve(tf.constant(data["embedding"][rows]))["probabilities"].numpy()
        return float((predicted.argmax(1) == data["topic"][rows]).mean())

    return {
        "topic_loss": round(float(loss), 4),
        "topic_train_accuracy": round(accuracy(train), 3),
        "topic_holdout_accuracy": round(accuracy(data["holdout"]), 3),
    }


# --------------------------------------------------------------------- step 3: Paddle


def step_paddle(out: Path) -> dict[str, Any]:
    """Train the spam head (logistic regression) and save it as a Paddle inference model."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No ccache found")
        import paddle

    paddle.seed(SEED)
    data = _load_training_set(out)
    train = ~data["holdout"]
    x = paddle.to_tensor(data["embedding"][train])
    y = paddle.to_tensor(data["spam"][train].astype(np.float32))

    class SpamHead(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.linear = paddle.nn.Linear(TEXT_DIM, 1)

        def logits(self, embedding: Any) -> Any:
            return self.linear(embedding).squeeze(-1)

        def forward(self, embedding: Any) -> Any:
            return paddle.nn.functional.sigmoid(self.logits(embedding))

    model = SpamHead()
    optimizer = paddle.optimizer.Adam(0.05, parameters=model.parameters(), weight_decay=1e-4)
    # spam is the rare class: weigh its examples up to balance the two classes
    pos_weight = paddle.to_tensor([float((y == 0).sum()) / max(float(y.sum()), 1.0)])
    for _ in range(300):
        loss = paddle.nn.functional.binary_cross_entropy_with_logits(
            model.logits(x), y, pos_weight=pos_weight
        )
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    model.eval()

    def accuracy(rows: np.ndarray) -> float:
        with paddle.no_grad():
            predicted = model(paddle.to_tensor(data["embedding"][rows])).numpy()
        return float(((predicted > 0.5) == data["spam"][rows].astype(bool)).mean())

    metrics = {
        "spam_loss": round(float(loss), 4),
        "spam_train_accuracy": round(accuracy(train), 3),
        "spam_holdout_accuracy": round(accuracy(data["holdout"]), 3),
    }
    spec = paddle.static.InputSpec([None, TEXT_DIM], "float32", name="embedding")
    paddle.jit.save(model, str(out / "spam_head" / "inference"), input_spec=[spec])
    return metrics


STEPS = {"torch": step_torch, "tensorflow": step_tensorflow, "paddle": step_paddle}


# --------------------------------------------------------------------- the driver


def _start(step: str, out: Path) -> subprocess.Popen[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(step: str, process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        msg = f"build step {step!r} failed (exit code {process.returncode}):\n{stderr[-4000:]}"
        raise RuntimeError(msg)
    metrics: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return metrics


def build(out: Path = MODELS, *, force: bool = False, log: Any = print) -> dict[str, Any]:
    """Build every model into ``out`` unless it already holds this build; the build's info.

    Raises:
        RuntimeError: a step failed (with the end of its stderr).
    """
    if not force and is_built(out):
        info: dict[str, Any] = json.loads((out / "build_info.json").read_text())
        log(f"models up to date in {out} (fingerprint {info['fingerprint']})")
        return info
    started = time.perf_counter()
    work = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "spam_head").mkdir(parents=True)
    try:
        log(f"building models into {out} (each framework in its own process)...")
        metrics = _finish("torch", _start("torch", work))
        log(f"  torch:      image encoder exported, {metrics['texts']} texts embedded")
        heads = {step: _start(step, work) for step in ("tensorflow", "paddle")}
        for step, process in heads.items():
            metrics |= _finish(step, process)
        log(
            f"  tensorflow: topic tagger, held-out accuracy {metrics['topic_holdout_accuracy']:.0%}"
        )
        log(f"  paddle:     spam head, held-out accuracy {metrics['spam_holdout_accuracy']:.0%}")
        _, topics, _ = read_labelled_texts()
        labels = {
            "topics": topic_names(topics),
            "spam": "probability that the text is spam (0..1)",
        }
        (work / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
        info = {
            "fingerprint": fingerprint(),
            "seconds": round(time.perf_counter() - started, 1),
            **metrics,
        }
        (work / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"models built in {info['seconds']:.1f} s")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=MODELS, help="where to write the models")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child process: one framework, metrics as one JSON line on stdout
        print(json.dumps(STEPS[args.step](args.out.resolve())))
        return 0
    try:
        build(args.out.resolve(), force=args.force)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
