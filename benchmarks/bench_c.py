"""The exported C model on the host: latency per inference of dense vs sparse storage (same model, same
run, interleaved), and the Cortex-M4 object sizes of both.

    python benchmarks/bench_c.py OUT      # OUT: a `prunekit demo` / `prunekit run` output directory

Both exports are of the same INT8 model (`--sparse never` and `--sparse auto`), compiled with
`gcc -std=c99 -O2`; each timing binary runs `model_run_i32` over the test inputs, and the two binaries
alternate for ROUNDS rounds (docs/measuring.md). Host x86 latency is not a microcontroller's: the ratio says
how much the sparse loops save when the work, not the memory system, dominates; the flash column is the
Cortex-M4 `.text` (code + weights). The dense kernel also skips zero weights (one test per weight), so
the ratio measures the cost of visiting every position, not of multiplying zeros. FLOP bound: the
density of the stored weights.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from prunekit.export.c import arm_size, build, export_c
from prunekit.export.c.source import calibration_inputs, load_source

ROUNDS = 7
REPEAT = 2  # passes over the test set per timing

TIMER = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <time.h>
#include "model.h"
#include "inputs.h"
int main(void)
{
    int32_t y[MODEL_OUTPUT_SIZE];
    struct timespec a, b;
    int r, i;
    long long sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (r = 0; r < %(repeat)d; ++r)
        for (i = 0; i < N; ++i) {
            model_run_i32(X + i * MODEL_INPUT_SIZE, y);
            sink += y[0];
        }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%%.3f %%lld\n", ((b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3) / (%(repeat)d * N),
           sink);
    return 0;
}
"""


def _binary(model, x_cal, xq, work: Path, sparse: str) -> tuple[Path, dict]:
    out = work / sparse
    result = export_c(model, out, calibration=[x_cal], sparse=sparse)
    vals = ", ".join(str(int(v)) for v in xq.reshape(-1))
    (out / "inputs.h").write_text(f"#define N {len(xq)}\nstatic const int8_t X[] = {{{vals}}};\n")
    (out / "timer.c").write_text(TIMER % {"repeat": REPEAT})
    exe = out / "timer"
    subprocess.run(
        ["gcc", "-std=c99", "-O2", "-o", str(exe), str(out / "timer.c"), str(out / "model.c")], check=True
    )
    return exe, {**result, "arm": arm_size(out, "model")}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    model, splits, artifact = load_source(Path(sys.argv[1]), None)
    x_cal, x_test = calibration_inputs(splits), splits.test[:][0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        xq = build(model, [x_cal]).quantize_input(x_test)
        built = {s: _binary(model, x_cal, xq, work, s) for s in ("never", "auto")}
        times: dict[str, list[float]] = {s: [] for s in built}
        for _ in range(ROUNDS):
            for s, (exe, _) in built.items():
                out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
                times[s].append(float(out.split()[0]))
    print(
        f"{artifact}: {len(x_test)} inputs x {REPEAT} passes, {ROUNDS} interleaved rounds, gcc -O2, 1 thread"
    )
    print(f"{'storage':<8} {'us/inference (median)':>22} {'weights B':>10} {'RAM B':>7} {'M4 text B':>10}")
    for s, (_, r) in built.items():
        arm = r["arm"].get("text", "n/a")
        med = statistics.median(times[s])
        print(f"{s:<8} {med:>22.2f} {r['flash']['weights']:>10,} {r['ram']['total']:>7,} {arm!s:>10}")
    dense, sparse = (statistics.median(times[s]) for s in ("never", "auto"))
    nnz = sum(r.get("nonzero", 0) for r in built["auto"][1]["layers"])
    total = sum(r.get("params", 0) for r in built["auto"][1]["layers"])
    print(f"sparse/dense latency {sparse / dense:.2f}x (FLOP bound {nnz / total:.2f}x: the weight density)")


if __name__ == "__main__":
    main()
