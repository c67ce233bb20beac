"""One versus two threads for the INT8 ResNet-18 of bench_edge, one engine per process: does the second core
pay? (issue 15; runtime/threads.py).

bench_edge times 18 variants in one process, and at 2 threads every engine there keeps threads of its own
(torch's OpenMP workers, onnxruntime's pool, prunekit's workers) that spin for a while after each call and
take the second core from the next variant. A deployment runs one engine. So here a process builds the
models of one engine only (``--engine prunekit``: INT8 90% 4x1, 50% channels and dense, compiled at 2
threads; ``--engine torch-x86``: torch's dense INT8 and the 50% channels model on it), and times each at 1
and at 2 threads alternately (``torch.set_num_threads`` between calls; 3 calls in a row per setting, the
last timed; ``--pause-ms``: a pause before each burst, as a camera's frame interval leaves the cores idle).

    python benchmarks/bench_threads.py --engine prunekit
    python benchmarks/bench_threads.py --engine torch-x86
    python benchmarks/bench_threads.py --engine prunekit --pause-ms 33
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

import prunekit.runtime as rt
from bench_edge import half_channels, int8_model, prune, resnet
from prunekit.export import engines
from prunekit.runtime.cpu import features


def models(engine: str, args) -> dict:
    model, x, calib = resnet(args)
    structured = half_channels(model, x)
    torch.set_num_threads(2)
    if engine == "torch-x86":
        return {
            "dense int8 torch-x86": engines.torch_x86_int8(model, x, calib),
            "int8 50% channels torch-x86": engines.torch_x86_int8(structured, x, calib),
        }, x

    def compiled(m):
        return rt.compile(int8_model(m, calib, args), x)

    return {
        "int8 dense prunekit": compiled(model),
        "int8 90% 4x1": compiled(prune(model, "block:1x4@90%:channels", "layer")),
        "int8 50% channels": compiled(structured),
    }, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("prunekit", "torch-x86"), default="prunekit")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--pause-ms", type=float, default=0.0)
    args = ap.parse_args()
    print(f"CPU: {features().describe()}; torch {torch.__version__}; engine {args.engine}")
    variants, x = models(args.engine, args)
    times: dict[tuple[str, int], list[float]] = {(k, t): [] for k in variants for t in (1, 2)}
    order = list(times)
    rng = random.Random(0)
    with torch.inference_mode():
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name, threads in order:
                torch.set_num_threads(threads)
                time.sleep(args.pause_ms / 1e3)
                for _ in range(3):
                    t0 = time.perf_counter()
                    variants[name](x)
                    dt = time.perf_counter() - t0
                times[(name, threads)].append(dt)
    pause = f", a {args.pause_ms:g} ms pause before each burst" if args.pause_ms else ""
    print(f"\n{args.rounds} interleaved rounds, 3 calls in a row per setting, the last timed{pause}")
    print("| variant | 1 thread p50 ms | 2 threads p50 ms | 2 threads / 1 |")
    print("|---|---|---|---|")
    for name in variants:
        one, two = (statistics.median(times[(name, t)]) * 1e3 for t in (1, 2))
        print(f"| {name} | {one:.2f} | {two:.2f} | {two / one:.3f} |")


if __name__ == "__main__":
    main()
