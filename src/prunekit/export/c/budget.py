"""Flash and RAM budgets of the exported C model, and the activation arena laid out by liveness.

RAM: one static arena holds every activation; a buffer lives from the operator that writes it to the
last one that reads it (the model output to the end), and buffers whose lifetimes overlap never share
bytes. Offsets come from a greedy first fit, largest buffer first, each 4-byte aligned. Convolutions
also use one int32 scratch row of ``OH * OW`` accumulators (the largest layer's). The input is read
from the caller's array, so it is not in the arena. RAM = arena + scratch: exactly the ``.bss`` of the
compiled model (checked by the tests with ``size``).

Flash: per layer the stored weights (:mod:`prunekit.export.c.storage`) and the per-channel constants
(int32 multiplier, int8 shift, int64 bias: 13 bytes per output channel; a 256-byte table for
hard-swish), plus an estimate of the
code: the kernels the model uses and each operator's descriptor and call (numbers measured with
arm-none-eabi-gcc 12, ``-mcpu=cortex-m4 -mthumb -Os``; the export also reports the measured
``arm-none-eabi-size`` when the cross compiler is present).
"""

from __future__ import annotations

from typing import Any

from prunekit.errors import PrunekitError
from prunekit.export.c.ir import IntGraph

ALIGN = 4
# bytes of code per kernel and per operator (descriptor + call), measured on Cortex-M4 -Os (module doc)
KERNEL_CODE = {"conv": 520, "add": 80, "requant": 60, "lut": 30, "maxpool": 200, "avgpool": 200, "widen": 30}
COMMON_CODE = 200  # pk_rshift, pk_clamp, the run functions
OP_CODE = {"conv": 80, "add": 40, "requant": 36, "lut": 24, "maxpool": 52, "avgpool": 52, "widen": 16}


def lifetimes(g: IntGraph) -> dict[str, tuple[int, int]]:
    """Root buffer -> (first op writing it, last op reading it); the output lives to the end."""
    life: dict[str, list[int]] = {}
    for i, op in enumerate(g.ops):
        for name in op.inputs:
            root = g.root(name)
            if not g.buffers[root].external:
                life.setdefault(root, [i, i])[1] = i
        root = g.root(op.output)
        span = life.setdefault(root, [i, i])
        span[0] = min(span[0], i)
    life[g.root(g.output)][1] = len(g.ops)
    return {k: (v[0], v[1]) for k, v in life.items()}


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_arena(g: IntGraph) -> tuple[dict[str, int], int]:
    """(offset of every root buffer, arena bytes)."""
    life = lifetimes(g)
    placed: list[tuple[int, int, tuple[int, int]]] = []  # offset, size, lifetime
    offsets: dict[str, int] = {}
    for name in sorted(life, key=lambda b: (-g.buffers[b].nbytes, life[b][0], b)):
        size, span = _aligned(g.buffers[name].nbytes), life[name]
        clashes = sorted(
            (off, sz) for off, sz, other in placed if not (other[1] < span[0] or span[1] < other[0])
        )
        offset = 0
        for off, sz in clashes:
            if offset + size <= off:
                break
            offset = max(offset, off + sz)
        offsets[name] = offset
        placed.append((offset, size, span))
    return offsets, max((off + sz for off, sz, _ in placed), default=0)


def scratch_words(g: IntGraph) -> int:
    return max((op.params["oh"] * op.params["ow"] for op in g.ops if op.kind == "conv"), default=0)


def layer_flash(op) -> tuple[int, int]:
    """(weight bytes as stored, constant bytes) of one operator."""
    if op.kind == "conv":
        return op.stored.nbytes, sum(op.arrays[k].nbytes for k in ("mult", "shift", "bias") if k in op.arrays)
    return 0, op.arrays["table"].nbytes if "table" in op.arrays else 0


