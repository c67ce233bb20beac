"""``compile``: swap a model's Linear/Conv2d layers (float32 or prunekit int8) for sparse kernels where that
is measured to be faster on this machine, layer by layer, and keep dense everywhere else.

How it decides, per layer: one forward pass of ``example_inputs`` records each layer's real input (forward
hooks); then the dense layer and every sparse candidate run on that input, interleaved (every round in a
shuffled order), after a warm-up that also absorbs numba's JIT compilation (timed separately and
logged). A candidate wins only when its median is at least ``margin`` below the dense median and its
output matches the dense one (float32: within 1e-4 of the output's largest magnitude; int8: bit for
bit). So a compiled model is never slower than dense layer by layer, up to timing noise at the margin,
and the decisions are kept in a :class:`RuntimeReport` at ``compiled.runtime_report``.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError
from prunekit.masking import squash, type_name
from prunekit.quant.layers import QuantizedConv2d, QuantizedLinear
from prunekit.runtime.formats import int8_row_bound

log = logging.getLogger(__name__)

FLOAT_RTOL = 1e-4


@dataclass
class LayerDecision:
    """One row of the decision table."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    sparsity: float
    input_shape: tuple[int, ...] | None
    dense_us: float | None = None
    sparse_us: float | None = None  # the best sparse candidate's median
    chosen: str = "dense"
    candidates: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    jit_s: float = 0.0
    engine: str = ""  # what ran the chosen kernel (torch, prunekit's kernels and their instruction set)

    @property
    def speedup(self) -> float | None:
        if self.dense_us is None or self.chosen == "dense":
            return 1.0 if self.dense_us is not None else None
        return self.dense_us / self.candidates[self.chosen]


