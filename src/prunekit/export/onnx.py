"""ONNX export of dense, masked and structurally pruned models, checked with onnxruntime.

Exporter: ``torch.onnx.export(dynamo=True)`` by default. It is PyTorch's maintained path (the TorchScript
exporter is deprecated since 2.9 and warns), works offline, keeps parameter names as initializer names
(so zero counts can be matched tensor by tensor) and handles prunekit's ``HeadPrunedMultiheadAttention``.
Two traps of that exporter are handled here rather than left to users:

* ``torch.export`` specializes dimensions of size 0 and 1, so a batch-1 example gives a graph that only
  runs at batch 1 even with the batch axis declared dynamic (seen with ``nn.TransformerEncoderLayer``).
  The trace therefore uses the example repeated to batch 2, and the file is checked at two batch sizes.
* It writes weights to a side file (``model.onnx.data``) by default and silently falls back to opset 18
  when asked for an older opset it cannot convert to; we keep small models in one file and refuse a
  result whose opset differs from the one asked for.

``exporter="torchscript"`` remains available for models that ``torch.export`` cannot trace
(data-dependent Python control flow).

INT8 models (static activations) are exported as standard QDQ ONNX (:mod:`prunekit.export.qdq`: int8
per-channel weights, int32 biases, ``QuantizeLinear``/``DequantizeLinear`` at every int8 tensor with
prunekit's own scales) and checked against prunekit's int8 model in quantization steps: onnxruntime's
output must be within ``int8_steps`` steps (``max|output| / 127``) of prunekit's. It is equal except
where onnxruntime's float32 requantization rounds a near-tie the other way (docs/onnx.md).

The file is written to a temporary directory next to ``path``, fsynced (with its side file, if any),
verified there, and only then renamed into place: a failed export or verification leaves no file and
does not touch an existing one. A ``<path>.data`` left by an earlier export with external data is
removed once a single-file export is in place (the new file does not read it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError
from prunekit.export import qdq
from prunekit.masking import squash
from prunekit.quant.layers import QuantizedConv2d, QuantizedLayer, QuantizedLinear
from prunekit.quant.rounding import activation_scale

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
# protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself
_EXTERNAL_DATA_BYTES = 1_800_000_000
# loggers of the exporter stack that report harmless steps at WARNING (missing torchvision ops, skipped
# constant folding); raised to ERROR only while an export runs
_NOISY_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


def _require_onnx():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise PrunekitError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({exc.name} is missing): "
            'pip install "prunekit[onnx]"'
        ) from None
    return onnx, onnxruntime


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        kinds = ", ".join(type(t).__name__ for t in inputs) or "nothing"
        raise PrunekitError(f"example_inputs must be a tensor or a tuple of tensors, got {kinds}")
    return tuple(t.detach().cpu() for t in inputs)


def _flatten(output: Any) -> list[torch.Tensor]:
    """The model's output as the flat list of tensors ONNX returns (None outputs are dropped)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _flatten(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _flatten(item)]
    if output is None:
        return []
    raise PrunekitError(f"the model returned a {type(output).__name__}; ONNX export needs tensors")


def _names(given: Sequence[str] | None, count: int, stem: str, field: str) -> list[str]:
    if given is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(given)
    if len(names) != count or len(set(names)) != count or not all(isinstance(n, str) and n for n in names):
        raise PrunekitError(f"{field} must be {count} distinct non-empty names, got {names!r}")
    return names


def _batch_of(inputs: tuple[torch.Tensor, ...]) -> int:
    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise PrunekitError(
            f"dynamic_batch=True needs dimension 0 of every input to be the batch, got shapes {shapes}; "
            "pass dynamic_batch=False"
        )
    return sizes.pop()


