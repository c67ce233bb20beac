"""What this CPU can do, read once from LLVM (the code generator numba uses), for kernels that pick their
path at run time: AVX-512 (with VNNI / BF16) where present, AVX2 + FMA otherwise.

``PRUNEKIT_CPU_FEATURES`` (comma-separated, e.g. ``avx2,fma``) overrides the detected set, so the AVX2 paths
can be exercised on an AVX-512 machine; kernels compiled for a feature the CPU lacks must never run.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class CpuFeatures:
    name: str  # LLVM's CPU name, e.g. "znver4", "haswell"
    flags: frozenset[str]  # LLVM feature names that are on, e.g. {"avx2", "fma", "avx512vnni"}

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def avx512(self) -> bool:
        """AVX-512 F/BW/VL: 16 float32 lanes, byte and word ops, and masked 256-bit ops."""
        return {"avx512f", "avx512bw", "avx512vl"} <= self.flags

    @property
    def vnni(self) -> bool:
        """The 4-way u8 x s8 -> s32 dot product (``vpdpbusd``) on 512-bit registers."""
        return self.avx512 and "avx512vnni" in self.flags

    @property
    def bf16(self) -> bool:
        return self.avx512 and "avx512bf16" in self.flags

    @property
    def vector_floats(self) -> int:
        """float32 lanes of the widest vector register the kernels use."""
        return 16 if self.avx512 else 8

    def describe(self) -> str:
        """One line for benchmark tables: the CPU model and the instruction sets that matter here."""
        sets = [s for s, on in (("AVX-512", self.avx512), ("VNNI", self.vnni), ("BF16", self.bf16)) if on]
        sets = sets or (["AVX2", "FMA"] if self.avx2 else ["no AVX2"])
        return f"{cpu_model()} ({self.name}; {', '.join(sets)})"


def cpu_model() -> str:
    """The model name /proc/cpuinfo gives (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def features() -> CpuFeatures:
    """The host's features (cached; reads ``PRUNEKIT_CPU_FEATURES`` first)."""
    import llvmlite.binding as llvm  # ships with numba; reading features compiles nothing

    override = os.environ.get("PRUNEKIT_CPU_FEATURES")
    if override is not None:
        flags = frozenset(f.strip() for f in override.split(",") if f.strip())
        return CpuFeatures("override", flags)
    host = llvm.get_host_cpu_features()
    return CpuFeatures(llvm.get_host_cpu_name(), frozenset(k for k, on in host.items() if on))