@dataclass
class RuntimeReport:
    """The per-layer decisions of one :func:`compile` call."""

    layers: list[LayerDecision]
    threads: int
    margin: float
    cold: bool = False  # timed with the caches flushed before every call
    device: str = "cpu"
    mode: str = "per-layer"  # "per-layer", or "segments" (whole network in the plane layout)
    whole: dict[str, float] = field(default_factory=dict)  # whole-model medians (us) behind ``mode``
    note: str = ""
    macs_remaining: float | None = None  # multiply-adds of the nonzero weights / dense, over all layers timed
    # integer operators of an integer int8 model (prunekit.quant.glue) moved onto numba kernels: name ->
    # kernel (each checked bit for bit on its recorded input)
    operators: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        head = (
            f"{'layer':<28} {'kind':<16} {'weight':<16} {'sparsity':>8} {'input':<18} "
            f"{'dense us':>9} {'sparse us':>9} {'chosen':<10} {'engine':<30} note"
        )
        how = f"{self.threads} thread(s), margin {self.margin:.0%}" + (", cold caches" if self.cold else "")
        device = "" if self.device == "cpu" else ", " + self.device
        whole = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in self.whole.items())
        lines = [f"runtime decisions ({how}{device}, mode {self.mode})"]
        if whole:
            lines.append(f"whole model p50: {whole}")
        if self.macs_remaining is not None:
            lines.append(
                f"multiply-adds remaining (nonzero weights x positions / dense): {self.macs_remaining:.1%}"
            )
        if self.note:
            lines.append(self.note)
        lines.append(head)
        for d in self.layers:
            dense = "-" if d.dense_us is None else f"{d.dense_us:.1f}"
            sparse = "-" if d.sparse_us is None else f"{d.sparse_us:.1f}"
            shape = "x".join(map(str, d.weight_shape))
            inp = "-" if d.input_shape is None else "x".join(map(str, d.input_shape))
            lines.append(
                f"{d.name[:28]:<28} {d.kind:<16} {shape:<16} {d.sparsity:>8.1%} {inp:<18} "
                f"{dense:>9} {sparse:>9} {d.chosen:<10} {d.engine[:30]:<30} {d.reason}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def report(model: nn.Module) -> RuntimeReport:
    """The decision table of a model returned by :func:`compile`."""
    found = getattr(model, "runtime_report", None)
    if not isinstance(found, RuntimeReport):
        raise PrunekitError("this model was not made by prunekit.runtime.compile (no runtime_report)")
    return found


_TARGETS = (nn.Linear, nn.Conv2d, QuantizedLinear, QuantizedConv2d)


def _is_target(module: nn.Module) -> bool:
    """A layer compile may replace: the classes above, and Hugging Face's ``Conv1D`` (GPT-2's linear)."""
    return isinstance(module, _TARGETS) or type_name(module) == "Conv1D"


def _kind(module: nn.Module) -> str:
    for cls in (QuantizedLinear, QuantizedConv2d, nn.Linear, nn.Conv2d):
        if isinstance(module, cls):
            return cls.__name__
    return type(module).__name__


def _weight(module: nn.Module) -> Tensor:
    if type_name(module) == "Conv1D":
        return module.weight.detach().T  # stored (in, out)
    return module.weight_q if isinstance(module, (QuantizedLinear, QuantizedConv2d)) else module.weight


def _capture(model: nn.Module, example_inputs) -> dict[str, Tensor]:
    """Each target layer's input from one forward pass (the first call when a layer runs more than once)."""
    inputs: dict[str, Tensor] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if name not in inputs and args and isinstance(args[0], Tensor):
                inputs[name] = args[0].detach().clone()  # clone: later in-place ops must not change it

        return record

    for name, module in model.named_modules():
        if _is_target(module):
            handles.append(module.register_forward_hook(hook(name)))
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    except Exception as exc:
        raise PrunekitError(
            f"compile: example_inputs do not run the model ({type(exc).__name__}: {exc}); pass a tensor, a "
            "tuple of positional inputs or a dict of keyword inputs that model(...) accepts"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return inputs


@dataclass(frozen=True)
class DecodeOptions:
    """What the batch-1 (decode) kernels may do to a Linear layer (:mod:`prunekit.runtime.gemv`)."""

    values: str = "float32"  # float32 | bfloat16 | int8 (weight-only, per-row scales)
    activations: str = "float32"  # float32 | int8 (dynamic per-tensor, with int8 values on block layouts)

    @property
    def exact_weights(self) -> bool:
        return self.values == "float32" and self.activations == "float32"


def _batch1_linear(module: nn.Module, x: Tensor) -> bool:
    return (
        (isinstance(module, nn.Linear) or type_name(module) == "Conv1D")
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() >= 1
        and x.numel() == x.shape[-1]
    )


def _candidates(
    module: nn.Module, x: Tensor, decode: DecodeOptions = DecodeOptions()
) -> tuple[dict[str, Callable[[], nn.Module]], str]:
    """Sparse candidates worth timing for this layer and input, as factories; plus why there are none."""
    from prunekit.runtime import layers as L

    if x.device.type == "cuda":
        from prunekit.runtime import cuda

        return cuda.candidates(module, x)
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return {}, f"input is {x.dtype} on {x.device} (the kernels are CPU float32)"
    if _batch1_linear(module, x):  # one activation vector: the decode kernels
        from prunekit.runtime import gemv

        # (the earlier "rows" CSR kernel is not offered here: csr4 does the same with fewer loads)
        return gemv.candidates(module, decode.values, decode.activations), ""
    if type_name(module) == "Conv1D":
        return {}, "Conv1D runs sparse kernels at batch 1 only"
    quantized = isinstance(module, (QuantizedLinear, QuantizedConv2d))
    if quantized:
        q = module.weight_q.reshape(module.weight_q.shape[0], -1).numpy()
        if not L.int8_exact(q):
            return {}, f"int8 sums may exceed 2**24 (bound {int8_row_bound(q)})"
    if isinstance(module, (nn.Conv2d, QuantizedConv2d)):
        reason = L.conv_supported(module)
        if reason is not None:
            return {}, reason
        if x.dim() not in (3, 4):
            return {}, "unexpected input rank"
        n = x.shape[0] if x.dim() == 4 else 1
        k = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        cols = n * x.shape[-1] * x.shape[-2]
        cls = L.SparseQuantizedConv2d if quantized else L.SparseConv2d
        out = {"xt": lambda: cls(module, "xt")}
        block = L.default_block(k, cols)
        if block is not None:
            out[f"xt/b{block}"] = lambda: cls(module, "xt", block)
        if n > 1:  # image by image: no permuted copies, but only Hout*Wout columns per tile
            out["xt-nchw"] = lambda: cls(module, "xt-nchw", block)
        if quantized:
            out["int8-gemm"] = lambda: cls(module, "dense")
        else:  # direct sparse convolution: no im2col (small feature maps, where unfold dominates)
            out["direct"] = lambda: cls(module, "direct")
        if n == 1 and x.dim() == 4:  # the aligned-plane kernels (runtime.conv), layout converted per call
            from prunekit.runtime import conv as C

            if quantized:
                out["planes"] = lambda: C.PlanesQuantizedConv2d(module)
            else:
                for nv in C.tile_options(C.host_width())[1::2]:
                    out[f"planes/nv{nv}"] = lambda nv=nv: C.PlanesConv2d(module, nv=nv, cb=16)
        return out, ""
    m = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    cls = L.SparseQuantizedLinear if quantized else L.SparseLinear
    out = {}
    if isinstance(module, QuantizedLinear) and m == 1:
        from prunekit.runtime import gemv  # one activation vector (an int8 classifier): exact int8 gemv

        out.update(gemv.quantized_candidates(module))
    if m <= 32:
        out["rows"] = lambda: cls(module, "rows")
    if m >= 2:
        out["xt"] = lambda: cls(module, "xt")
        block = L.default_block(module.in_features, m)
        if block is not None:
            out[f"xt/b{block}"] = lambda: cls(module, "xt", block)
    if quantized:
        out["int8-gemm"] = lambda: cls(module, "dense")
    return out, ""


def _time(
    fns: dict[str, Callable[[], Tensor]],
    budget_s: float,
    min_reps: int,
    max_reps: int,
    flush: Callable[[], object] | None = None,
) -> dict:
    """Median microseconds per callable, interleaved in a shuffled order each round; the first (JIT)
    call and the warm-up are excluded (the first call's time is returned apart). ``flush``, when given,
    runs untimed before every timed call (cold caches, :class:`prunekit.runtime.coldcache.Flush`)."""
    jit = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        jit[name] = time.perf_counter() - t0
    one = {}
    for name, fn in fns.items():  # warm-up, and a first estimate to size the repetitions
        fn()
        t0 = time.perf_counter()
        fn()
        one[name] = time.perf_counter() - t0
    per_round = sum(one.values())
    if flush is not None:  # the budget covers the flushes too: each costs far more than a decode kernel
        t0 = time.perf_counter()
        flush()
        per_round += len(fns) * (time.perf_counter() - t0)
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)  # a fixed order would hand whoever runs second the first one's warm caches
        for name in order:
            if flush is not None:
                flush()
            t0 = time.perf_counter_ns()
            fns[name]()
            samples[name].append((time.perf_counter_ns() - t0) / 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}, jit


def _matches(y: Tensor, ref: Tensor, exact: bool, rtol: float = FLOAT_RTOL) -> bool:
    if y.shape != ref.shape:
        return False
    if exact:
        return torch.equal(y, ref)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return (y - ref).abs().max().item() <= rtol * max(scale, 1e-30) if y.numel() else True


def _decide(
    name: str,
    module: nn.Module,
    x: Tensor | None,
    margin: float,
    timing: dict,
    decode: DecodeOptions = DecodeOptions(),
) -> tuple:
    weight = _weight(module)
    nz = int(torch.count_nonzero(weight)) if weight.numel() else 0
    decision = LayerDecision(
        name=name,
        kind=_kind(module),
        weight_shape=tuple(weight.shape),
        sparsity=1.0 - nz / weight.numel() if weight.numel() else 0.0,
        input_shape=None if x is None else tuple(x.shape),
        engine="torch (reference int8)"
        if isinstance(module, (QuantizedLinear, QuantizedConv2d))
        else "torch",
    )
    if x is None:
        decision.reason = "not called by example_inputs"
        return decision, None
    factories, why = _candidates(module, x, decode)
    if not factories:
        decision.reason = why
        return decision, None
    quantized = isinstance(module, (QuantizedLinear, QuantizedConv2d))
    # other values than the float32 weights (bfloat16, int8) are what the user asked for: the layer is
    # replaced by the fastest kernel computing them, even when torch's float32 layer is faster
    replace_anyway = _batch1_linear(module, x) and not decode.exact_weights
    with torch.inference_mode():
        ref = module(x)
        built = {}
        for label, make in factories.items():
            candidate = make()
            y = candidate(x)
            reference = getattr(candidate, "reference", None)  # a layout's own arithmetic (int8, bf16)
            expected = ref if reference is None else reference(x)
            exact = getattr(candidate, "exact", quantized)
            if _matches(y, expected, exact, getattr(candidate, "rtol", FLOAT_RTOL)):
                built[label] = candidate
            else:
                log.warning("runtime: %s candidate %s does not match the dense output; not used", name, label)
        fns = {"dense": lambda: module(x)} | {label: (lambda c=c: c(x)) for label, c in built.items()}
        if x.device.type == "cuda":
            from prunekit.runtime.cuda import synchronized

            fns = {label: synchronized(fn) for label, fn in fns.items()}
        medians, jit = _time(fns, **timing)
    decision.dense_us = medians.pop("dense")
    decision.candidates = medians
    decision.jit_s = sum(jit.values()) - jit["dense"]
    if not medians:
        decision.reason = "no candidate matched the dense output"
        return decision, None
    best = min(medians, key=medians.get)
    decision.sparse_us = medians[best]
    if medians[best] < decision.dense_us * (1.0 - margin) or replace_anyway:
        decision.chosen = best
        decision.engine = engine_of(best, quantized)
        if replace_anyway and medians[best] >= decision.dense_us * (1.0 - margin):
            decision.reason = f"{decode.values} values asked for"
        return decision, built[best]
    decision.reason = f"best sparse ({best}) not {margin:.0%} faster"
    return decision, None


def engine_of(kernel: str, quantized: bool) -> str:
    """What runs a per-layer kernel, for the report."""
    from prunekit.runtime.cpu import features

    if kernel == "dense":
        return "torch (reference int8)" if quantized else "torch"
    if kernel == "planes" and quantized:
        from prunekit.runtime.conv import isa_name

        return f"prunekit int8 4x1 ({isa_name()})"
    width = f"{features().vector_floats * 32}-bit"
    if quantized:
        return f"prunekit {kernel} f32 on int8 ({width})"
    return f"prunekit {kernel} ({width})"


def _fuse_chains(model: nn.Module, inputs: dict[str, Tensor], decisions: list[LayerDecision]) -> None:
    """In every ``nn.Sequential``, replace runs ``xt`` SparseLinear -> GELU/ReLU/SiLU/Tanh -> ``xt``
    SparseLinear by one :class:`~prunekit.runtime.layers.SparseLinearChain` (at the first Linear's index;
    the activation and second Linear become ``nn.Identity``), when its output on the recorded input matches
    the unfused layers'."""
    from prunekit.runtime.layers import CHAIN_ACTIVATIONS, SparseLinear, SparseLinearChain

    by_name = {d.name: d for d in decisions}
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys, i = list(seq._modules), 0
        while i + 2 < len(keys):
            first, act, second = (seq._modules[k] for k in keys[i : i + 3])
            names = [f"{seq_name}.{k}" if seq_name else k for k in keys[i : i + 3]]
            x = inputs.get(names[0])
            if not (
                type(first) is SparseLinear
                and type(second) is SparseLinear
                and type(act) in CHAIN_ACTIVATIONS
                and first.kernel == second.kernel == "xt"
                and first.out_features == second.in_features
                and x is not None
            ):
                i += 1
                continue
            chain = SparseLinearChain(first, act, second)
            with torch.inference_mode():
                if not _matches(chain(x), second(act(first(x))), exact=False):
                    log.warning(
                        "runtime: %s..%s chain does not match the unfused layers; not used", *names[::2]
                    )
                    i += 1
                    continue
            seq._modules[keys[i]] = chain
            seq._modules[keys[i + 1]], seq._modules[keys[i + 2]] = nn.Identity(), nn.Identity()
            note = f"chained {names[0]} -> {type(act).__name__} -> {names[2]} (xT kept)"
            for name in names[::2]:
                if name in by_name:
                    by_name[name].reason = note
            i += 3


def compile(  # noqa: A001 - the natural name, namespaced as prunekit.runtime.compile
    model: nn.Module,
    example_inputs,
    *,
    margin: float = 0.05,
    budget_s: float = 0.25,
    min_reps: int = 7,
    max_reps: int = 300,
    chain: bool = True,
    values: str = "float32",
    head_values: str | None = None,
    activations: str = "float32",
    cold: bool | None = None,
    device: str = "cpu",
    segments: bool = True,
) -> nn.Module:
    """A new inference model: a deep copy of ``model`` (masks squashed, eval mode) whose ``nn.Linear``,
    ``nn.Conv2d``, ``QuantizedLinear`` and ``QuantizedConv2d`` layers run sparse kernels where measured
    faster.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs, shaped like the
    inputs the model will serve (the decisions depend on the batch size). ``margin``: how much faster a
    sparse kernel must be to replace dense. ``budget_s``: timing budget per layer (``min_reps`` to
    ``max_reps`` interleaved repetitions). ``chain``: fuse ``nn.Sequential`` runs of two ``xt`` sparse
    Linears around a GELU/ReLU/SiLU/Tanh into one layer that keeps the transposed activations in between
    (:class:`~prunekit.runtime.layers.SparseLinearChain`).
    Linear layers (and Hugging Face ``Conv1D``) that see one activation vector, as in a language model's
    decode step, are timed on the batch-1 layouts of :mod:`prunekit.runtime.gemv` (dense, R x 1 blocks, N:M,
    CSR-4). For a causal LM pass one token (``{"input_ids": ids[:, :1]}``): the layers are swapped, the KV
    cache is untouched, and prompt steps (several tokens) run ``F.linear`` on the same weights.
    ``values``: ``float32`` (the weights as they are), ``bfloat16`` or ``int8`` (weight-only, per-row
    scales; every batch-1 Linear is then replaced by the fastest kernel of that value type);
    ``head_values``: the same for the output embedding (``lm_head``) alone; ``activations="int8"`` also lets
    int8 block kernels quantize the activations (exact int32 sums). ``cold``: time with the caches flushed
    before every call (None: when the layers' weights exceed the last-level cache, as in decoding).
    ``device="cuda"``: 2:4 Linear layers on sparse tensor cores where faster (:mod:`prunekit.runtime.cuda`).
    ``segments``: for a batch-1 image input, also lower the whole CNN into the plane layout
    (:mod:`prunekit.runtime.segment`: convolutions with their BatchNorm, ReLU and residual add fused,
    activations kept in the layout) and return that when it measures faster than the per-layer result.
    The original model is not modified.
    """
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"compile: expected an nn.Module, got {type(model).__name__}")
    if not 0.0 <= margin < 1.0:
        raise PrunekitError(f"compile: margin must be in [0, 1), got {margin}")
    from prunekit.runtime.coldcache import Flush, last_level_cache_bytes
    from prunekit.runtime.gemv import check_decode_options

    check_decode_options(values, activations)
    if head_values is not None:
        check_decode_options(head_values, activations)
    timing = dict(budget_s=budget_s, min_reps=min_reps, max_reps=max_reps)
    compiled = squash(copy.deepcopy(model)).eval()
    if device != "cpu":
        from prunekit.runtime.cuda import check_device

        dev = check_device(device)
        compiled, example_inputs, cold = compiled.to(dev), _to_device(example_inputs, dev), False
    inputs = _capture(compiled, example_inputs)
    threads = torch.get_num_threads()
    head = _output_head(compiled)
    targets = [(n, m) for n, m in compiled.named_modules() if _is_target(m)]
    if cold is None:
        cold = sum(_weight(m).numel() * 4 for _, m in targets) > last_level_cache_bytes()
    if cold:
        timing["flush"] = Flush()
    report = RuntimeReport(
        [], threads, margin, cold=cold, device=str(device), macs_remaining=_macs_remaining(compiled, inputs)
    )
    image = _image(example_inputs)
    seg = None
    if segments and image is not None:  # first: the layers a segment runs need no per-layer timing
        seg = _segments(model, image, report, rounds=max(3, min_reps))
    covered = {} if seg is None else {step.name: step for step in seg.conv_steps()}
    decisions, replace = [], {}
    for name, module in targets:
        if name in covered:
            decisions.append(_step_row(covered[name]))
            continue
        decode = DecodeOptions(head_values if name == head and head_values else values, activations)
        decision, new = _decide(name, module, inputs.get(name), margin, timing, decode)
        decisions.append(decision)
        log.info(
            "runtime: %s %s -> %s (dense %s us, sparse %s us, jit %.2f s)",
            name,
            decision.kind,
            decision.chosen,
            "-" if decision.dense_us is None else f"{decision.dense_us:.1f}",
            "-" if decision.sparse_us is None else f"{decision.sparse_us:.1f}",
            decision.jit_s,
        )
        if new is not None:
            replace[name] = new
    report.layers = decisions
    result = seg if seg is not None else compiled
    for name, new in replace.items():
        try:
            _set_module(seg.gm if seg is not None else compiled, name, new)
        except AttributeError:  # the traced graph does not call it as a module
            continue
    if seg is not None:  # its modules are final now: the pass as a list of kernel calls, where it is one
        seg.prepare_replay(image)
        report.note = "; ".join(filter(None, [report.note, _replay_note(seg)]))
    if chain and seg is None:
        _fuse_chains(compiled, inputs, decisions)
    if seg is None:
        report.operators = _fast_glue(compiled, example_inputs)
    result.runtime_report = report
    return result