def _rebatch(inputs: tuple[torch.Tensor, ...], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The example at another batch size: its rows repeated cyclically, float inputs perturbed so the
    rows differ (identical rows would hide an export that mixes samples of a batch)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        rows = t[torch.arange(batch) % t.shape[0]].clone()
        if rows.is_floating_point() and batch > t.shape[0]:
            scale = float(t.float().std()) if t.numel() > 1 else 1.0
            noise = torch.randn(rows[t.shape[0] :].shape, generator=gen) * (0.1 * (scale or 1.0))
            rows[t.shape[0] :] += noise.to(rows.dtype)
        out.append(rows)
    return tuple(out)


@contextlib.contextmanager
def _inference_copy(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with masks squashed into plain weights; the caller's model is untouched.

    A masked model is deep-copied and squashed (the copy, not the original, loses its parametrizations);
    an unmasked one is only switched to eval and back, so exporting a large model does not double memory.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        work = squash(copy.deepcopy(model))
        if any(parametrize.is_parametrized(m) for m in work.modules()):
            raise PrunekitError(
                "the model has parametrizations other than prunekit masks; remove them before export"
            )
        yield work.eval()
        return
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # one "batch" Dim shared by all inputs is what we mean; the exporter warns that it is shared
            warnings.filterwarnings(
                "ignore", message=r".*shares the same shape constraints", category=UserWarning
            )
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _int8_layers(model: nn.Module) -> list[str]:
    """Names of prunekit INT8 modules (or other modules holding int8 tensors) in ``model``."""

    return [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, (QuantizedLinear, QuantizedConv2d))
        or any(t.dtype == torch.int8 for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    ]


def _check_int8(model: nn.Module) -> None:
    """An INT8 model exports as QDQ when every module holding int8 tensors is a prunekit int8 module with
    static activations; anything else is refused up front, in one line."""
    foreign = [
        name
        for name, m in model.named_modules()
        if type(m) not in qdq.TWINS
        and any(t.dtype == torch.int8 for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    ]
    dynamic = [n for n, m in model.named_modules() if isinstance(m, QuantizedLayer) and m.act_scale is None]
    if foreign or dynamic:
        names = (foreign or dynamic)[:3]
        what = "int8 tensors outside prunekit's int8 layers" if foreign else "dynamic activations"
        raise PrunekitError(
            f"{type(model).__name__} is an INT8 model with {what} ({', '.join(names)}); {INT8_HINT}"
        )


INT8_HINT = (
    "ONNX QDQ export takes prunekit INT8 models with static (calibrated) activations: quantize with "
    "activations='static' and calibration data, or export the float model it was quantized from"
)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:400]


def _strip_node_metadata(model_ir) -> None:
    """Drop the dynamo exporter's per-node debug records (Python stack traces with the exporting
    machine's file paths, FX node text, module scopes): over half of a small model's file, and nothing
    a runtime reads."""
    from onnx_ir.traversal import RecursiveGraphIterator

    for node in RecursiveGraphIterator(model_ir.graph):
        node.metadata_props.clear()


def _write(
    model,
    inputs,
    tmp_file: Path,
    *,
    exporter,
    opset,
    dynamic_batch,
    names_in,
    names_out,
    external,
    debug_info,
):
    trace_inputs = inputs
    if dynamic_batch and inputs[0].shape[0] < 2:  # see the module docstring: size-1 dims get specialized
        trace_inputs = _rebatch(inputs, 2, seed=1)
    common = dict(input_names=names_in, output_names=names_out, opset_version=opset, verbose=False)
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
                program = torch.onnx.export(model, trace_inputs, dynamo=True, dynamic_shapes=shapes, **common)
                if not debug_info:
                    _strip_node_metadata(program.model)
                program.save(str(tmp_file), external_data=external)
            else:
                axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
                torch.onnx.export(
                    model, trace_inputs, str(tmp_file), dynamo=False, dynamic_axes=axes, **common
                )
    except PrunekitError:
        raise
    except Exception as exc:  # the exporters raise many types; the user needs the cause in one line
        log.debug("ONNX export failed", exc_info=True)
        hints = ["dynamic_batch=False"] if dynamic_batch else []
        hints += ["exporter='torchscript'"] if exporter == "dynamo" else []
        hint = f" (try {' or '.join(hints)})" if hints else ""
        raise PrunekitError(
            f"ONNX export of {type(model).__name__} failed with the {exporter} exporter{hint}: "
            f"{_root_cause(exc)}"
        ) from None
    for f in tmp_file.parent.iterdir():  # the model and any side file on disk before the rename
        with open(f, "rb+") as handle:
            os.fsync(handle.fileno())


def _remove_stale_side_file(path: Path, files: list[Path]) -> None:
    """An earlier export with external data left ``<path>.data``; the new file, now in place, does not
    read it, so it goes (a reader would otherwise take the stale weights for this model's)."""
    stale = path.parent / f"{path.name}.data"
    if stale.name not in {f.name for f in files} and stale.is_file():
        stale.unlink()
        log.info("removed %s: a side file of an earlier export that %s does not use", stale, path.name)


def count_zero_weights(model: nn.Module) -> int:
    """Exact zeros in the model's weight matrices and kernels (floating-point parameters with >= 2 dims:
    what pruning removes; 1-D BatchNorm parameters are left out because exporters fold them into convs)."""
    return sum(int((p == 0).sum()) for p in model.parameters() if p.is_floating_point() and p.dim() >= 2)


def _onnx_weights(proto) -> list[tuple[str, Any]]:
    """``(name, array)`` of the float initializers and constants with >= 2 dims: where weights live."""
    from onnx import numpy_helper

    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value" and a.t.dims]
    out = []
    for t in tensors:
        if len(t.dims) < 2:
            continue
        array = numpy_helper.to_array(t)
        if np.issubdtype(array.dtype, np.floating):
            out.append((t.name, array))
    return out


def _match_zero_weights(model: nn.Module, weights: list[tuple[str, Any]]) -> dict[str, Any]:
    """Match every model weight tensor holding exact zeros to one tensor of the file, each file tensor used
    once: by name (same size), else (exporters rename, e.g. the TorchScript one's ``onnx::Conv_12``) by
    shape and identical values, else by shape with zeros at least at every zero position of the model's
    (a BatchNorm folded into a conv scales its channels: values change, zeros stay put). A name match with
    fewer zeros is an error; a tensor left unmatched makes ``preserved`` False and is listed."""

    by_name = {name: i for i, (name, _) in enumerate(weights) if name}  # Constant tensors may be unnamed
    params = [(n, p.detach()) for n, p in model.named_parameters() if p.is_floating_point() and p.dim() >= 2]
    lost, by_value, used, pending = [], [], set(), []  # used: indices into weights
    for name, p in params:
        zeros = int((p == 0).sum())
        index = by_name.get(name)
        if index is not None and weights[index][1].size == p.numel():
            used.add(index)
            if int((weights[index][1] == 0).sum()) < zeros:
                lost.append(name)
        elif zeros:
            pending.append((name, p.float().numpy()))
    for exact in (True, False):  # identical values first, so a zero-position match cannot take their tensor
        left = []
        for name, w in pending:
            hit = next(
                (
                    i
                    for i, (_, a) in enumerate(weights)
                    if i not in used
                    and a.shape == w.shape
                    and (np.array_equal(a, w) if exact else bool(np.all(a[w == 0] == 0)))
                ),
                None,
            )
            if hit is None:
                left.append((name, w))
            else:
                used.add(hit)
                by_value.append(name)
        pending = left
    unmatched = [name for name, _ in pending]
    return {
        "model": sum(int((p == 0).sum()) for _, p in params),
        "onnx": sum(int((a == 0).sum()) for _, a in weights),
        "matched_tensors": sum(1 for name, _ in params if name in by_name),
        "matched_renamed": sorted(by_value),
        "unmatched": unmatched,
        "preserved": not lost and not unmatched,
        "_lost": lost,
    }


def _check(session, model, inputs, names_in, tolerance: dict) -> tuple[list[float], list[float]]:
    """Max abs difference per output between onnxruntime and PyTorch, and that difference in int8 steps
    (``max|expected| / 127``); a mismatch beyond ``tolerance`` (``rtol``/``atol``, or ``int8_steps``) is a
    PrunekitError."""

    with torch.no_grad():
        expected = [t.detach().cpu() for t in _flatten(model(*inputs))]
    got = session.run(None, {n: t.numpy() for n, t in zip(names_in, inputs)})
    outputs = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        raise PrunekitError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
    batch = tuple(inputs[0].shape)
    diffs, steps = [], []
    for name, onnx_out, ref in zip(outputs, got, expected):
        ref = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
        if onnx_out.shape != ref.shape:
            raise PrunekitError(
                f"ONNX output '{name}' has shape {onnx_out.shape}, PyTorch {ref.shape} (input {batch})"
            )
        diff = float(np.abs(onnx_out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
        top = float(np.abs(ref).max()) if ref.size else 0.0
        step = float(activation_scale(torch.tensor(top, dtype=torch.float32)))
        if "int8_steps" in tolerance:
            if not diff <= tolerance["int8_steps"] * step:
                raise PrunekitError(
                    f"ONNX output '{name}' differs from prunekit's int8 model by {diff / step:.2f} int8 "
                    f"steps (step {step:.3g} = max|output| / 127) at input shape {batch}; allowed: "
                    f"{tolerance['int8_steps']:g} (int8_steps)"
                )
        elif not np.allclose(onnx_out, ref, rtol=tolerance["rtol"], atol=tolerance["atol"], equal_nan=True):
            raise PrunekitError(
                f"ONNX output '{name}' differs from PyTorch by up to {diff:.3g} at input shape {batch} "
                f"(allowed: atol {tolerance['atol']:g} + rtol {tolerance['rtol']:g} x |expected|)"
            )
        diffs.append(diff)
        steps.append(diff / step)
    return diffs, steps


def _int8_zeros(onnx, tmp_file: Path, model: nn.Module) -> dict[str, Any]:
    """Exact zeros of the int8 weights in the model and in the file's int8 initializers (>= 2 dims)."""
    from onnx import numpy_helper

    proto = onnx.load(str(tmp_file))
    in_file = [numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) >= 2]
    in_file = [a for a in in_file if a.dtype == np.int8]
    weights = [m.weight_q for m in model.modules() if isinstance(m, QuantizedLayer)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {
        "weights": len(weights),
        "zeros_model": zeros,
        "zeros_onnx": sum(int((a == 0).sum()) for a in in_file),
        "preserved": len(in_file) == len(weights) and sum(int((a == 0).sum()) for a in in_file) == zeros,
    }


def _validate(path: Path, opset, exporter, rtol, atol) -> None:
    if exporter not in EXPORTERS:
        raise PrunekitError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise PrunekitError(f"opset must be an integer >= 7 or None (the exporter's default), got {opset!r}")
    for field, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PrunekitError(f"{field} must be a number >= 0, got {value!r}")
    if path.is_dir():
        raise PrunekitError(f"path {path} is a directory; give a file name such as model.onnx")


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    exporter: str = "dynamo",
    external_data: bool | None = None,
    debug_info: bool = False,
    int8_steps: float = 1.0,
) -> dict[str, Any]:
    """Export ``model`` (dense, masked or structurally pruned) to one ONNX file and check it.

    ``example_inputs``: a tensor or tuple of tensors on which the model runs (CPU). ``dynamic_batch``
    makes dimension 0 of every input and output symbolic. ``verify`` runs the file with onnxruntime
    (CPUExecutionProvider) on the example and, with a dynamic batch, on a second batch size, and
    requires ``|onnx - torch| <= atol + rtol * |torch|`` for every output. ``external_data``: weights in
    ``<path>.data`` (None: only when the weights approach protobuf's 2 GiB limit). ``debug_info`` keeps
    the dynamo exporter's per-node stack traces and FX records (dropped by default: they hold local
    source paths and dominate small files).

    Returns a report: path, files, size_bytes, opset, exporter, input/output names, batch sizes checked,
    max_abs_diff (overall and per output), rtol, atol and zero_weights (exact zeros in the model's weight
    tensors vs in the ONNX initializers; ``preserved`` only if every model weight tensor holding zeros
    has a tensor in the file holding them, found by name or, renamed, by shape and values or zero
    positions; the others are listed in ``unmatched``).

    An INT8 model (:mod:`prunekit.quant` with static activations) is written as QDQ ONNX and verified
    against prunekit's int8 model: each output within ``int8_steps`` int8 steps (``max|output| / 127``);
    the report's ``int8`` entry has the steps measured and the int8 weights' zeros (module docstring).
    Dynamic activations, or int8 tensors outside prunekit's layers, are refused before anything is traced.
    """
    onnx, ort = _require_onnx()
    path = Path(path)
    _validate(path, opset, exporter, rtol, atol)
    if isinstance(int8_steps, bool) or not isinstance(int8_steps, (int, float)) or not int8_steps >= 0:
        raise PrunekitError(f"int8_steps must be a number >= 0, got {int8_steps!r}")
    inputs = _as_inputs(example_inputs)
    int8 = bool(_int8_layers(model))
    if int8:
        _check_int8(model)
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        raise PrunekitError("export_onnx runs on the CPU: move the model there first (model.cpu())")
    base_batch = _batch_of(inputs) if dynamic_batch else None
    with _inference_copy(model) as prunekit_model:
        # an INT8 model is written as its QDQ twin and checked against itself, in quantization steps
        work = qdq.qdq_twin(prunekit_model) if int8 else prunekit_model
        tolerance = {"int8_steps": float(int8_steps)} if int8 else {"rtol": rtol, "atol": atol}
        with torch.no_grad():
            try:
                reference = _flatten(work(*inputs))
            except PrunekitError:
                raise
            except Exception as exc:
                raise PrunekitError(f"the model does not run on example_inputs: {_root_cause(exc)}") from None
        names_in = _names(input_names, len(inputs), "input", "input_names")
        names_out = _names(output_names, len(reference), "output", "output_names")
        weight_bytes = sum(p.numel() * p.element_size() for p in work.parameters())
        external = weight_bytes > _EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tmp_file = tmp_dir / path.name
            _write(
                work,
                inputs,
                tmp_file,
                exporter=exporter,
                opset=opset,
                dynamic_batch=dynamic_batch,
                names_in=names_in,
                names_out=names_out,
                external=external,
                debug_info=debug_info,
            )
            report = _inspect(onnx, tmp_file, work, opset, exporter)
            if int8:
                report["int8"] = _int8_zeros(onnx, tmp_file, prunekit_model)
            batches, report["max_abs_diff"], report["max_abs_diff_per_output"] = [], None, None
            if verify:
                batches, diffs, steps = _verify(
                    ort, tmp_file, prunekit_model, inputs, names_in, base_batch, tolerance
                )
                report["max_abs_diff_per_output"] = dict(zip(names_out, diffs))
                report["max_abs_diff"] = max(diffs, default=0.0)
                if int8:
                    report["int8"]["max_steps_per_output"] = dict(zip(names_out, steps))
                    report["int8"]["max_steps"] = max(steps, default=0.0)
            files = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)  # the model file last
            for f in files:  # side files first, so a model file in place always finds its weights
                os.replace(f, path.parent / f.name)
            _remove_stale_side_file(path, files)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    report.update(
        path=str(path),
        files=[str(path.parent / f.name) for f in files],
        size_bytes=sum((path.parent / f.name).stat().st_size for f in files),
        dynamic_batch=bool(dynamic_batch),
        input_names=names_in,
        output_names=names_out,
        verified=bool(verify),
        batch_sizes=batches,
        rtol=rtol,
        atol=atol,
        quantized="int8 (QDQ)" if int8 else None,
    )
    log.info(
        "wrote %s (%d bytes, opset %d); max abs diff vs PyTorch %s",
        path,
        report["size_bytes"],
        report["opset"],
        report["max_abs_diff"] if verify else "not checked",
    )
    return report


def _inspect(onnx, tmp_file: Path, model: nn.Module, opset: int | None, exporter: str) -> dict[str, Any]:
    """Opset and zero counts of the written file; refuses an opset other than the one asked for and a
    weight tensor with fewer exact zeros in the file than in the model."""
    proto = onnx.load(str(tmp_file))  # with its external data, if any: the weights as written
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise PrunekitError(
            f"the {exporter} exporter could not produce opset {opset} (it wrote opset {written}); "
            "choose another opset (18 and newer are the exporter's own) or leave it unset"
        )
    zero_weights = _match_zero_weights(model, _onnx_weights(proto))
    lost = zero_weights.pop("_lost")
    if lost:  # the same tensor, by name and size, with fewer zeros: sparsity lost on the way
        raise PrunekitError(
            f"the ONNX file lost exact zeros in {', '.join(lost[:3])}: {zero_weights['onnx']} zeros in its "
            f"initializers, {zero_weights['model']} in the model"
        )
    if zero_weights["unmatched"]:  # e.g. parameters the forward never uses are not exported at all
        names = zero_weights["unmatched"]
        log.warning(
            "%d weight tensor(s) with exact zeros have no tensor in the ONNX file holding those zeros: %s",
            len(names),
            ", ".join(names[:5]) + (", ..." if len(names) > 5 else ""),
        )
    return {"opset": written, "exporter": exporter, "zero_weights": zero_weights}


def _verify(ort, tmp_file, model, inputs, names_in, base_batch, tolerance):
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    try:
        session = ort.InferenceSession(str(tmp_file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PrunekitError(f"onnxruntime cannot load the exported model: {_root_cause(exc)}") from None
    runs = [inputs]
    if base_batch is not None:  # another size than both the example and the trace (2)
        runs.append(_rebatch(inputs, base_batch + 2, seed=2))
    diffs = steps = None
    for run in runs:
        try:
            d, st = _check(session, model, run, names_in, tolerance)
        except PrunekitError:
            raise
        except Exception as exc:  # onnxruntime failing at another batch size: the batch was baked in
            hint = "; the model may fix its batch size: pass dynamic_batch=False" if run is not inputs else ""
            raise PrunekitError(
                f"onnxruntime failed at input shape {tuple(run[0].shape)}: {_root_cause(exc)}{hint}"
            ) from None
        diffs = d if diffs is None else [max(a, b) for a, b in zip(diffs, d)]
        steps = st if steps is None else [max(a, b) for a, b in zip(steps, st)]
    return [int(run[0].shape[0]) for run in runs], diffs, steps
