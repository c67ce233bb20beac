"""How each traced operation couples the channels of its tensors.

Most operations are described by *dimension correspondences*: "dimension ``i`` of tensor A is the same
index space as dimension ``j`` of tensor B" (a conv's output channels and its weight's dim 0; an
element-wise op's operands and result, dimension by dimension). :func:`couple` moves owners across such
a correspondence in both directions. Concatenation, splitting, reshaping and indexing have their own
rules. Anything a rule cannot map exactly raises :class:`Conflict`, which leaves the group unpruned. Rules
see one forward pass, so they cannot know sizes the model's code fixes (``view(b, 4, -1)``); the
re-trace after pruning (``core._check_shapes``) catches those and undoes the pruning.

Rules are registered by torch function name in ``RULES``; :func:`register_rule` adds one for a custom op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from prunekit.structured.owners import (
    Conflict,
    SplitConflict,
    align,
    along,
    compress,
    full,
    mark,
    to_shape,
    unit_vector,
    varying_dims,
)
from prunekit.structured.trace import Op, Value


class RuleContext:
    """What a rule may read and write while propagating one group."""

    def __init__(
        self,
        get: Callable[..., torch.Tensor | None],
        put: Callable[..., None],
        tie: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
        approximate: Callable[[str], None] | None = None,
        norm_coupled: bool = False,
        split_heads: Callable[[Op, int, int], None] | None = None,
    ) -> None:
        self.get = get  # get(value, dims=None): for a parameter, the slot along one of `dims`
        self.put = put  # put(value, owner, role=None)
        self._tie = tie
        self._approximate = approximate
        self.norm_coupled = norm_coupled  # prune widths a norm normalises over (approximately)
        # split_heads(op, size, heads): set when a reshape that splits the units into heads may instead
        # prune the same positions of every head (see `reshape`); it records each such split
        self.split_heads = split_heads

    def tie(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Units ``a[i]`` and ``b[i]`` must be removed together: they become one unit."""
        if self._tie is None:
            raise Conflict("units would have to be tied together")
        self._tie(a, b)

    def approximate(self, reason: str) -> None:
        """Pruning this group changes the model's outputs (e.g. a norm's statistics): allowed only when the
        caller opted in (``norm_coupled``); the group is then marked approximate with ``reason``."""
        if not self.norm_coupled or self._approximate is None:
            raise Conflict(f"{reason}: not pruned (prune_norm_coupled=True prunes it approximately)")
        self._approximate(reason)


Rule = Callable[[Op, RuleContext], None]
RULES: dict[str, Rule] = {}


