"""Structured pruning end to end: trace -> groups -> importance -> allocation -> physical removal.

    pruned = prunekit.structured.prune(model, example_inputs, ratio=0.5, importance="l2", round_to=8)

The result is the same model object with smaller ordinary layers; it runs without prunekit.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from prunekit.calib.gradients import gradients_of
from prunekit.errors import PrunekitError
from prunekit.masking import type_name
from prunekit.registry import STRUCTURED_IMPORTANCE, StructuredImportance
from prunekit.structured import importance as imp
from prunekit.structured.apply import apply_plan, plan_removal, zero_plan
from prunekit.structured.graph import Group, find_groups
from prunekit.structured.mha import disable_fused_paths
from prunekit.structured.owners import align, varying_dims
from prunekit.structured.rules import RULES
from prunekit.structured.trace import Trace, Value, trace_model

log = logging.getLogger(__name__)
ACTIVATIONS = {
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "gelu",
    "silu",
    "hardswish",
    "leaky_relu",
    "elu",
}


@dataclass
class Result:
    model: nn.Module
    plan: dict[str, dict]  # parameter -> {dim: [removed indices]}: the replayable prune log
    groups: list[Group]
    removed: dict[int, list[int]] = field(default_factory=dict)  # group index -> removed units
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None  # from verify=True: against the original with the removed units zeroed
    # groups pruned approximately (prune_norm_coupled): index -> why the outputs change; verify then
    # reports the difference instead of failing, and recovery (fine-tuning, distillation) is expected
    approximate: dict[int, str] = field(default_factory=dict)

    def summary(self) -> list[dict]:
        rows = []
        for g in self.groups:
            rows.append(
                {
                    "group": g.index,
                    "seed": g.seed,
                    "units": g.units,
                    "removed": len(self.removed.get(g.index, [])),
                    "blocked": g.blocked,
                    "approximate": g.approximate,
                }
            )
        return rows


def _check_known_ops(trace, patterns: Sequence[str]) -> None:
    """A parameter used by an operation without a rule is a custom layer prunekit cannot see into."""

    for op in trace.ops:
        if op.name in RULES:
            continue
        for value in op.inputs:
            if value.kind == "param":
                module = value.name.rpartition(".")[0] or "<model>"
                if _under(module, patterns):
                    continue
                raise PrunekitError(
                    f"module '{module}' uses its parameter '{value.name}' in '{op.name}'"
                    f"{' at ' + op.where if op.where else ''}, which prunekit.structured has no rule for; "
                    f"add one with prunekit.structured.register_rule('{op.name}') or pass ignore=['{module}']"
                )


_CONVS = {f"conv{k}{d}d" for k in ("", "_transpose") for d in (1, 2, 3)}


def _check_batched(trace) -> None:
    """Convolutions on unbatched input ((C, L) / (C, H, W)) would be read as batched with C = dim 1."""
    for op in trace.ops:
        if op.name not in _CONVS or len(op.args) < 2:
            continue
        x, weight = op.args[0], op.args[1]
        if isinstance(x, Value) and isinstance(weight, Value) and len(x.shape) == len(weight.shape) - 1:
            module = weight.name.rpartition(".")[0] or "<model>"
            raise PrunekitError(
                f"example_inputs reach {op.name} '{module}' without a batch dimension (input shape "
                f"{list(x.shape)}); structured pruning needs batched inputs: add one, e.g. x.unsqueeze(0)"
            )


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keep_count(units: int, ratio: float, round_to: int) -> int:
    target = units * (1.0 - ratio)
    if units <= round_to:
        return max(1, min(units, round(target)))
    keep = max(round_to, round_to * round(target / round_to))
    return min(units, keep)


def _unit_step(group: Group, round_to: int) -> int:
    """``round_to`` counts channels; a unit of ``width`` channels (a head, one position of every group of a
    grouped convolution) needs this many units per step."""
    return round_to // math.gcd(round_to, group.width)


def _module_types(model: nn.Module) -> dict[str, str]:
    return {
        f"{name}.{p}" if name else p: type_name(m)
        for name, m in model.named_modules()
        for p, _ in m.named_parameters(recurse=False)
    }


def _under(module: str, patterns: Sequence[str]) -> bool:
    """Whether ``module`` or one of its parent modules matches an ignore pattern."""
    parts = module.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(name, p) for name in prefixes for p in patterns)


def _ignored(group: Group, patterns: Sequence[str]) -> bool:
    return any(_under(m.name.rpartition(".")[0], patterns) for m in group.members)


def _importance(importance: str | StructuredImportance) -> tuple[str, StructuredImportance]:
    """``(name, importance)`` for a registered name, a ``module:attribute`` reference or the object itself."""
    if isinstance(importance, str):
        return importance, STRUCTURED_IMPORTANCE.get(importance)
    if not isinstance(importance, StructuredImportance):
        raise PrunekitError(
            f"importance must be a name ({', '.join(STRUCTURED_IMPORTANCE.names())}) or a "
            f"prunekit.registry.StructuredImportance, got {type(importance).__name__}"
        )
    return getattr(importance, "__name__", type(importance).__name__), importance


def _unit_group(group: Group, params: Mapping[str, torch.Tensor], types, **extra) -> imp.UnitGroup:
    # parameters only: BatchNorm running statistics are not weights and must not sway the ranking
    members = _members(group, params, types)
    return imp.UnitGroup(group.index, group.seed, group.units, members, **extra)


def prune_model(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    ratio: float = 0.5,
    importance: str = "l2",
    ignore: Iterable[str] | None = None,
    round_to: int = 8,
    verify: bool = False,
    *,
    global_ranking: bool = False,
    max_ratio: float = 0.9,
    ratios: Mapping[str, float] | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    calibration: Sequence[tuple] | None = None,
    loss_fn=None,
    prune_norm_coupled: bool = False,
) -> Result:
    """Remove ``ratio`` of the units of every prunable group; see :func:`prune`.

    ``prune_norm_coupled``: also prune widths a LayerNorm/RMSNorm/GroupNorm(1 group) normalises over (the
    residual stream of a transformer, ConvNeXt's stages), with the norm's parameters; the norm's statistics
    then change, so the result is not equivalent to the masked original: ``verify`` reports the
    difference (``Result.max_abs_diff``) instead of failing, and recovery (fine-tuning, distillation) is
    expected. Hidden-size pruning as in LLM-Pruner (Ma et al. 2023), SliceGPT and Minitron. Attention whose
    head size the code computes (Swin's ``C // num_heads`` from the residual width) then loses the same
    positions of every head, with the width it is computed from (both keep the same fraction)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise PrunekitError(f"ratio must be a number in [0, 1), got {ratio!r}")
    for pattern, value in (ratios or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise PrunekitError(f"ratios['{pattern}'] must be a number in [0, 1), got {value!r}")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0.0 < max_ratio <= 1.0:
        raise PrunekitError(f"max_ratio must be a number in (0, 1], got {max_ratio!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PrunekitError(f"round_to must be an integer >= 1, got {round_to!r}")
    name, scorer = _importance(importance)
    if scorer.needs != "weights" and not calibration:
        raise PrunekitError(
            f"importance '{name}' needs calibration batches: calibration=[(inputs, target), ...]"
        )
    if scorer.needs == "gradients" and loss_fn is None:
        raise PrunekitError(f"importance '{name}' needs loss_fn(output, target)")
    patterns = tuple(ignore or ())
    if isinstance(ignore, str):
        patterns = (ignore,)
    trace = trace_model(model, example_inputs)
    _check_batched(trace)
    _check_known_ops(trace, patterns)
    groups = find_groups(trace, norm_coupled=bool(prune_norm_coupled))
    types = _module_types(model)
    for g in groups:
        if not g.blocked and _ignored(g, patterns):
            g.blocked = "touches an ignored module"
    prunable = [g for g in groups if g.prunable]
    if not prunable:
        reasons = sorted({g.blocked for g in groups if g.blocked})
        raise PrunekitError("nothing can be pruned structurally in this model: " + "; ".join(reasons[:3]))
    generator = torch.Generator().manual_seed(seed)
    if scorer.needs == "gradients":
        scores = _gradient_scores(prunable, model, scorer, calibration, loss_fn, types)
    elif scorer.needs == "activations":
        scores = _activation_scores(prunable, trace, model, scorer, calibration, types)
    else:
        params = dict(model.named_parameters())
        scores = {g.index: scorer(_unit_group(g, params, types, generator=generator)) for g in prunable}
    removed = _allocate(prunable, scores, ratio, round_to, global_ranking, max_ratio, ratios or {})
    params_before = _params(model)
    reference = copy.deepcopy(model) if verify else None
    # the rules saw one forward pass; sizes fixed in the model's code (view(b, 4, -1), a cached tensor)
    # only show when the pruned model runs: re-trace it, and un-prune the groups behind any shape that
    # differs from what the plan predicts, until the pruned model runs exactly as planned
    for _ in range(len(prunable) + 1):
        plan = plan_removal(groups, {i: torch.tensor(u, dtype=torch.long) for i, u in removed.items()})
        undo = apply_plan(model, plan, steer=False)
        culprits = _shape_culprits(model, example_inputs, trace, groups, removed)
        if not culprits:
            break
        undo()
        for component in _size_components(groups):  # counts chosen together are un-pruned together
            blamed = sorted(component & culprits.keys())
            if blamed:
                culprits.update(
                    {i: culprits[blamed[0]] for i in component if i in removed and i not in culprits}
                )
        for g in groups:
            if g.index in culprits:
                g.blocked = culprits[g.index]
                removed.pop(g.index, None)
                log.info("group %d (%s) is not pruned: %s", g.index, g.seed, g.blocked)
        if not removed:
            raise PrunekitError(
                "nothing can be pruned structurally in this model: " + next(iter(culprits.values()))
            )
    steered = disable_fused_paths(model)
    if reference is not None and steered:
        # compare like with like: PyTorch's fused encoder path zeroes padded positions, the general one
        # computes them, so the reference takes the same path as the pruned model
        names = {id(m): name for name, m in model.named_modules()}
        for module, attr, _ in steered:
            setattr(reference.get_submodule(names[id(module)]), attr, getattr(module, attr))
    result = Result(model, plan, groups, removed, params_before=params_before, params_after=_params(model))
    result.approximate = {g.index: g.approximate for g in groups if g.approximate and removed.get(g.index)}
    if result.approximate:
        log.warning(
            "%d group(s) pruned approximately (%s): the outputs differ from the original's; fine-tune or "
            "distill to recover",
            len(result.approximate),
            "; ".join(sorted(set(result.approximate.values()))),
        )
    if reference is not None:
        exact = not result.approximate
        result.max_abs_diff = check_equivalence(reference, model, plan, example_inputs, atol, strict=exact)
    return result


def _expected_shapes(trace, groups: list[Group], removed: Mapping[int, list[int]]) -> dict[int, tuple]:
    """The shape every activation should have once the planned units are gone."""
    gone: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)  # value -> dim -> removed positions
    for g in groups:
        if not removed.get(g.index):
            continue
        table = torch.zeros(g.units + 1, dtype=torch.bool)  # unit -> removed; the extra slot is owner -1
        table[torch.tensor(removed[g.index], dtype=torch.long)] = True
        for vi, owner in g.owners.items():
            hit = table[align(owner, len(trace.values[vi].shape))]
            for d in varying_dims(hit):
                others = [k for k in range(hit.dim()) if k != d]
                line = hit.any(dim=others) if others else hit
                gone[vi][d] = line | gone[vi][d] if d in gone[vi] else line
    expected = {}
    for vi, dims in gone.items():
        shape = list(trace.values[vi].shape)
        for d, line in dims.items():
            shape[d] -= int(line.sum())
        expected[vi] = tuple(shape)
    return expected


def _first_mismatch(model, example_inputs, trace, expected, shapes_only: bool):
    """Re-trace the pruned model: ``(op of the original trace, reason, new trace)`` at the first operation
    whose name or output shapes differ from the plan's, or ``None`` when every operation fits."""
    again = Trace()
    failure = ""
    try:
        trace_model(model, example_inputs, into=again, shapes_only=shapes_only)
    except Exception as exc:  # the model's code fixed a size that pruning changed
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for before, after in zip(trace.ops, again.ops):
        want = [expected.get(v.index, v.shape) for v in before.outputs]
        got = [v.shape for v in after.outputs]
        if before.name != after.name or want != got:
            where = f" ({before.where})" if before.where else ""
            return before, f"the model's code fixes a size at '{before.name}'{where}", again
    if failure:
        bad = trace.ops[min(len(again.ops), len(trace.ops) - 1)]
        return bad, f"the pruned model failed at '{bad.name}' ({failure})", again
    if shapes_only and len(again.ops) != len(trace.ops):
        return (
            trace.ops[min(len(again.ops), len(trace.ops) - 1)],
            "the pruned model ran other operations",
            again,
        )
    return None


def _shape_culprits(model, example_inputs, trace, groups, removed) -> dict[int, str]:
    """Groups to blame when the pruned model's operations do not have the planned shapes ({} if all fit).

    A shape-only re-trace (arithmetic on the meta device, zeros onward) decides when everything fits; any
    difference it finds is looked at again with real values, which decide (zeros may steer value-dependent
    control flow elsewhere)."""

    expected = _expected_shapes(trace, groups, removed)
    if _first_mismatch(model, example_inputs, trace, expected, shapes_only=True) is None:
        return {}
    found = _first_mismatch(model, example_inputs, trace, expected, shapes_only=False)
    if found is None:
        return {}
    bad, reason, again = found
    touched = {v.index for v in [*bad.inputs, *bad.outputs]}
    blamed = {g.index: reason for g in groups if removed.get(g.index) and touched & set(g.owners)}
    if not blamed:
        # the failing op's tensors belong to no pruned group: a size the code computed from another tensor's
        # shape (Swin: head_dim = C // num_heads from its input's width). Blame the groups of the tensors
        # whose shapes were read shortly before it
        recent = set(again.shapes_read(bad.index))
        blamed = {g.index: reason for g in groups if removed.get(g.index) and recent & set(g.owners)}
    if not blamed:  # nothing obvious: un-prune everything rather than return a broken model
        blamed = {g.index: reason for g in groups if removed.get(g.index)}
    return blamed


def _members(group: Group, params: Mapping[str, torch.Tensor], types) -> list:
    return [
        imp.Member(m.name, params[m.name].detach(), m.owner, m.role, types.get(m.name, ""))
        for m in group.members
        if m.name in params and m.role != "other"
    ]


def _gradient_scores(groups, model, scorer, calibration, loss_fn, types) -> dict[int, torch.Tensor]:
    """Importance from gradients (Taylor: |sum w*g| per unit), scored on every calibration batch and
    averaged; the gradients the model had before are restored afterwards."""
    totals = {g.index: torch.zeros(g.units) for g in groups}
    with gradients_of(model) as params:
        for inputs, target in calibration:
            model.zero_grad(set_to_none=True)
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            loss_fn(model(*args), target).backward()
            for g in groups:
                members = _members(g, params, types)
                grads = [params[m.name].grad for m in members]
                totals[g.index] += scorer(imp.UnitGroup(g.index, g.seed, g.units, members, grads=grads))
    return {i: t / len(calibration) for i, t in totals.items()}


def _activation_scores(groups, trace, model, scorer, calibration, types) -> dict[int, torch.Tensor]:
    """Activation statistics of each group's output (after its first activation function when it has one:
    where APoZ counts the zeros), accumulated over every calibration batch."""
    producers = {v.index: trace.ops[v.producer].name for v in trace.values if v.producer is not None}
    # heads of nn.MultiheadAttention live inside one traced operation: no activation of theirs is seen
    hidden = [g for g in groups if g.seed_value not in g.owners]
    for g in hidden:
        log.info("group %d (%s): its activations are not traced; ranked by L2 norm", g.index, g.seed)
    groups = [g for g in groups if g.seed_value in g.owners]
    params = dict(model.named_parameters())
    fallback = {g.index: imp.l2_norm(_members(g, params, types), g.units) for g in hidden}
    watch = {}
    for g in groups:
        acts = sorted(i for i in g.owners if producers.get(i) in ACTIVATIONS)
        watch[g.index] = acts[0] if acts else g.seed_value
    accs = {g.index: scorer.accumulator(g.units, g.owners[watch[g.index]]) for g in groups}
    for batch in calibration:
        inputs = batch[0] if isinstance(batch, tuple) and len(batch) == 2 else batch
        calib = trace_model(model, inputs, keep_tensors=True)
        if len(calib.values) != len(trace.values):
            raise PrunekitError(
                "the model ran different operations on a calibration batch than on the example"
            )
        for g in groups:
            accs[g.index].add_batch(calib.tensors[watch[g.index]])
    return {**fallback, **{i: acc.value() for i, acc in accs.items()}}


def _group_ratio(group: Group, ratio: float, ratios: Mapping[str, float]) -> float:
    for pattern, value in ratios.items():
        if any(
            fnmatch.fnmatchcase(m.name.rpartition(".")[0], pattern) for m in group.members if m.role == "out"
        ):
            return value
    return ratio


def _allocate(groups, scores, ratio, round_to, global_ranking, max_ratio, ratios) -> dict[int, list[int]]:
    """The removed units of every group: how many per group (one ratio, or one global ranking; groups tied
    by a computed size keep the same fraction), then the least important ones of each."""
    if global_ranking:
        keep = _global_counts(groups, scores, ratio, round_to, max_ratio)
    else:
        keep = {
            g.index: _keep_count(g.units, _group_ratio(g, ratio, ratios), _unit_step(g, round_to))
            for g in groups
        }
    keep = _same_fractions(groups, keep, round_to)
    removed: dict[int, list[int]] = {}
    for g in groups:
        order = torch.argsort(scores[g.index], stable=True)
        removed[g.index] = sorted(order[: g.units - keep[g.index]].tolist())
    return removed


def _global_counts(groups, scores, ratio, round_to, max_ratio) -> dict[int, int]:
    # one ranking over all groups: scores normalised by each group's mean so scales compare
    entries = []
    for g in groups:
        s = scores[g.index]
        s = s / s.mean().clamp_min(1e-12)
        entries += [(float(v), g.index, u) for u, v in enumerate(s.tolist())]
    entries.sort()
    total = round(ratio * sum(g.units for g in groups))
    by_index = {g.index: g for g in groups}
    chosen: dict[int, list[int]] = {g.index: [] for g in groups}
    for _, gi, u in entries:
        if total <= 0:
            break
        if len(chosen[gi]) < int(max_ratio * by_index[gi].units) and len(chosen[gi]) < by_index[gi].units - 1:
            chosen[gi].append(u)
            total -= 1
    # round the kept count to the multiple
    return {
        g.index: _keep_count(g.units, len(chosen[g.index]) / g.units, _unit_step(g, round_to)) for g in groups
    }


def _size_components(groups: Sequence[Group]) -> list[set[int]]:
    """The sets of group indices tied by computed sizes (``Group.size_coupled``, transitively)."""
    links = {g.index: g.size_coupled for g in groups}
    seen: set[int] = set()
    components = []
    for g in groups:
        if g.index in seen or not g.size_coupled:
            continue
        component, todo = set(), [g.index]
        while todo:
            i = todo.pop()
            if i not in component:
                component.add(i)
                todo.extend(links.get(i, ()))
        seen |= component
        components.append(component)
    return components


def _same_fractions(groups, keep: dict[int, int], round_to: int) -> dict[int, int]:
    """Kept counts of size-coupled groups (Swin: the residual stream's ``C`` and each attention's head
    size ``C // heads``): every group keeps ``t / g`` of its units, ``g`` the gcd of their unit counts,
    with ``t`` the multiple that respects each group's ``round_to`` step nearest their mean kept fraction.
    A component with a group outside ``groups`` (blocked, ignored) keeps everything: that group's width
    stays, so the sizes computed from it do."""
    by_index = {g.index: g for g in groups}
    keep = dict(keep)
    for component in _size_components(groups):
        members = [by_index[i] for i in sorted(component) if i in by_index]
        common = math.gcd(*(m.units for m in members))
        step = 1  # t must make every member's count a multiple of its step
        for m in members:
            unit_step = _unit_step(m, round_to)
            unit_step = 1 if m.units <= unit_step else unit_step  # as _keep_count: small groups any count
            per = m.units // common
            step = math.lcm(step, unit_step // math.gcd(unit_step, per))
        target = sum(keep[m.index] / m.units for m in members) / len(members) * common
        t = min(common, max(step, step * round(target / step)))
        if len(members) < len(component) or step > common:
            t = common
        for m in members:
            keep[m.index] = t * (m.units // common)
    return keep


def check_equivalence(
    reference: nn.Module, pruned: nn.Module, plan, example_inputs, atol: float = 1e-4, strict: bool = True
) -> float:
    """The pruned model must match the original with the removed slices zeroed; returns the max abs diff.
    ``strict=False`` (approximate pruning) only measures the difference: it must still run with the same
    output shapes."""

    zero_plan(reference, plan)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = pruned.training
    with torch.no_grad():
        reference.eval()
        pruned.eval()
        expected = [t for t in tree_flatten(reference(*args))[0] if isinstance(t, torch.Tensor)]
        try:
            got = [t for t in tree_flatten(pruned(*args))[0] if isinstance(t, torch.Tensor)]
        except Exception as exc:  # the model's own code may hard-code a size
            raise PrunekitError(f"the pruned model no longer runs: {type(exc).__name__}: {exc}") from exc
        finally:
            pruned.train(was_training)
    worst = 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise PrunekitError(f"pruning changed an output shape: {tuple(e.shape)} -> {tuple(g.shape)}")
        diff = float((e.float() - g.float()).abs().max()) if e.numel() else 0.0
        scale = float(e.float().abs().max()) if e.numel() else 0.0
        if strict and diff > atol * max(1.0, scale):
            raise PrunekitError(
                f"pruned model differs from the masked original by {diff:.3g} (scale {scale:.3g})"
            )
        worst = max(worst, diff)
    return worst


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple,
    ratio: float = 0.5,
    importance: str = "l2",
    ignore: Iterable[str] | None = None,
    round_to: int = 8,
    verify: bool = False,
    **kwargs,
) -> nn.Module:
    """Physically remove ``ratio`` of the channels / neurons of every prunable group of ``model``.

    ``example_inputs``: a tensor or tuple of tensors the model runs on. ``importance``: ``l1``, ``l2``,
    ``bn_scale``, ``fpgm``, ``random``, or from data (``calibration=[(inputs, target), ...]``) ``taylor``
    (with ``loss_fn(output, target)``), ``activation_mean``, ``apoz``.
    ``ignore``: module-name globs whose parameters must not change.
    ``round_to``: kept counts are rounded to this multiple. ``verify``: check that the pruned model equals
    the original with the removed units zeroed. More options in :func:`prune_model`. Prunes in place and
    returns the model.
    """
    return prune_model(model, example_inputs, ratio, importance, ignore, round_to, verify, **kwargs).model
