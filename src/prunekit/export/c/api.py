"""``export_c``: an INT8 prunekit model as a self-contained C99 library, its budget and its host check."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.export.c import reference
from prunekit.export.c.budget import budget, check_limits
from prunekit.export.c.codegen import c_name, generate
from prunekit.export.c.graph import capture
from prunekit.export.c.harness import harness_source, makefile
from prunekit.export.c.ir import IntGraph
from prunekit.export.c.lower import lower
from prunekit.export.c.storage import MODES, choose
from prunekit.files import atomic_write_text, read_sealed_json, write_sealed_json
from prunekit.quant.rounding import quantize_activation


@dataclass
class CModel:
    """A lowered model: the integer graph (with each layer's storage chosen) and its budget."""

    graph: IntGraph
    budget: dict[str, Any]
    name: str

    @property
    def input_scale(self) -> float:
        return self.graph.buffers[self.graph.input].scale

    def quantize_input(self, x: Tensor) -> np.ndarray:
        """Inputs as the C model takes them: prunekit's int8 rule at the model's input scale (N, numel)."""
        xq, _ = quantize_activation(x, torch.tensor(self.input_scale, dtype=torch.float32))
        return xq.reshape(len(x), -1).numpy()

    def run_reference(self, x: Tensor) -> np.ndarray:
        """int32 outputs of the NumPy integer reference for float inputs ``x`` (N, ...)."""
        return reference.run(self.graph, self.quantize_input(x))


def _batches(calibration: Tensor | Iterable) -> list[Tensor]:
    if isinstance(calibration, Tensor):
        calibration = [calibration]
    out = []
    for batch in calibration:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise PrunekitError("calibration must be a tensor or batches of tensors / (x, y) tuples")
        out.append(x.detach().cpu().to(torch.float32))
    if not out or not len(out[0]):
        raise PrunekitError("the C export needs calibration inputs (a non-empty batch)")
    return out


def build(
    model: nn.Module, calibration: Tensor | Iterable, *, sparse: str = "auto", name: str = "model"
) -> CModel:
    """Capture, lower and size the integer int8 ``model`` (nothing is written). ``calibration``: inputs
    of the model's shape (one is run for the shapes; the scales are the model's own)."""
    if sparse not in MODES:
        raise PrunekitError(f"sparse must be one of {', '.join(MODES)}, got {sparse!r}")
    c_name(name)
    g = lower(capture(model, _batches(calibration)[0]))
    for op in g.ops:
        if op.kind == "conv":
            op.stored, op.options = choose(op.arrays["weight"], sparse)
            op.storage = op.stored.fmt
    return CModel(g, budget(g, name, sparse), name)


@torch.no_grad()
def export_c(
    model: nn.Module,
    out: str | Path,
    *,
    calibration: Tensor | Iterable,
    test: tuple[Tensor, Tensor] | None = None,
    name: str = "model",
    sparse: str = "auto",
    flash_limit: int | None = None,
    ram_limit: int | None = None,
    min_agreement: float = 0.995,
) -> dict[str, Any]:
    """Write ``out/{name}.h``, ``{name}.c``, ``Makefile``, ``budget.json`` (and ``harness.c`` when ``test``
    = (inputs, labels) is given) for the INT8 ``model``; returns the budget with the reference's check.

    Everything is computed before the first file is written, so an unsupported operator or a model over
    ``flash_limit`` / ``ram_limit`` (bytes) is an error that leaves ``out`` untouched.
    """
    for label, limit in (("flash_limit", flash_limit), ("ram_limit", ram_limit)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise PrunekitError(f"{label} must be a positive number of bytes, got {limit!r}")
    model = model.eval()
    cm = build(model, calibration, sparse=sparse, name=name)
    check_limits(cm.graph, cm.budget, flash_limit, ram_limit)
    header, source = generate(cm.graph, name)
    files = {f"{name}.h": header, f"{name}.c": source, "Makefile": makefile(name)}
    result = {k: v for k, v in cm.budget.items() if k != "arena_offsets"}
    if test is not None:
        x, y = test
        xq = cm.quantize_input(x)
        ref = reference.run(cm.graph, xq)
        torch_out = model(x.to(torch.float32)).reshape(len(x), -1)
        torch_pred = torch_out.argmax(1).numpy()
        ref_pred = ref.argmax(1)
        labels = np.asarray(y)
        scale = torch.tensor(cm.graph.buffers[cm.graph.output].scale, dtype=torch.float32)
        same = (torch.from_numpy(ref.astype(np.float32)) * scale == torch_out).all(1)
        result["reference"] = {
            "samples": int(len(labels)),
            "torch_identical": int(same.sum()),  # outputs equal to the PyTorch int8 model's, all of them
            "agreement": float((ref_pred == torch_pred).mean()),
            "accuracy_reference": float((ref_pred == labels).mean()),
            "accuracy_torch": float((torch_pred == labels).mean()),
        }
        files["harness.c"] = harness_source(name, xq, labels, torch_pred, ref, min_agreement)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"--out {out} exists and is not a directory")
    for fname, text in files.items():
        atomic_write_text(out / fname, text)
    # the budget names the exact files it describes, and is sealed with its own SHA-256 (load_budget)
    result["files_sha256"] = {
        f: hashlib.sha256(t.encode("utf-8")).hexdigest() for f, t in sorted(files.items())
    }
    write_sealed_json(out / "budget.json", result)
    result["files"] = sorted([*files, "budget.json"])
    return result


def load_budget(out: str | Path) -> dict[str, Any]:
    """``out/budget.json`` after checking it is intact and still describes the files beside it."""
    out = Path(out)
    budget = read_sealed_json(out / "budget.json", "C export budget")
    for fname, digest in (budget.get("files_sha256") or {}).items():
        path = out / fname
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise PrunekitError(
                f"C export budget: {path} is missing or changed since the export it describes"
            )
    return budget