def register_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register ``rule(op, ctx)`` for torch functions with these names (e.g. ``"my_op"``)."""

    def add(rule: Rule) -> Rule:
        for name in names:
            RULES[name] = rule
        return rule

    return add


def arg(op: Op, position: int, name: str, default: Any = None) -> Any:
    if len(op.args) > position:
        return op.args[position]
    return op.kwargs.get(name, default)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def project(owner: torch.Tensor, src: tuple[int, ...], dst: tuple[int, ...], pairs) -> torch.Tensor | None:
    """Carry an owner from a tensor of shape ``src`` to one of shape ``dst`` along ``pairs`` of dims.

    Returns None when the units live only in dimensions the other tensor does not share.
    """
    owner = compress(align(owner, len(src)))
    dst_of = {_norm(a, len(src)): _norm(b, len(dst)) for a, b in pairs}
    varying = varying_dims(owner)
    if any(d not in dst_of for d in varying):
        if any(d in dst_of for d in varying):
            raise Conflict("units span dimensions that this operation separates")
        return None
    if len(src) == len(dst) and all(dst_of[d] == d for d in varying):
        return to_shape(owner, dst)  # every unit stays in its dimension (element-wise ops, norms, ...)
    mapped = sorted(dst_of)
    picked = owner[tuple(slice(None) if d in dst_of else 0 for d in range(len(src)))]
    targets = [dst_of[d] for d in mapped]  # destination dim of each remaining dim of `picked`
    perm = sorted(range(len(targets)), key=lambda i: targets[i])
    picked = picked.permute(*perm) if perm else picked
    shape = [1] * len(dst)
    for i, p in enumerate(perm):
        shape[targets[p]] = picked.shape[i]
    # the owner was compressed and only lost size-1 dims or moved dims: the result is compressed too
    return to_shape(mark(picked.reshape(shape)), dst)


def couple(
    ctx: RuleContext,
    a: Value | None,
    b: Value | None,
    pairs: Sequence[tuple[int, int]],
    role_b=None,
    role_a=None,
):
    """Dimension ``i`` of ``a`` is dimension ``j`` of ``b`` for each ``(i, j)`` in ``pairs``."""
    if a is None or b is None or not isinstance(a, Value) or not isinstance(b, Value):
        return
    owner = ctx.get(a, [i for i, _ in pairs])
    if owner is not None:
        moved = project(owner, a.shape, b.shape, pairs)
        if moved is not None:
            before = ctx.get(b, [j for _, j in pairs])
            ctx.put(b, moved, role_b)
            if before is None or (before.shape == moved.shape and torch.equal(before, moved)):
                return  # b's owner is what a gave it: carrying it back would add nothing
    owner = ctx.get(b, [j for _, j in pairs])
    if owner is not None:
        moved = project(owner, b.shape, a.shape, [(j, i) for i, j in pairs])
        if moved is not None:
            ctx.put(a, moved, role_a)


def same_dims(ndim: int, skip: Sequence[int] = ()) -> list[tuple[int, int]]:
    skip = {_norm(d, ndim) for d in skip}
    return [(d, d) for d in range(ndim) if d not in skip]


def broadcast_pairs(a: Value, b: Value) -> list[tuple[int, int]]:
    """Right-aligned dims where both tensors have the same (non-broadcast) size."""
    pairs = []
    for k in range(1, min(len(a.shape), len(b.shape)) + 1):
        if a.shape[-k] == b.shape[-k]:
            pairs.append((len(a.shape) - k, len(b.shape) - k))
    return pairs


# -- element-wise ------------------------------------------------------------------------------------
ELEMENTWISE = (
    "add sub mul div true_divide where maximum minimum pow fmod remainder rsub addcmul addcdiv lerp "
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ "
    "__rtruediv__ __itruediv__ __pow__ __rpow__ __neg__ neg abs exp log sqrt rsqrt sin cos tanh "
    "sigmoid relu relu_ relu6 hardtanh hardtanh_ gelu silu mish elu selu celu leaky_relu softplus "
    "softsign hardswish hardsigmoid logsigmoid tanhshrink dropout dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout clamp clamp_ clip contiguous clone detach float double half "
    "bfloat16 to type type_as add_ mul_ sub_ div_ sigmoid_ tanh_ masked_fill erf square reciprocal "
    "expand expand_as zeros_like ones_like full_like empty_like rand_like randn_like"
).split()


@register_rule(*ELEMENTWISE)
def elementwise(op: Op, ctx: RuleContext) -> None:
    out = op.outputs[0]
    for v in op.inputs:
        if v.shape == ():
            continue
        couple(ctx, v, out, broadcast_pairs(v, out))


@register_rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def new_tensor(op: Op, ctx: RuleContext) -> None:
    """x.new_zeros(size): a fresh tensor whose size the model's code gives; only dtype/device come from x."""
    owner = ctx.get(op.outputs[0])
    if owner is not None and varying_dims(owner):
        raise Conflict("a tensor created inside forward() would need resizing")


# -- parametric layers ----------------------------------------------------------------------------------
def _channel_line(ctx: RuleContext, v: Value) -> torch.Tensor | None:
    """The owner of ``v``'s channels (dim 1) as a 1-D line; None when the group has no units there."""
    owner = ctx.get(v)
    if owner is None:
        return None
    owner = align(owner, len(v.shape))
    varying = varying_dims(owner)
    if 1 not in varying:
        return None
    if varying != [1]:
        raise Conflict("a grouped convolution's channels carry units that also vary along other dimensions")
    return unit_vector(owner, 1)


def _channels(line: torch.Tensor, ndim: int) -> torch.Tensor:
    return along(line.numel(), 1, ndim, line)


def _lockstep(ctx: RuleContext, line: torch.Tensor, groups: int) -> torch.Tensor:
    """Channels ``p``, ``p + C/g``, ``p + 2C/g``, ... (position ``p`` of every group) become one unit, so
    every group keeps the same channels; returns the owner of one group's positions."""
    rows = line.reshape(groups, -1)
    unowned = rows < 0
    if not bool((unowned.all(dim=0) | (~unowned).all(dim=0)).all()):
        raise Conflict(
            f"some groups of a grouped convolution (groups={groups}) would lose channels others keep"
        )
    owned = (~unowned[0]).nonzero().reshape(-1)
    if owned.numel():
        ctx.tie(rows[1:, owned], rows[0, owned].expand(groups - 1, -1))
    return rows[0]


def _whole_groups(ctx: RuleContext, line: torch.Tensor, groups: int) -> torch.Tensor:
    """All channels of one group become one unit (a depthwise input channel and its outputs); returns the
    owner of each group."""
    rows = line.reshape(groups, -1)
    unowned = rows < 0
    if not bool((unowned.all(dim=1) | (~unowned).all(dim=1)).all()):
        raise Conflict(f"a group of a grouped convolution (groups={groups}) would lose part of its channels")
    owned = (~unowned[:, 0]).nonzero().reshape(-1)
    if owned.numel() and rows.shape[1] > 1:
        ctx.tie(rows[owned, 1:], rows[owned, :1].expand(-1, rows.shape[1] - 1))
    return rows[:, 0]


def _slot_line(ctx: RuleContext, weight: Value, dim: int) -> torch.Tensor | None:
    owner = ctx.get(weight, [dim])
    if owner is None:
        return None
    owner = align(owner, len(weight.shape))
    return unit_vector(owner, dim) if dim in varying_dims(owner) else None