def budget(g: IntGraph, name: str, sparse: str) -> dict[str, Any]:
    offsets, arena = plan_arena(g)
    scratch = 4 * scratch_words(g)
    life = lifetimes(g)
    rows = []
    for i, op in enumerate(g.ops):
        live = sum(_aligned(g.buffers[b].nbytes) for b, (a, z) in life.items() if a <= i <= z)
        weights, consts = layer_flash(op)
        row = {
            "layer": op.name,
            "op": op.kind,
            "storage": op.storage or None,
            "weight_bytes": weights,
            "const_bytes": consts,
            "output_bytes": g.buffers[op.output].nbytes,
            "live_ram_bytes": live + (scratch if op.kind == "conv" else 0),
        }
        if op.kind == "conv":
            w = op.arrays["weight"]
            row.update(
                nonzero=int((w != 0).sum()),
                params=int(w.size),
                options=op.options,
                dense_weight_bytes=int(w.size),
            )
        rows.append(row)
    kinds = {op.kind for op in g.ops}
    code = COMMON_CODE + sum(KERNEL_CODE[k] for k in kinds) + sum(OP_CODE[op.kind] for op in g.ops)
    weights = sum(r["weight_bytes"] for r in rows)
    consts = sum(r["const_bytes"] for r in rows)
    return {
        "name": name,
        "sparse": sparse,
        "layers": rows,
        "flash": {
            "weights": weights,
            "constants": consts,
            "code_estimate": code,
            "total": weights + consts + code,
            "weights_if_dense": sum(r.get("dense_weight_bytes", 0) for r in rows),
        },
        "ram": {
            "arena": arena,
            "scratch": scratch,
            "total": arena + scratch,
            "peak_live": max((r["live_ram_bytes"] for r in rows), default=0),
        },
        "arena_offsets": offsets,
    }


def check_limits(g: IntGraph, b: dict[str, Any], flash_limit: int | None, ram_limit: int | None) -> None:
    """One-line errors when the model does not fit (before anything is written)."""
    if ram_limit is not None:
        for op in g.ops:
            out = g.buffers[op.output]
            if out.nbytes > ram_limit:
                raise PrunekitError(
                    f"layer '{op.name}' ({op.kind}): its output buffer alone is {out.nbytes:,} bytes, over "
                    f"--ram-limit {ram_limit:,}; no arena layout can fit it (shrink the layer or its input)"
                )
        if b["ram"]["total"] > ram_limit:
            raise PrunekitError(
                f"the model needs {b['ram']['total']:,} bytes of RAM (arena {b['ram']['arena']:,} + scratch "
                f"{b['ram']['scratch']:,}), over --ram-limit {ram_limit:,}"
            )
    if flash_limit is not None and b["flash"]["total"] > flash_limit:
        f = b["flash"]
        raise PrunekitError(
            f"the model needs about {f['total']:,} bytes of flash (weights {f['weights']:,} + constants "
            f"{f['constants']:,} + code ~{f['code_estimate']:,}), over --flash-limit {flash_limit:,}"
            + ("; try --sparse auto" if b["sparse"] == "never" else "")
        )


def table(b: dict[str, Any]) -> list[str]:
    """The budget as aligned text lines (the CLI prints them)."""
    head = f"{'layer':<28} {'op':<8} {'storage':<7} {'weights':>8} {'dense':>8} {'consts':>7} {'live RAM':>9}"
    lines = [head, "-" * len(head)]
    for r in b["layers"]:
        dense = r.get("dense_weight_bytes")
        lines.append(
            f"{r['layer'][:28]:<28} {r['op']:<8} {r['storage'] or '-':<7} {r['weight_bytes']:>8,} "
            f"{'-' if dense is None else f'{dense:,}':>8} {r['const_bytes']:>7,} {r['live_ram_bytes']:>9,}"
        )
    f, ram = b["flash"], b["ram"]
    lines += [
        "-" * len(head),
        f"flash: weights {f['weights']:,} B (dense would be {f['weights_if_dense']:,} B) + constants "
        f"{f['constants']:,} B + code ~{f['code_estimate']:,} B = {f['total']:,} B",
        f"RAM: arena {ram['arena']:,} B + conv scratch {ram['scratch']:,} B = {ram['total']:,} B "
        f"(peak live {ram['peak_live']:,} B)",
    ]
    return lines
