"""Run by test_gemv_kernels.py in a process whose numba targets an AVX2-only CPU: every batch-1 kernel of
the AVX2 path equals dense math. Prints "all equal" on success."""

import numpy as np
import torch

from prunekit.runtime import gemv_formats as fmt
from prunekit.runtime import gemv_kernels as K
from prunekit.runtime.cpu import features
from prunekit.runtime.gemv import GemvLinear


def check(y: np.ndarray, ref: np.ndarray, what: str) -> None:
    err = np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= 1e-4, f"{what}: relative error {err}"


def main() -> None:
    assert features().avx2 and not features().avx512, features()
    g = torch.Generator().manual_seed(0)
    for out, inn in ((40, 96), (64, 320)):
        x = torch.randn(1, inn, generator=g)
        dense = torch.randn(out, inn, generator=g)
        keep = torch.rand(out // 8, inn, generator=g) > 0.7
        block = dense * keep.repeat_interleave(8, 0)
        groups = dense.reshape(-1, 4).clone()
        groups.scatter_(1, torch.rand(groups.shape, generator=g).argsort(1)[:, 2:], 0.0)
        nm = groups.reshape(out, inn)
        sparse = dense * (torch.rand(out, inn, generator=g) > 0.8)
        cases = [("dense", dense), ("block8", block), ("block16", block), ("nm2:4", nm), ("csr4", sparse)]
        for layout, w in cases:
            for values in fmt.VALUE_TYPES:
                lin = torch.nn.Linear(inn, out)
                with torch.no_grad():
                    lin.weight.copy_(w)
                layer = GemvLinear(lin, layout, values)
                with torch.no_grad():
                    y = layer(x).numpy()
                check(y, layer.reference(x).double().numpy(), f"{layout} {values} {out}x{inn}")
        lin = torch.nn.Linear(inn, out)
        with torch.no_grad():
            lin.weight.copy_(block)
        layer = GemvLinear(lin, "block8", "int8", "int8")
        assert layer.packed.layout == "block", "no VNNI on the AVX2 path"
        with torch.no_grad():
            assert torch.equal(layer(x), layer.reference(x)), "int8 activations: not bit-exact"
    assert K.nm_gemv_avx512.signatures == [], "an AVX-512 kernel was compiled"
    print("all equal")


if __name__ == "__main__":
    main()