def _replay_note(seg) -> str:
    if seg.replay_reason is None:
        return "forward pass replayed as its kernel calls"
    return f"forward pass run step by step ({seg.replay_reason})"


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _image(example_inputs) -> Tensor | None:
    """The example when it is one batch-1 float32 image (what segments are built for), else None."""
    x = example_inputs
    if isinstance(x, (tuple, list)) and len(x) == 1:
        x = x[0]
    ok = isinstance(x, Tensor) and x.dim() == 4 and x.shape[0] == 1 and x.dtype == torch.float32
    return x if ok and x.device.type == "cpu" else None


def _macs_remaining(squashed: nn.Module, inputs: dict[str, Tensor]) -> float | None:
    """Multiply-adds of the nonzero weights over the dense ones, summed over every Linear/Conv2d that ran
    (a convolution's weight counts once per output position). ``squashed``: the masks already applied (the
    compile's own copy, before any layer is replaced; it was deep-copied a second time here)."""
    kept = total = 0
    for name, module in squashed.named_modules():
        x = inputs.get(name)
        if not isinstance(module, _TARGETS) or x is None:
            continue
        weight = _weight(module)
        if isinstance(module, (nn.Conv2d, QuantizedConv2d)):
            if isinstance(module.padding, str) or x.dim() not in (3, 4):
                continue
            hw = [
                (
                    x.shape[-2 + i]
                    + 2 * module.padding[i]
                    - module.dilation[i] * (module.kernel_size[i] - 1)
                    - 1
                )
                // module.stride[i]
                + 1
                for i in range(2)
            ]
            reps = hw[0] * hw[1] * (x.shape[0] if x.dim() == 4 else 1)
        else:
            reps = x.numel() // max(1, x.shape[-1])
        kept += int(torch.count_nonzero(weight)) * reps
        total += weight.numel() * reps
    return kept / total if total else None


