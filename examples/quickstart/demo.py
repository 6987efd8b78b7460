"""`make demo`: start `dagserve serve` on the quickstart pipeline, call it, print, stop.

Runs the real command line in a subprocess and talks to it over Thrift with the Python client,
as a business service would.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.tools.ports import ServerNotReady, free_port, wait_ready
from engine.transport.client import Client

HERE = Path(__file__).resolve().parent


def sample_images() -> dict[str, bytes]:
    """Three small images made with Pillow: a red square, a blue gradient, green noise."""
    rng = np.random.default_rng(7)
    gradient = np.zeros((48, 48, 3), np.uint8)
    gradient[..., 2] = np.linspace(0, 255, 48, dtype=np.uint8)[None, :]
    images = {
        "red square (PNG)": Image.new("RGB", (40, 40), (220, 30, 30)),
        "blue gradient (PNG)": Image.fromarray(gradient),
        "green noise (JPEG)": Image.fromarray(
            (rng.random((64, 64, 3)) * [40, 255, 40]).astype(np.uint8)
        ),
    }
    encoded = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if "JPEG" in name else "PNG")
        encoded[name] = buffer.getvalue()
    return encoded


def _fmt(values: np.ndarray) -> str:
    return np.array2string(values, precision=2, floatmode="fixed", suppress_small=True)


def main() -> int:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "serve",
        str(HERE / "pipeline.yaml"),
        "--port",
        str(port),
    ]
    print("$", " ".join(command[2:]))
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with Client("127.0.0.1", port) as client:
            try:
                wait_ready(port, server, timeout_s=60)
            except ServerNotReady as exc:
                sys.exit(str(exc))
            info = client.describe("quickstart")
            print(f"\npipeline {info.name} v{info.version}: nodes {', '.join(info.nodes)}")
            print(
                f"{'post':<22} {'caption':<8} {'mean R,G,B':<20} "
                f"{'embedding (first 6 of 10)':<40} nodes (ms)"
            )
            for i, (name, data) in enumerate(sample_images().items()):
                inputs: dict[str, object] = {"image": [data]}
                if i != 1:  # the second post has no caption: the optional branch is skipped
                    inputs["caption_vector"] = np.full((1, 4), 0.25 * (i + 1), np.float32)
                result = client.infer("quickstart", inputs, timeout_ms=5000)
                mean = result.outputs["stats"][0, :3]
                emb = result.outputs["embedding"][0]
                nodes = " ".join(f"{n}={us / 1000:.2f}" for n, us in result.node_latency_us.items())
                print(
                    f"{name:<22} {'yes' if i != 1 else 'no':<8} "
                    f"{_fmt(mean):<20} {_fmt(emb[:6]):<40} {nodes}"
                )
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"\nserver stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
