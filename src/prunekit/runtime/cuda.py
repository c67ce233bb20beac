"""2:4 Linear layers on NVIDIA sparse tensor cores, through torch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``; Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks", the 2:4 format of Ampere and later GPUs: half the values plus 2-bit positions).

:func:`prunekit.runtime.compile` with ``device="cuda"`` offers :class:`SemiStructuredLinear` for every
``nn.Linear`` whose weight is 2:4 along its inputs and whose dtype and shape the kernels take
(:func:`semi_structured_reason`), times it against the dense layer (CUDA synchronised around each call) and
keeps whichever is faster, with the same per-layer report as on the CPU. Without a CUDA device the same call
is one clear error; the checks below are pure and run anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.sparse import to_sparse_semi_structured

from prunekit.errors import PrunekitError

# (rows, cols) multiples the sparse operand must have, per dtype (torch's CUTLASS / cuSPARSELt constraints)
SHAPE_MULTIPLES = {
    torch.float16: (32, 64),
    torch.bfloat16: (32, 64),
    torch.float32: (32, 32),
    torch.int8: (32, 128),
}
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and later
HALF_RTOL = 1e-2  # fp16/bf16: the sparse and the dense GEMM sum in different orders


def is_two_four(weight: Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive inputs of a 2-D ``(out, in)`` weight."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach() != 0).reshape(-1, 4).sum(dim=1) <= 2).all())


def semi_structured_reason(
    weight: Tensor, dtype: torch.dtype | None = None, capability: tuple[int, int] | None = None
) -> str | None:
    """Why ``weight`` cannot run as a semi-structured sparse tensor (None when it can): not 2:4, a dtype the
    kernels lack, a shape off their tile multiples, or a GPU older than Ampere (``capability``)."""
    dtype = weight.dtype if dtype is None else dtype
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return f"compute capability {capability[0]}.{capability[1]} has no sparse tensor cores (needs 8.0+)"
    if dtype not in SHAPE_MULTIPLES:
        return f"{dtype} has no semi-structured kernel (float16, bfloat16, float32, int8)"
    if weight.dim() != 2:
        return "not a 2-D weight"
    rows, cols = SHAPE_MULTIPLES[dtype]
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return f"shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols}) for {dtype}"
    if not is_two_four(weight):
        return "weight is not 2:4 along its inputs"
    return None


def check_device(device: str) -> torch.device:
    """The CUDA device to compile for, or one clear error."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise PrunekitError(f"compile: device must be 'cpu' or a CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise PrunekitError(f"compile: device {device!r} asked for, but torch sees no CUDA GPU")
    capability = torch.cuda.get_device_capability(dev)
    if capability < MIN_CAPABILITY:
        raise PrunekitError(
            f"compile: {torch.cuda.get_device_name(dev)} (compute {capability[0]}.{capability[1]}) has no "
            "sparse tensor cores; 2:4 needs compute capability 8.0 or later"
        )
    return dev


class SemiStructuredLinear(nn.Module):
    """``nn.Linear`` whose 2:4 weight is a ``SparseSemiStructuredTensor`` (same output up to the GEMM's
    summation order)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        reason = semi_structured_reason(weight)
        if reason is not None:
            raise PrunekitError(f"SemiStructuredLinear: {reason}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.rtol = HALF_RTOL if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.reshape(*lead, self.out_features)


def candidates(module: nn.Module, x: Tensor) -> tuple[dict, str]:
    """``{"2:4-sparse": factory}`` for a CUDA ``nn.Linear`` that can run semi-structured, else why not."""
    if not isinstance(module, nn.Linear):
        return {}, "only nn.Linear runs on sparse tensor cores"
    capability = torch.cuda.get_device_capability(x.device)
    reason = semi_structured_reason(module.weight, capability=capability)
    if reason is not None:
        return {}, reason
    return {"2:4-sparse": lambda: SemiStructuredLinear(module)}, ""


def synchronized(fn):
    """``fn`` followed by a CUDA synchronisation, so wall-clock timing covers the kernels it launched."""

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