def _segments(model: nn.Module, x: Tensor, report: RuntimeReport, rounds: int):
    """The whole network in the plane layout (:mod:`prunekit.runtime.segment`), when it matches the model and
    measures faster than dense (interleaved on ``x``); else None, with the reason in ``report.note``."""
    from prunekit.runtime import segment

    base = squash(copy.deepcopy(model)).eval()
    seg, why = segment.build(base, x)
    if seg is None:
        report.note = f"segments: not used ({why})"
        return None
    segment.tune(seg, x, rounds=rounds)
    with torch.inference_mode():
        if not _matches(seg(x), base(x), exact=seg.int8):
            log.warning("runtime: the segmented model does not match the model; not used")
            report.note = "segments: output did not match the model; not used"
            return None
        report.whole = segment.time_interleaved(
            {"dense": lambda: base(x), "segments": lambda: seg(x)}, rounds=max(5, rounds)
        )
    if report.whole["segments"] >= report.whole["dense"] * (1.0 - report.margin):
        report.note = "segments: measured not faster than dense; per-layer decisions instead"
        return None
    report.mode = "segments"
    return seg


def _step_row(step) -> LayerDecision:
    """A segment convolution's row of the decision table."""
    sparse = {k: v for k, v in step.timings.items() if k != "dense"}
    return LayerDecision(
        name=step.name,
        kind=_kind(step.module),
        weight_shape=tuple(step.weight.shape),
        sparsity=step.sparsity,
        input_shape=(1, *step.inp.shape),
        dense_us=step.timings.get("dense"),
        sparse_us=min(sparse.values()) if sparse else None,
        chosen=step.choice,
        candidates=sparse,
        reason=step.describe(),
        engine=step.engine,
    )