def _grouped(ctx: RuleContext, x: Value, out: Value, weight: Value, groups: int, transposed: bool) -> None:
    """A grouped convolution (``groups`` > 1): group ``j`` maps input channels ``[j*Ci/g, (j+1)*Ci/g)`` to
    output channels ``[j*Co/g, (j+1)*Co/g)``; weight dim 1 holds one group's inputs (conv) or outputs
    (transposed conv). Depthwise (one input channel per group): an input channel goes with its output
    channels, and the group count shrinks. Otherwise each side is pruned in lockstep: the same positions of
    every group, so every group keeps the same count and the group count stays (as Torch-Pruning does)."""
    nd, wd = len(x.shape), len(weight.shape)
    if x.shape[1] == groups:  # depthwise, with out.shape[1] // groups outputs per input channel
        line = _channel_line(ctx, x)
        if line is not None:
            ctx.put(out, _channels(line.repeat_interleave(out.shape[1] // groups), nd))
        line = _channel_line(ctx, out)
        if line is not None:
            ctx.put(x, _channels(_whole_groups(ctx, line, groups), nd))
        return
    # the side whose channels weight dim 1 holds one group of; the other side maps to weight dim 0 directly
    inner, outer = (out, x) if transposed else (x, out)
    line = _channel_line(ctx, outer)
    if line is not None:
        _lockstep(ctx, line, groups)
    line = _channel_line(ctx, inner)
    if line is not None:
        positions = _lockstep(ctx, line, groups)
        ctx.put(weight, along(positions.numel(), 1, wd, positions), "out" if transposed else "in")
    line = _slot_line(ctx, weight, 1)
    if line is not None:
        ctx.put(inner, _channels(line.repeat(groups), nd))


@register_rule("conv1d", "conv2d", "conv3d")
def conv(op: Op, ctx: RuleContext) -> None:
    x, weight, bias, out = op.args[0], op.args[1], arg(op, 2, "bias"), op.outputs[0]
    groups = arg(op, 6, "groups", 1)
    nd = len(x.shape)
    if nd != len(weight.shape):
        raise Conflict("unbatched input")  # prune_model explains this before propagating
    couple(ctx, x, out, [(0, 0)])  # batch
    couple(ctx, out, weight, [(1, 0)], role_b="out")
    couple(ctx, out, bias, [(1, 0)], role_b="bias")
    if groups == 1:
        couple(ctx, x, weight, [(1, 1)], role_b="in")
    else:
        _grouped(ctx, x, out, weight, groups, transposed=False)


@register_rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(op: Op, ctx: RuleContext) -> None:
    x, weight, bias, out = op.args[0], op.args[1], arg(op, 2, "bias"), op.outputs[0]
    groups = arg(op, 6, "groups", 1)
    if len(x.shape) != len(weight.shape):
        raise Conflict("unbatched input")
    couple(ctx, x, out, [(0, 0)])
    couple(ctx, out, bias, [(1, 0)], role_b="bias")
    if groups == 1:
        couple(ctx, x, weight, [(1, 0)], role_b="in")
        couple(ctx, out, weight, [(1, 1)], role_b="out")
    else:
        couple(ctx, x, weight, [(1, 0)], role_b="in")
        _grouped(ctx, x, out, weight, groups, transposed=True)


@register_rule("linear")
def linear(op: Op, ctx: RuleContext) -> None:
    x, weight, bias, out = op.args[0], op.args[1], arg(op, 2, "bias"), op.outputs[0]
    nd = len(x.shape)
    couple(ctx, x, out, same_dims(nd, skip=[-1]))
    couple(ctx, x, weight, [(-1, 1)], role_b="in")
    couple(ctx, out, weight, [(-1, 0)], role_b="out")
    couple(ctx, out, bias, [(-1, 0)], role_b="bias")


@register_rule("batch_norm", "instance_norm")
def batch_norm(op: Op, ctx: RuleContext) -> None:
    x, out = op.args[0], op.outputs[0]
    couple(ctx, x, out, same_dims(len(x.shape)))
    # batch_norm and instance_norm share the layout (input, running_mean, running_var, weight, bias, ...)
    for pos, name in enumerate(("running_mean", "running_var", "weight", "bias"), start=1):
        p = arg(op, pos, name)
        if isinstance(p, Value):
            couple(ctx, out, p, [(1, 0)], role_b="norm")


@register_rule("layer_norm", "rms_norm")
def layer_norm(op: Op, ctx: RuleContext) -> None:
    """Units outside the normalised dims pass through exactly. Units inside them (the residual stream of a
    transformer) change the norm's statistics: pruned only with ``prune_norm_coupled``, approximately, with
    the norm's weight and bias."""
    x, shape, out = op.args[0], arg(op, 1, "normalized_shape"), op.outputs[0]
    weight = arg(op, 2, "weight")
    bias = arg(op, 3, "bias") if op.name == "layer_norm" else None
    nd = len(x.shape)
    k = len(tuple(shape)) if isinstance(shape, (tuple, list)) else 1
    for v in (x, out):
        owner = ctx.get(v)
        if owner is not None and any(d >= nd - k for d in varying_dims(align(owner, nd))):
            ctx.approximate(f"{op.name} normalises over these channels")
            if not isinstance(weight, Value):
                raise Conflict(
                    f"{op.name} without a weight: its normalized_shape cannot follow the pruned width"
                )
            break
    couple(ctx, x, out, same_dims(nd))
    for p in (weight, bias):
        if isinstance(p, Value):
            couple(ctx, out, p, [(nd - k + i, i) for i in range(k)], role_b="norm")


@register_rule("group_norm")
def group_norm(op: Op, ctx: RuleContext) -> None:
    """GroupNorm normalises each group of ``C / G`` channels: whole groups go exactly (the group count
    shrinks, each group keeps its channels). With one group it normalises over all channels, like a
    LayerNorm: pruned only with ``prune_norm_coupled``, approximately."""
    x, groups, out = op.args[0], arg(op, 1, "num_groups"), op.outputs[0]
    weight, bias = arg(op, 2, "weight"), arg(op, 3, "bias")
    couple(ctx, x, out, same_dims(len(x.shape)))
    line = _channel_line(ctx, out)
    if line is not None:
        if not isinstance(weight, Value):
            raise Conflict("group_norm without affine parameters: its group count cannot follow the channels")
        if groups == 1:
            ctx.approximate("group_norm with one group normalises over all these channels")
        else:
            _whole_groups(ctx, line, groups)
    for p in (weight, bias):
        if isinstance(p, Value):
            couple(ctx, out, p, [(1, 0)], role_b="norm")


@register_rule("prelu")
def prelu(op: Op, ctx: RuleContext) -> None:
    x, weight, out = op.args[0], op.args[1], op.outputs[0]
    couple(ctx, x, out, same_dims(len(x.shape)))
    if weight.shape[0] > 1:
        couple(ctx, out, weight, [(1 if len(x.shape) > 1 else 0, 0)], role_b="norm")


@register_rule("embedding")
def embedding(op: Op, ctx: RuleContext) -> None:
    ids, weight, out = op.args[0], op.args[1], op.outputs[0]
    couple(ctx, out, weight, [(-1, 1)], role_b="out")
    couple(ctx, ids, out, same_dims(len(ids.shape)))


# -- pooling, reductions, softmax ---------------------------------------------------------------------
POOLS = {
    "max_pool1d": 1,
    "avg_pool1d": 1,
    "adaptive_avg_pool1d": 1,
    "adaptive_max_pool1d": 1,
    "lp_pool1d": 1,
    "max_pool2d": 2,
    "avg_pool2d": 2,
    "adaptive_avg_pool2d": 2,
    "adaptive_max_pool2d": 2,
    "lp_pool2d": 2,
    "max_pool3d": 3,
    "avg_pool3d": 3,
    "adaptive_avg_pool3d": 3,
    "adaptive_max_pool3d": 3,
    "interpolate": None,
    "upsample": None,
    "pixel_shuffle": None,
    "boolean_dispatch": None,
}


@register_rule(*POOLS)
def pool(op: Op, ctx: RuleContext) -> None:
    x, out = op.args[0], op.outputs[0]
    spatial = POOLS.get(op.name) or max(len(x.shape) - 2, 1)
    couple(ctx, x, out, same_dims(len(x.shape), skip=range(len(x.shape) - spatial, len(x.shape))))
    for v in (x, out):
        owner = ctx.get(v)
        if owner is not None and any(
            d >= len(v.shape) - spatial for d in varying_dims(align(owner, len(v.shape)))
        ):
            raise Conflict(f"{op.name} mixes positions that belong to different units")


@register_rule("pad")
def pad(op: Op, ctx: RuleContext) -> None:
    """F.pad: dimensions that get no padding pass through; units must not lie along a padded one."""
    x, out = op.args[0], op.outputs[0]
    nd = len(x.shape)
    widths = list(arg(op, 1, "pad", ()))
    padded = {nd - 1 - i // 2 for i, w in enumerate(widths) if w}
    _positions_only(op, ctx, x, out, padded)


@register_rule("roll")
def roll(op: Op, ctx: RuleContext) -> None:
    """torch.roll (Swin's shifted windows): units must not lie along a rolled dimension."""
    x, out = op.args[0], op.outputs[0]
    nd = len(x.shape)
    dims = arg(op, 2, "dims", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    rolled = {_norm(d, nd) for d in dims} if dims else set(range(nd))  # no dims: rolls the flattened tensor
    _positions_only(op, ctx, x, out, rolled)


def _positions_only(op: Op, ctx: RuleContext, x: Value, out: Value, moved: set[int]) -> None:
    nd = len(x.shape)
    for v in (x, out):
        owner = ctx.get(v)
        if owner is not None and moved & set(varying_dims(align(owner, nd))):
            raise Conflict(f"{op.name} moves positions along the units' dimension")
    couple(ctx, x, out, [(d, d) for d in range(nd) if d not in moved])


REDUCTIONS = "mean sum amax amin max min std var prod norm logsumexp all any".split()
STATISTICS = {"mean", "var", "std", "norm"}


@register_rule(*REDUCTIONS)
def reduction(op: Op, ctx: RuleContext) -> None:
    x = op.args[0]
    dims = arg(op, 1, "dim")
    nd = len(x.shape)
    if isinstance(dims, bool) or not isinstance(dims, (int, tuple, list)):
        reduced = set(range(nd))  # no dim (or one this rule cannot read): treat as a full reduction
    else:
        reduced = {_norm(d, nd) for d in ((dims,) if isinstance(dims, int) else dims)}
    owner = ctx.get(x)
    if owner is not None and reduced & set(varying_dims(align(owner, nd))):
        # a statistic kept broadcastable (x.pow(2).mean(-1, keepdim=True) in an RMSNorm written out)
        # is a normalisation over the units: allowed, approximately, with prune_norm_coupled
        if op.name not in STATISTICS or any(len(o.shape) != nd for o in op.outputs):
            raise Conflict(f"{op.name} reduces over the units' dimension")
        ctx.approximate(f"{op.name} over these channels (a normalisation statistic)")
    kept = [d for d in range(nd) if d not in reduced]
    for out in op.outputs:  # max/min with a dim also return indices, shaped like the values
        # keepdim read off the result (var/std put `unbiased` where others put keepdim)
        if len(out.shape) == nd:
            couple(ctx, x, out, [(d, d) for d in kept])
        elif len(out.shape) == len(kept):
            couple(ctx, x, out, [(d, i) for i, d in enumerate(kept)])
        elif ctx.get(out) is not None or owner is not None:
            raise Conflict(f"cannot tell which dimensions {op.name} keeps")


@register_rule("softmax", "log_softmax", "cumsum", "cumprod", "normalize")
def along_dim(op: Op, ctx: RuleContext) -> None:
    x, out = op.args[0], op.outputs[0]
    dim = arg(op, 1, "dim", -1 if op.name != "normalize" else 1)
    dim = _norm(dim if isinstance(dim, int) else -1, len(x.shape))
    for v in (x, out):
        owner = ctx.get(v)
        if owner is not None and dim in varying_dims(align(owner, len(v.shape))):
            raise Conflict(f"{op.name} mixes the units' dimension")
    couple(ctx, x, out, same_dims(len(x.shape)))


# -- matmul and attention ---------------------------------------------------------------------------------
def _batch_pairs(a: Value, b: Value, skip_a: int, skip_b: int) -> list[tuple[int, int]]:
    pairs = []
    for k in range(1, min(len(a.shape) - skip_a, len(b.shape) - skip_b) + 1):
        i, j = len(a.shape) - skip_a - k, len(b.shape) - skip_b - k
        if a.shape[i] == b.shape[j]:
            pairs.append((i, j))
    return pairs


@register_rule("matmul", "__matmul__", "bmm", "__rmatmul__")
def matmul(op: Op, ctx: RuleContext) -> None:
    a, b, out = op.args[0], op.args[1], op.outputs[0]
    if op.name == "__rmatmul__":
        a, b = b, a
    if len(a.shape) < 2 or len(b.shape) < 2:
        for v in (a, b):
            if ctx.get(v) is not None:
                raise Conflict("matmul with a vector operand is not traced through")
        return
    couple(ctx, a, b, [(-1, -2)] + _batch_pairs(a, b, 2, 2))
    couple(ctx, a, out, [(-2, -2)] + _batch_pairs(a, out, 2, 2))
    couple(ctx, b, out, [(-1, -1)] + _batch_pairs(b, out, 2, 2))


@register_rule("multi_head_attention_forward")
def multi_head_attention(op: Op, ctx: RuleContext) -> None:
    """nn.MultiheadAttention: its embedding width is the columns of the q/k/v projections and the rows of
    the output projection (one ``embed_dim``: input and output widths are the same units); its heads are a
    group of their own (``graph._mha_heads``), so the two widths are independent (a pruned module becomes
    a ``HeadPrunedMultiheadAttention``). Sequence and batch dims pass through (inputs are (L, N, E) here:
    the module transposes batch_first itself)."""
    query, key, value, out = op.args[0], op.args[1], op.args[2], op.outputs[0]
    nd = len(query.shape)
    if arg(op, 17, "use_separate_proj_weight", False):
        for tensor, position, name in ((query, 18, "q"), (key, 19, "k"), (value, 20, "v")):
            couple(ctx, tensor, arg(op, position, f"{name}_proj_weight"), [(-1, 1)], role_b="in")
    else:
        for tensor in (query, key, value):
            couple(ctx, tensor, arg(op, 5, "in_proj_weight"), [(-1, 1)], role_b="in")
    couple(ctx, out, arg(op, 11, "out_proj_weight"), [(-1, 0)], role_b="out")
    couple(ctx, out, arg(op, 12, "out_proj_bias"), [(-1, 0)], role_b="bias")
    couple(ctx, query, out, same_dims(nd))  # one embed_dim: the module's input and output widths go together
    couple(ctx, key, value, same_dims(len(key.shape), skip=[-1]))


@register_rule("addmm")
def addmm(op: Op, ctx: RuleContext) -> None:
    """bias + mat1 @ mat2 (Hugging Face's GPT-2 Conv1D: weight laid out (in, out))."""
    bias, a, b, out = op.args[0], op.args[1], op.args[2], op.outputs[0]
    couple(ctx, a, b, [(-1, 0)], role_b="in")
    couple(ctx, a, out, [(0, 0)])
    couple(ctx, b, out, [(1, 1)], role_a="out")
    couple(ctx, bias, out, broadcast_pairs(bias, out), role_a="bias")


@register_rule("scaled_dot_product_attention")
def sdpa(op: Op, ctx: RuleContext) -> None:
    q, k, v, out = op.args[0], op.args[1], op.args[2], op.outputs[0]
    mask = arg(op, 3, "attn_mask")
    if isinstance(mask, Value) and len(mask.shape) >= 2:
        # the mask broadcasts against the scores (..., L, S): its batch and head dims are the query's (a
        # per-head bias loses the rows of the removed heads), its last dim the keys' positions
        nd = len(mask.shape)
        pairs = [(nd - 2, len(q.shape) - 2)]
        pairs += [(i, j) for i, j in _batch_pairs(mask, q, 2, 2) if mask.shape[i] > 1]
        couple(ctx, mask, q, pairs)
        couple(ctx, mask, k, [(nd - 1, len(k.shape) - 2)])
    couple(ctx, k, v, [(-2, -2)] + _batch_pairs(k, v, 2, 2))
    if len(q.shape) >= 3 and q.shape[-3] != k.shape[-3]:  # grouped-query attention (enable_gqa=True)
        _gqa(ctx, k, q, [(-1, -1)])
        _gqa(ctx, v, out, [(-1, -1)])
        couple(ctx, q, out, [(-2, -2)] + _batch_pairs(q, out, 2, 2))
        return
    couple(ctx, q, k, [(-1, -1)] + _batch_pairs(q, k, 2, 2))
    couple(ctx, q, out, [(-2, -2)] + _batch_pairs(q, out, 2, 2))
    couple(ctx, v, out, [(-1, -1)] + _batch_pairs(v, out, 2, 2))


def _gqa(ctx: RuleContext, kv: Value, qo: Value, pairs: list[tuple[int, int]]) -> None:
    """Couple a tensor with G key/value heads (dim -3) to one with H = G * r query heads: query head h
    reads key/value head h // r, so a unit must own whole groups of r query heads."""
    groups, heads = kv.shape[-3], qo.shape[-3]
    if heads % groups:
        raise Conflict(f"{heads} query heads do not divide into {groups} key/value heads")
    rep = heads // groups
    kv_shape = tuple(kv.shape)
    wide_shape = kv_shape[:-3] + (heads,) + kv_shape[-2:]
    pairs = pairs + [(-3, -3)] + [(i, i) for i in range(len(kv_shape) - 3) if kv_shape[i] == qo.shape[i]]
    owner = ctx.get(kv)
    if owner is not None:
        wide = full(owner, kv_shape).repeat_interleave(rep, dim=-3)
        moved = project(wide, wide_shape, qo.shape, pairs)
        if moved is not None:
            ctx.put(qo, moved)
    owner = ctx.get(qo)
    if owner is not None:
        narrow_shape = tuple(qo.shape[:-3]) + (groups,) + tuple(qo.shape[-2:])
        split = full(owner, qo.shape).unflatten(-3, (groups, rep))
        first = split.narrow(-3, 0, 1)
        if not bool((split == first).all()):
            raise SplitConflict("grouped-query attention: units must own whole key/value groups")
        moved = project(first.squeeze(-3), narrow_shape, kv_shape, [(j, i) for i, j in pairs])
        if moved is not None:
            ctx.put(kv, moved)


# -- layout: permute, reshape, cat, split, indexing ------------------------------------------------------
@register_rule("permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "T", "mT")
def permute(op: Op, ctx: RuleContext) -> None:
    x, out = op.args[0], op.outputs[0]
    nd = len(x.shape)
    if op.name == "permute":
        dims = op.args[1:] if len(op.args) > 2 else arg(op, 1, "dims")
        order = [_norm(d, nd) for d in (dims if not isinstance(dims, int) else op.args[1:])]
    elif op.name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = _norm(op.args[1], nd), _norm(op.args[2], nd)
        order = list(range(nd))
        order[d0], order[d1] = order[d1], order[d0]
    elif op.name == "movedim":
        src, dst = op.args[1], op.args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [o for o in range(nd) if o not in [_norm(s, nd) for s in src]]
        for s, d in sorted(zip([_norm(s, nd) for s in src], [_norm(d, nd) for d in dst]), key=lambda t: t[1]):
            order.insert(d, s)
    else:  # t, T, mT: swap the last two
        order = list(range(nd))
        if nd >= 2:
            order[-1], order[-2] = order[-2], order[-1]
    couple(ctx, x, out, [(src, dst) for dst, src in enumerate(order)])


@register_rule(
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "ravel",
    "squeeze_",
    "unsqueeze_",
)
def reshape(op: Op, ctx: RuleContext) -> None:
    x, out = op.args[0], op.outputs[0]
    for src, dst in ((x, out), (out, x)):
        owner = ctx.get(src)
        if owner is None:
            continue
        moved = compress(full(owner, src.shape).reshape(dst.shape))
        # merging dims (flatten) is exact: the runtime recomputes the merged size and each unit keeps its
        # positions in order. Splitting a pruned dim into several (view(b, g, c // g, ...)) relies on sizes
        # the model's code computes, which pruning would change unevenly.
        before = len(varying_dims(compress(align(owner, len(src.shape)))))
        if len(varying_dims(moved)) != before:
            if ctx.split_heads is None or len(varying_dims(moved)) < before:
                raise SplitConflict(f"{op.name} splits pruned channels into several dimensions")
            size, heads = _same_positions_per_head(op, ctx, moved)
            ctx.split_heads(op, size, heads)
        ctx.put(dst, moved)


def _same_positions_per_head(op: Op, ctx: RuleContext, moved: torch.Tensor) -> tuple[int, int]:
    """A split of the units' dim into heads (``(..., 3 * heads * d) -> (..., 3, heads, d)``) whose sizes
    only stay consistent if every head keeps the same count: position ``p`` of the innermost dim, in every
    head, becomes one unit. The heads' count stays and ``d`` shrinks, so the split's sizes hold whether the
    code computes ``d`` with ``-1`` or from another tensor's width (Swin's ``C // heads``: ``graph`` then
    ties the kept fractions). A scale computed from ``d`` (attention's ``d ** -0.5``) changes with it: the
    group is approximate. Returns the head size and the number of heads (of q, k and v together)."""
    dims = varying_dims(moved)
    size = moved.shape[dims[-1]]
    rows = moved.movedim(dims[-1], -1).reshape(-1, size)  # one row per head (the other dims have size 1)
    if not bool((rows >= 0).all()):
        raise SplitConflict(f"{op.name} splits pruned channels into heads that hold other channels too")
    ctx.approximate(
        f"{op.name} splits these channels into heads whose size shrinks (a scale computed from it changes)"
    )
    ctx.tie(rows[1:], rows[:1].expand(rows.shape[0] - 1, -1))  # `put` then sees every head alike
    return size, rows.shape[0]


def _cat_lines(ctx: RuleContext, out: Value, parts: list[Value], owned: list, dim: int) -> bool:
    """Concatenation of owners that vary only along the concatenated dim (DenseNet's channels): built and
    cut as 1-D lines, touching only the parts that own something. False when the output's owner varies
    along another dim too (the general rule handles it)."""
    nd = len(out.shape)
    current = ctx.get(out)
    if current is not None and set(varying_dims(align(current, nd))) - {dim}:
        return False
    sizes = [p.shape[dim] for p in parts]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    if any(o is not None for o in owned):
        line = torch.full((starts[-1],), -1, dtype=torch.long)
        for o, start, n in zip(owned, starts, sizes):
            if o is not None:
                line[start : start + n] = o.reshape(-1) if o.shape[dim] > 1 else o.reshape(-1).expand(n)
        ctx.put(out, along(starts[-1], dim, nd, line))
    current = ctx.get(out)
    if current is None:
        return True
    current = align(current, nd)
    line = unit_vector(current, dim) if current.shape[dim] > 1 else current.reshape(-1).expand(starts[-1])
    seen = torch.cat([torch.zeros(1, dtype=torch.long), (line >= 0).cumsum(0)]).tolist()
    for p, start, n in zip(parts, starts, sizes):
        if seen[start + n] > seen[start]:  # only parts that own some of the output's units
            ctx.put(p, along(n, dim, nd, line[start : start + n]))
    return True


@register_rule("cat", "concat", "concatenate")
def cat(op: Op, ctx: RuleContext) -> None:
    out = op.outputs[0]
    dim = _norm(arg(op, 1, "dim", op.kwargs.get("axis", 0)), len(out.shape))
    # legacy empty 1-D tensors (e.g. an empty cache) are allowed by torch.cat and hold nothing
    parts = [p for p in arg(op, 0, "tensors") if isinstance(p, Value) and len(p.shape) == len(out.shape)]
    nd = len(out.shape)
    owned = [None if o is None else align(o, nd) for o in (ctx.get(p) for p in parts)]
    if all(o is None or set(varying_dims(o)) <= {dim} for o in owned) and _cat_lines(
        ctx, out, parts, owned, dim
    ):
        return
    if any(o is not None for o in owned):
        # owners stay compressed in the other dimensions (full-size int64 copies of feature maps would
        # dominate the cost on DenseNet's long concatenations)
        shape = [1] * nd
        for o in owned:
            for d in varying_dims(o) if o is not None else ():
                if d != dim:
                    shape[d] = out.shape[d]
        pieces = []
        for o, p in zip(owned, parts):
            size = [*shape[:dim], p.shape[dim], *shape[dim + 1 :]]
            pieces.append(o.expand(size) if o is not None else torch.full(size, -1, dtype=torch.long))
        ctx.put(out, compress(torch.cat(pieces, dim)))
    owner = ctx.get(out)
    if owner is not None:
        owner = align(owner, nd)
        start = 0
        for p in parts:
            piece = owner if owner.shape[dim] == 1 else owner.narrow(dim, start, p.shape[dim])
            ctx.put(p, compress(piece))
            start += p.shape[dim]
    # the other dimensions are shared by every part (a class token concatenated to patch tokens has
    # the same channels as they do); coupling the parts directly keeps the output's positional owner apart.
    # Each part with the first is enough (the rule runs again when the first part changes); parts whose
    # units all lie along the concatenated dimension (DenseNet's channels) have nothing to share.
    shared = same_dims(len(out.shape), skip=[dim])
    if any(o is not None and set(varying_dims(o)) - {dim} for o in owned):
        for p in parts[1:]:
            couple(ctx, parts[0], p, shared)


@register_rule("split", "chunk", "split_with_sizes", "unbind", "tensor_split")
def split(op: Op, ctx: RuleContext) -> None:
    x = op.args[0]
    nd = len(x.shape)
    default = 0
    dim = _norm(arg(op, 1 if op.name == "unbind" else 2, "dim", default), nd)
    # the split sizes are computed by the model's code (or written in it): pruning along the split
    # dimension would move the boundaries, so only units in other dimensions pass through
    for v in (x, *op.outputs):
        owner = ctx.get(v)
        if owner is not None and dim < len(v.shape) and dim in varying_dims(align(owner, len(v.shape))):
            raise Conflict(
                f"{op.name} splits along the pruned channels; its sizes come from the model's code"
            )
    for piece in op.outputs:
        if op.name == "unbind":
            couple(ctx, x, piece, [(d, d - (d > dim)) for d in range(nd) if d != dim])
        else:
            couple(ctx, x, piece, same_dims(nd, skip=[dim]))


@register_rule("__setitem__")
def setitem(op: Op, ctx: RuleContext) -> None:
    """x[index] = value: like getitem, only whole slices along the units; an assigned tensor must not
    carry units of its own."""
    x, index, value, out = op.args[0], op.args[1], op.args[2], op.outputs[0]
    index = index if isinstance(index, tuple) else (index,)
    couple(ctx, x, out, same_dims(len(x.shape)))
    owner = ctx.get(x)
    if owner is None:
        return
    varying = set(varying_dims(align(owner, len(x.shape))))
    if any(isinstance(i, (Value, list, torch.Tensor)) for i in index) or any(
        dim in varying and entry != slice(None) for dim, entry in _indexed_dims(index, len(x.shape))
    ):
        raise Conflict("an assignment writes some of the pruned channels by fixed position")
    if isinstance(value, Value) and ctx.get(value) is not None:
        raise Conflict("an assignment copies pruned channels from another tensor")


def _indexed_dims(index: tuple, ndim: int) -> list[tuple[int, Any]]:
    """(input dim, entry) for each int/slice entry of a basic index (Ellipsis expands, None adds a dim)."""
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, d = [], 0
    for entry in index:
        if entry is Ellipsis:
            d += ndim - explicit
        elif entry is not None:
            out.append((d, entry))
            d += 1
    return out


@register_rule("__getitem__")
def getitem(op: Op, ctx: RuleContext) -> None:
    x, index, out = op.args[0], op.args[1], op.outputs[0]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Value, list, torch.Tensor)) for i in index):
        for v in (x, out):
            if ctx.get(v) is not None:
                raise Conflict("advanced indexing is not traced through")
        return
    nd = len(x.shape)
    entries = _indexed_dims(index, nd)

    def check() -> None:
        # a fixed int, a partial slice or a step along the units would pick other units once pruned
        owner = ctx.get(x)
        varying = set(varying_dims(align(owner, nd))) if owner is not None else set()
        if any(dim in varying and entry != slice(None) for dim, entry in entries):
            raise Conflict("indexing selects some of the pruned channels by fixed position")

    check()
    owner = ctx.get(x)
    if owner is not None:  # the same basic index applied to a full-size owner
        ctx.put(out, compress(full(owner, x.shape)[index].reshape(out.shape)))
    owner = ctx.get(out)
    if owner is not None:
        whole = torch.full(x.shape, -1, dtype=torch.long)
        whole[index] = full(owner, out.shape).reshape(whole[index].shape)
        ctx.put(x, compress(whole))
        check()
