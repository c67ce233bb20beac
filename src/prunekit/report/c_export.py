"""The report's microcontroller section (Markdown lines) from the ``c_export`` entries in the metrics."""

from __future__ import annotations

from typing import Any


def _kib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1024:.1f} KiB ({n:,} B)"


def _row(name: str, e: dict[str, Any]) -> list[str]:
    f, ram, arm = e["flash"], e["ram"], e.get("arm") or {}
    sparse = sum(1 for s in e["storage"].values() if s != "dense")
    measured = f"{arm['text']:,} / {arm['data']:,} / {arm['bss']:,}" if "text" in arm else "not built"
    return [
        name,
        f"{sparse} of {len(e['storage'])}",
        _kib(f["weights"]),
        _kib(f["total"]),
        _kib(ram["total"]),
        measured,
    ]


def c_section(metrics: dict[str, Any]) -> list[str]:
    """``## Microcontroller (C export)`` for every evaluated label with a C export; [] when there is none."""
    lines: list[str] = []
    for label, entry in metrics.items():
        e = entry.get("c_export") if isinstance(entry, dict) else None
        if not e:
            continue
        rows = ([_row(e["dense"]["label"], e["dense"])] if e.get("dense") else []) + [_row(label, e)]
        header = [
            "model",
            "sparse layers",
            "flash: weights",
            "flash: total (code estimated)",
            "RAM",
            "Cortex-M4 text / data / bss",
        ]
        lines += ["## Microcontroller (C export)", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
        if e.get("dense"):
            d = e["dense"]
            lines.append(
                f"- Flash: {label} needs {e['flash']['total'] / d['flash']['total']:.2f}x of {d['label']} "
                f"(weights {e['flash']['weights'] / max(1, d['flash']['weights']):.2f}x: sparse layers are "
                "stored as CSR where that is smaller). RAM: "
                f"{e['ram']['total']:,} B against {d['ram']['total']:,} B (unstructured sparsity does not "
                "shrink activations)."
            )
        host, ref = e.get("host_check") or {}, e["reference"]
        if "last_line" in host:
            lines.append(
                f"- Host check (`make -C {e['dir']} check`, gcc -std=c99 -Wall -Wextra -Werror -O2): "
                f"{host['bitexact']}/{host['samples']} outputs bit-exact with the NumPy integer reference; "
                f"predictions agree with PyTorch INT8 on {100 * host['agreement']:.2f}% of the test set "
                f"(accuracy C {100 * host['accuracy_c']:.2f}%, PyTorch {100 * host['accuracy_torch']:.2f}%)."
            )
        else:
            lines.append(
                f"- Host check not run ({host.get('skipped', 'no result')}); the NumPy reference agrees with "
                f"PyTorch INT8 on {100 * ref['agreement']:.2f}% of the test set."
            )
        arm = e.get("arm") or {}
        lines.append(
            f"- Cortex-M4: `arm-none-eabi-size` of `{arm['object']}` ({arm['flags']})."
            if "text" in arm
            else f"- Cortex-M4 build skipped: {arm.get('skipped', 'no result')}."
        )
        lines.append("")
    return lines
