"""The integer arithmetic of the C export is prunekit's one INT8 arithmetic, defined in
:mod:`prunekit.quant.rounding` (fixed-point multipliers, the half-to-even rounding shift); this module only
names what the C side uses. ``pk_rshift`` in the generated C is :func:`rshift_round` written in C99, with
the floor of a negative shift spelled out (``>>`` of a negative value is implementation-defined in C)."""

from __future__ import annotations

from prunekit.quant.rounding import MAX_SHIFT, multiplier, requantize_np, rshift_round

__all__ = ["MAX_SHIFT", "multiplier", "requantize_np", "rshift_round"]
