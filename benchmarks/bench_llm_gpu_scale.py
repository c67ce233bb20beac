"""Scale on one GPU: Wanda and SparseGPT streamed from disk with ``--device cuda`` (issue 17).

The same random Llama-3.2-3B-shaped bfloat16 checkpoint as ``bench_llm_scale.py`` (``--shape 8b`` for the
8B shape), pruned at 50% with the papers' 128 calibration windows of 512 tokens (``--calib-samples``); each
block moves to the GPU in turn, the calibration activations stay there when they take at most half of its
free memory. Reported per method: peak host RSS, peak GPU memory, prune seconds, one dense forward pass over
the same tokens timed in the same run (block by block, on the GPU) and the ratio, and the output loaded
with plain ``from_pretrained``. Without CUDA it says so and exits (code 2); nothing else to set up.

    python benchmarks/bench_llm_gpu_scale.py                    # 3B: about 6.4 GB written, then 2 runs
    python benchmarks/bench_llm_gpu_scale.py --shape 8b --dir /scratch/bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_llm_scale as scale  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(scale.SHAPES), default="3b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (smoke runs)")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--dir", type=Path, default=Path("bench-llm-scale"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_llm_gpu_scale: torch sees no CUDA device; run it on a machine with a GPU", file=sys.stderr
        )
        raise SystemExit(2)
    args.device = "cuda"
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    name = f"llama-{args.shape}" + (f"-{args.layers}l" if args.layers else "")
    model = args.dir / name
    if not (model / "model.safetensors.index.json").is_file():
        print(f"wrote {model} in {scale.build(model, args.shape, args.layers):.0f} s")
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"{name}: bfloat16, {size / 1e9:.2f} GB; {args.calib_samples} x {args.seqlen} calibration tokens")
    rows = []
    for method in args.methods:
        out = args.dir / f"{name}-{method}-cuda"
        shutil.rmtree(out, ignore_errors=True)
        m = scale.prune(model, method, out, args)
        loaded = scale.check_loads(out)
        rows.append({"method": method, **{k: m.get(k) for k in scale.REPORTED}, **loaded})
        r = rows[-1]
        print(
            f"{method:<10} peak RSS {r['peak_rss_mb']:6.0f} MB  peak GPU {r['peak_gpu_mb'] or 0:6.0f} MB  "
            f"prune {r['prune_seconds']:7.1f} s  dense forward {r['dense_forward_seconds']:6.1f} s  "
            f"ratio {r['prune_over_forward']:.2f}x  from_pretrained: {r['dtype']}, "
            f"half of each row zero: {r['half_of_each_row_zero']}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