def _to_device(inputs, device: torch.device):
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _output_head(model: nn.Module) -> str | None:
    """The name of the model's output embedding (a Hugging Face model's ``lm_head``), if it has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def _fast_glue(model: nn.Module, example_inputs) -> dict[str, str]:
    """Move an integer model's adds and input rounding (prunekit.quant.glue) onto numba kernels, each
    only where it gives the module's output bit for bit on the input it sees in ``example_inputs``."""
    from prunekit.runtime.layers import fast_glue

    twins = {name: (m, fast_glue(m)) for name, m in model.named_modules() if name}
    twins = {name: pair for name, pair in twins.items() if pair[1] is not None}
    if not twins:
        return {}
    seen: dict[str, tuple] = {}
    handles = []
    for name, (module, _) in twins.items():

        def record(m: nn.Module, args: tuple, output: object, name: str = name) -> None:
            seen.setdefault(name, (tuple(a.detach().clone() for a in args), output.detach().clone()))

        handles.append(module.register_forward_hook(record))
    try:
        _capture(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    done = {}
    for name, (_, twin) in twins.items():
        if name not in seen:
            continue
        args, want = seen[name]
        with torch.inference_mode():
            if not torch.equal(twin(*args), want):
                log.warning("runtime: %s %s kernel does not match the module; not used", name, twin.kernel)
                continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, twin)
        done[name] = twin.kernel
    return done
