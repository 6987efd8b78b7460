"""What the frame guard adds to the decode of one request (``engine.transport.frame_guard``).

    .venv/bin/python -m benchmarks.decode_guard [--quick]

For each request body, in this process, no socket: the time of thriftpy2's Cython decode as
the server runs it (``message_reader``, ``read_message_begin``, ``read_struct``), the time of
``frame_guard.check_call`` alone, and the guard's share of the decode.  Each figure is the
fastest of 9 rounds of a loop sized to last about 0.2 s (0.05 s with ``--quick``), in CPU
time (``time.process_time``: on a shared machine, wall time mostly measures the neighbours),
in us per request.  Bodies:

- tiny: float32 [1, 4], the smallest useful request;
- image: float32 [1, 3, 224, 224], 602 KB of ``binary``: the guard skips it in O(1);
- 1000 strings: a BYTES tensor of 1000 elements of 16 bytes, a ``list<binary>``: the guard
  walks each element (its worst case per byte in our IDL);
- 32 inputs + 32 headers: many small map entries and structs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from thriftpy2.thrift import TMessageType

from engine.transport.client import _infer_args
from engine.transport.codec import encode_message, message_reader
from engine.transport.frame_guard import check_call
from idl import dagserve_thrift

ARGS = dagserve_thrift.InferenceService.infer_args


def bodies() -> dict[str, bytes]:
    """The request bodies measured, by name."""
    rng = np.random.default_rng(0)
    inputs = {
        "tiny float32 [1,4]": {"x": np.ones((1, 4), np.float32)},
        "image float32 [1,3,224,224]": {"image": rng.random((1, 3, 224, 224), dtype=np.float32)},
        "1000 strings of 16 B": {"text": np.array([b"0123456789abcdef"] * 1000, dtype=object)},
        "32 inputs + 32 headers": {f"x{i}": np.ones((1, 4), np.float32) for i in range(32)},
    }
    out = {}
    for name, tensors in inputs.items():
        headers = {f"h{i}": "v" * 8 for i in range(32)} if "headers" in name else None
        args = _infer_args(
            "calc", tensors, version=None, timeout_ms=1000, outputs=None,
            request_id="bench", headers=headers,
        )  # fmt: skip
        out[name] = encode_message("infer", TMessageType.CALL, 1, args)
    return out


def decode(body: bytes) -> object:
    """The server's decode of one call body (``engine.transport.thrift.ThriftServer._process``)."""
    protocol = message_reader(body)
    protocol.read_message_begin()
    args = ARGS()
    protocol.read_struct(args)
    return args


def per_call_us(call: Callable[[], object], seconds: float) -> float:
    """The CPU time of one call, microseconds: the fastest of 9 rounds."""
    count = 1
    while True:  # size the loop
        start = time.process_time()
        for _ in range(count):
            call()
        took = time.process_time() - start
        if took > seconds / 10:
            break
        count *= 4
    count = max(1, int(count * seconds / max(took, 1e-9)))
    rounds = []
    for _ in range(9):
        start = time.process_time()
        for _ in range(count):
            call()
        rounds.append((time.process_time() - start) / count)
    return min(rounds) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter loops")
    seconds = 0.05 if parser.parse_args(argv).quick else 0.2
    print("| request | body bytes | decode (us) | guard (us) | guard / decode |")
    print("|---|---:|---:|---:|---:|")
    shares = []
    for name, body in bodies().items():
        check_call(body, ARGS)  # it passes
        decode_us = per_call_us(lambda b=body: decode(b), seconds)  # type: ignore[misc]
        guard_us = per_call_us(lambda b=body: check_call(b, ARGS), seconds)  # type: ignore[misc]
        shares.append((guard_us / decode_us, name))
        print(
            f"| {name} | {len(body):,} | {decode_us:.1f} | {guard_us:.1f} "
            f"| {100 * guard_us / decode_us:.0f} % |"
        )
    worst, where = max(shares)
    print(f"\nReading: the guard adds at most {100 * worst:.0f} % to a decode ({where}).")


if __name__ == "__main__":
    main()
