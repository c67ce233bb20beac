"""Groups of coupled dimensions, found by propagating unit owners through a trace.

Every operation that *creates* units (a conv's output channels, a linear layer's output features, an
embedding's width) seeds a candidate group: its output gets the owner ``arange(C)`` along the unit
dimension, and the owners spread through the rules in ``rules.py`` to every tensor and parameter tied
to them (the BatchNorm after a conv, the next conv's input channels, the other branch of a residual
add, the slice of a concatenation, the columns of a Linear after a flatten). A group that reaches a model
input or output, an operation without a rule, or an inconsistency is *blocked*: it keeps its units.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch

from prunekit.structured.owners import (
    Conflict,
    SplitConflict,
    align,
    compress,
    full,
    merge,
    to_shape,
    unit_vector,
    varying_dims,
)
from prunekit.structured.rules import RULES, RuleContext
from prunekit.structured.trace import Op, Trace, Value

log = logging.getLogger(__name__)

# op name -> (dimension of the output that holds the new units, position of the weight argument)
SEEDS = {
    "conv1d": (1, 1),
    "conv2d": (1, 1),
    "conv3d": (1, 1),
    "conv_transpose1d": (1, 1),
    "conv_transpose2d": (1, 1),
    "conv_transpose3d": (1, 1),
    "linear": (-1, 1),
    "embedding": (-1, 1),
    "addmm": (-1, 2),  # Hugging Face Conv1D (GPT-2): bias + x @ weight
}


@dataclass
class GroupParam:
    """A parameter or buffer of a group, with the unit owning each element (-1: not in the group)."""

    name: str
    owner: torch.Tensor
    role: str  # "out" | "in" | "norm" | "bias" | "other"

    @property
    def dim(self) -> int:
        dims = varying_dims(self.owner)
        if len(dims) != 1:
            raise Conflict(f"parameter {self.name} would be pruned along {len(dims)} dimensions")
        return dims[0]

    def line(self) -> torch.Tensor:
        """The 1-D owner along the pruned dimension."""
        index = [0] * self.owner.dim()
        index[self.dim] = slice(None)
        return self.owner[tuple(index)].reshape(-1)


@dataclass
class Group:
    index: int
    seed: str  # e.g. "conv2d -> layer1.0.conv1.weight"
    units: int
    members: list[GroupParam] = field(default_factory=list)
    owners: dict[int, torch.Tensor] = field(default_factory=dict)  # activation value index -> owner
    blocked: str = ""  # why the group cannot be pruned ("" when it can)
    block: int = 1  # consecutive channels per unit (head_dim for attention heads)
    split: bool = False  # blocked because units would be split across dimensions
    seed_value: int = -1  # the value index of the seed's output
    width: int = 0  # channels of the seed's output per unit (block, or more where units were tied)
    approximate: str = ""  # why pruning this group changes the outputs (norm statistics), "" when exact
    # (op index, head size, number of heads) of every reshape that splits the units into heads, each head
    # keeping the same positions (rules._same_positions_per_head; q, k and v of one projection count as
    # 3 * heads)
    head_splits: list[tuple[int, int, int]] = field(default_factory=list)
    # groups that must keep the same fraction of their units as this one: a head size the code computes
    # from their width (Swin: C // heads), see `_couple_computed_sizes`
    size_coupled: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.width = self.width or self.block

    @property
    def prunable(self) -> bool:
        return not self.blocked and any(m.role in ("out", "in") for m in self.members)


def _uses(trace: Trace) -> dict[int, list[Op]]:
    uses: dict[int, list[Op]] = defaultdict(list)
    for op in trace.ops:
        for v in [*op.inputs, *op.outputs]:
            uses[v.index].append(op)
    return uses


class _Units:
    """Union-find over a group's units: rules *tie* units that must go together (the channels at one
    position of every group of a grouped convolution, the channels of one GroupNorm group)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.table: torch.Tensor | None = None  # unit -> representative, once anything was tied

    def find(self, u: int) -> int:
        parent = self.parent
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    def union(self, a: list[int], b: list[int]) -> bool:
        merged = False
        for x, y in zip(a, b):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
                merged = True
        if merged:
            self.table = torch.tensor([self.find(u) for u in range(len(self.parent))], dtype=torch.long)
        return merged

    def canon(self, owner: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return owner
        return torch.where(owner >= 0, self.table[owner.clamp(min=0)], owner)


def _propagate(
    trace: Trace,
    uses,
    seed_op: Op,
    seed_dim: int,
    index: int,
    block: int = 1,
    norm_coupled: bool = False,
    split_heads: bool = False,
) -> Group:
    """Spread the seed's owners; ``block`` consecutive channels form one unit (e.g. one attention head).
    ``split_heads``: a reshape that splits the units into heads prunes the same positions of every head."""
    out = seed_op.outputs[0]
    dim = seed_dim % len(out.shape)
    units = out.shape[dim] // block
    weight = seed_op.args[SEEDS[seed_op.name][1]]
    group = Group(index, f"{seed_op.name} -> {getattr(weight, 'name', '?')}", units, block=block)
    group.seed_value = out.index
    # activations have one owner; a parameter has one slot per pruned dimension (a conv inside a
    # residual group owns both its rows and its columns)
    owners: dict[int | tuple[int, int], torch.Tensor] = {}
    slots: dict[int, list[tuple[int, int]]] = defaultdict(list)  # parameter value -> its keys in owners
    roles: dict[tuple[int, int], str] = {}
    queue: deque[Value] = deque()
    values = trace.values
    # a rule only needs to run again when an owner of one of its tensors changed since its last run:
    # `changed` stamps every change, `ran` the clock when an op's rule last started
    clock = 0
    changed: dict[int, int] = {}
    ran: dict[int, int] = {}
    tied = _Units(units)
    approximate: list[str] = []

    def is_param(v: Value) -> bool:
        return v.kind in ("param", "buffer")

    def get(v: Value, dims: list[int] | None = None) -> torch.Tensor | None:
        if not is_param(v):
            return owners.get(v.index)
        keys = slots.get(v.index)
        if not keys:
            return None
        if dims is not None:
            wanted = {d % max(len(v.shape), 1) for d in dims}
            keys = [k for k in keys if k[1] in wanted]
        if len(keys) > 1:
            raise Conflict(f"parameter {v.name} is tied to this group along two dimensions here")
        return owners[keys[0]] if keys else None

    def stamp(v: Value) -> None:
        nonlocal clock
        clock += 1
        changed[v.index] = clock
        queue.append(v)

    def put(v: Value, owner: torch.Tensor, role: str | None = None) -> None:
        owner = tied.canon(owner)
        key: int | tuple[int, int] = v.index
        if is_param(v):
            varying = varying_dims(to_shape(owner, v.shape))
            if len(varying) != 1:
                if not varying:
                    return  # a single-unit owner on a parameter carries no slicing information
                raise Conflict(f"parameter {v.name} would be pruned along {len(varying)} dimensions at once")
            key = (v.index, varying[0])
            if role and key not in roles:
                roles[key] = role
        merged, grew = merge(owners.get(key), owner, v.shape)
        if grew:
            if key not in owners and isinstance(key, tuple):
                slots[v.index].append(key)
            owners[key] = merged
            stamp(v)

    def tie(a: torch.Tensor, b: torch.Tensor) -> None:
        """Units ``a[i]`` and ``b[i]`` become one unit (both must be owned, i.e. >= 0)."""
        a, b = torch.broadcast_tensors(tied.canon(a), tied.canon(b))
        if bool(((a < 0) | (b < 0)).any()):
            raise Conflict("units would have to be tied to channels outside this group")
        if not tied.union(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
            return
        for key, owner in list(owners.items()):
            new = compress(tied.canon(owner))
            if new.shape != owner.shape or not torch.equal(new, owner):
                owners[key] = new
                stamp(values[key[0] if isinstance(key, tuple) else key])

    splits: dict[tuple[int, int, int], None] = {}

    def split(op: Op, size: int, heads: int) -> None:
        splits[(op.index, size, heads)] = None

    ctx = RuleContext(
        get,
        put,
        tie=tie,
        approximate=approximate.append,
        norm_coupled=norm_coupled,
        split_heads=split if split_heads else None,
    )
    shape = [1] * len(out.shape)
    shape[dim] = units * block
    put(out, torch.arange(units).repeat_interleave(block).reshape(shape))
    boundary = {v.index for v in trace.inputs} | {v.index for v in trace.outputs}
    try:
        while queue:
            value = queue.popleft()
            if value.index in boundary:
                raise Conflict("it reaches a model input or output, whose shape must not change")
            if value.kind == "const" and varying_dims(owners.get(value.index, torch.zeros(()))):
                raise Conflict("a tensor created inside forward() would need resizing")
            for op in uses.get(value.index, []):
                if op.index in ran and all(changed.get(v.index, 0) <= ran[op.index] for v in op.values):
                    continue  # nothing this op's rule reads changed since it last ran
                rule = RULES.get(op.name)
                if rule is None:
                    where = f" ({op.where})" if op.where else ""
                    raise Conflict(f"no rule for operation '{op.name}'{where}")
                ran[op.index] = clock
                try:
                    rule(op, ctx)
                except Conflict as exc:
                    where = f", {op.where}" if op.where else ""
                    raise type(exc)(f"{exc} (at '{op.name}', op {op.index}{where})") from None
    except Conflict as exc:
        group.blocked = str(exc)
        group.split = isinstance(exc, SplitConflict)
    if tied.table is not None and not group.blocked:
        _renumber(group, owners, tied, out, dim)
    group.approximate = "; ".join(dict.fromkeys(approximate))
    group.head_splits = list(splits)
    for key, owner in owners.items():
        if isinstance(key, tuple):
            if bool((owner >= 0).any()):
                group.members.append(GroupParam(values[key[0]].name, owner, roles.get(key, "other")))
        else:
            group.owners[key] = owner
    return group


def _renumber(group: Group, owners: dict, tied: _Units, out: Value, dim: int) -> None:
    """After ties: number the remaining units 0..n-1 in order and record how many seed channels each owns."""
    assert tied.table is not None
    roots = torch.unique(tied.table)
    dense = torch.full((len(tied.parent),), -1, dtype=torch.long)
    dense[roots] = torch.arange(len(roots))
    table = dense[tied.table]
    for key, owner in owners.items():
        owners[key] = compress(torch.where(owner >= 0, table[owner.clamp(min=0)], owner))
    group.units = len(roots)
    line = (
        unit_vector(full(owners[out.index], out.shape), dim)
        if dim in varying_dims(align(owners[out.index], len(out.shape)))
        else torch.zeros(out.shape[dim], dtype=torch.long)
    )
    counts = torch.bincount(line[line >= 0], minlength=group.units)
    group.width = int(counts.min()) if bool((counts == counts[0]).all()) else 1


_MHA_ARGS = {"in_proj_weight": 5, "in_proj_bias": 6, "bias_k": 7, "bias_v": 8, "out_proj_weight": 11}


def _mha_heads(op: Op, index: int) -> Group | None:
    """The heads of one ``nn.MultiheadAttention``: a group inside the module (Michel et al., 2019). Each
    head owns ``head_dim`` rows of the q, k and v projections, its slice of their biases and of
    ``bias_k``/``bias_v``, and ``head_dim`` columns of the output projection; nothing outside the module
    changes shape (see ``prunekit.structured.mha``)."""

    def arg(name: str, position: int | None = None):
        if position is not None and len(op.args) > position:
            return op.args[position]
        return op.kwargs.get(name)

    num_heads = arg("num_heads", 4)
    if arg("use_separate_proj_weight", 17):
        q_w, k_w, v_w = (arg(f"{c}_proj_weight", 18 + i) for i, c in enumerate("qkv"))
        projections = [q_w, k_w, v_w]
    else:
        projections = [arg("in_proj_weight", 5)]
    out_w = arg("out_proj_weight", 11)
    if not isinstance(num_heads, int) or not all(isinstance(w, Value) for w in [*projections, out_w]):
        return None
    inner = out_w.shape[1]
    head_dim = inner // num_heads
    heads = torch.arange(num_heads).repeat_interleave(head_dim)  # unit of each channel of one projection
    group = Group(index, f"multi_head_attention_forward -> {projections[0].name}", num_heads, block=head_dim)
    for w in projections:
        line = heads.repeat(w.shape[0] // inner)  # in_proj_weight stacks q, k and v
        group.members.append(GroupParam(w.name, line.reshape(-1, 1), "out"))
    group.members.append(GroupParam(out_w.name, heads.reshape(1, -1), "in"))
    for name in ("in_proj_bias", "bias_k", "bias_v"):
        b = arg(name, _MHA_ARGS[name])
        if isinstance(b, Value):
            owner = heads.repeat(b.shape[-1] // inner).reshape((1,) * (len(b.shape) - 1) + (-1,))
            group.members.append(GroupParam(b.name, owner, "bias"))
    return group


def find_groups(trace: Trace, norm_coupled: bool = False) -> list[Group]:
    """All candidate groups, in the order their seeding operations ran.

    ``norm_coupled``: also prune widths that a LayerNorm/RMSNorm/GroupNorm normalises over (the residual
    stream of a transformer); such groups are marked ``approximate``."""
    uses = _uses(trace)
    groups: list[Group] = []
    covered: dict[int, torch.Tensor] = {}  # seed output value -> union of owned positions so far
    seed_dims = {
        op.outputs[0].index: SEEDS[op.name][0] % len(op.outputs[0].shape)
        for op in trace.ops
        if op.name in SEEDS and op.outputs and op.outputs[0].shape
    }
    for op in trace.ops:
        if op.name not in SEEDS:
            continue
        position = SEEDS[op.name][1]
        weight = op.args[position] if len(op.args) > position else None
        if not isinstance(weight, Value) or weight.kind != "param":
            continue
        out = op.outputs[0]
        done = covered.get(out.index)
        if done is not None and bool(done.all()):
            continue  # an earlier group already owns every unit of this output
        group = _propagate(trace, uses, op, SEEDS[op.name][0], len(groups), norm_coupled=norm_coupled)
        channels = out.shape[SEEDS[op.name][0] % len(out.shape)]
        # a reshape that splits the channels (heads: view(b, t, heads, head_dim)) needs coarser units:
        # retry with blocks of consecutive channels, smallest first (head_dim, then whole KV groups, ...)
        split = group.split
        for block in (b for b in range(2, channels // 2 + 1) if channels % b == 0):
            if not group.split:
                break
            group = _propagate(trace, uses, op, SEEDS[op.name][0], len(groups), block, norm_coupled)
        if split and group.blocked and norm_coupled:
            # no coarser unit fits either (Swin: q, k and v are picked by position from one projection
            # split into heads of a computed size): the same positions of every head, approximately
            heads = _propagate(trace, uses, op, SEEDS[op.name][0], len(groups), 1, norm_coupled, True)
            group = group if heads.blocked else heads
        groups.append(group)
        # a seed whose output an earlier group already reached belongs to that group's component: the
        # same coupling would give the same (or the same blocked) group. Blocked groups count too, which
        # keeps discovery linear on long residual streams that cannot be pruned.
        for vi, owner in group.owners.items():
            dim = seed_dims.get(vi)
            if dim is None:
                continue
            owned = align(owner, len(trace.values[vi].shape)) >= 0
            if dim not in varying_dims(align(owner, owned.dim())):
                continue  # this group's units live in another dimension of that tensor
            others = [k for k in range(owned.dim()) if k != dim]
            line = owned.any(dim=others) if others else owned
            covered[vi] = line if vi not in covered else covered[vi] | line
        if group.blocked:
            log.info("group %d (%s) is not pruned: %s", group.index, group.seed, group.blocked)
    for op in trace.ops:
        if op.name == "multi_head_attention_forward":
            heads = _mha_heads(op, len(groups))
            if heads is not None:
                groups.append(heads)
    _couple_computed_sizes(trace, groups)
    return groups


def _couple_computed_sizes(trace: Trace, groups: list[Group]) -> None:
    """A head size the model's code computes from another tensor's width ties the two groups' counts.

    Swin's attention reshapes ``qkv`` to ``(..., 3, heads, C // heads)`` with ``C`` read from its input's
    shape: the residual stream's group owns ``C``, the head positions' group owns ``d = C // heads``, and
    the reshape only holds after pruning if ``C' = heads * d'``, i.e. both keep the same fraction of their
    units. No operation couples the two, so the coupling is read off the trace: the nearest tensor whose
    shape the code read before the split (within ``SHAPE_READ_WINDOW`` operations) that has a dimension
    owned by another group whose width is ``d`` times a divisor of the head count. A coincidence only
    over-constrains the counts; the pruner's re-trace of the pruned model checks what the sizes really are
    (and un-prunes coupled groups together)."""
    for group in groups:
        for op_index, size, heads in group.head_splits:
            for vi in trace.shapes_read(op_index):
                shape = trace.values[vi].shape
                found = [
                    other
                    for other in groups
                    if other is not group
                    and vi in other.owners
                    and any(
                        _divides_heads(shape[d], size, heads)
                        for d in varying_dims(align(other.owners[vi], len(shape)))
                    )
                ]
                for other in found:
                    group.size_coupled.add(other.index)
                    other.size_coupled.add(group.index)
                if found:
                    break


def _divides_heads(width: int, size: int, heads: int) -> bool:
    """Whether ``width`` is ``size`` times a divisor of ``heads`` (``C = heads * (C // heads)``)."""
    return width % size == 0 and heads % (width // size) == 0
