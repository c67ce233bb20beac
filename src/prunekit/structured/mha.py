"""Whole-head pruning of ``nn.MultiheadAttention``.

PyTorch's module and its ``F.multi_head_attention_forward`` tie the attention width to the embedding
width (``head_dim = embed_dim // num_heads``), so a module with fewer heads but the same residual width
cannot be expressed with them. Removing heads (Michel et al., "Are Sixteen Heads Really Better than One?",
NeurIPS 2019) keeps ``embed_dim`` and ``head_dim`` and shrinks the projections instead: q/k/v rows and the
output projection's columns of the removed heads go. :class:`HeadPrunedMultiheadAttention` is an
``nn.MultiheadAttention`` with the same parameter names whose forward accepts that narrower inner width;
:func:`multi_head_attention_forward` is the functional form, with the same signature as PyTorch's, so
the structured tracer sees it as the same operation (and an already pruned model can be pruned again).
Semantics follow PyTorch's: boolean masks mark positions *not* to attend, float masks are added to the
scores, ``bias_k``/``bias_v`` and ``add_zero_attn`` append a key/value, and the returned attention
weights are averaged over the remaining heads. ``static_k``/``static_v`` are not supported.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import handle_torch_function, has_torch_function

from prunekit.errors import PrunekitError


def _additive(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> torch.Tensor | None:
    """A boolean mask (True = do not attend) as -inf/0; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise PrunekitError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    return mask.to(dtype)


def multi_head_attention_forward(
    query,
    key,
    value,
    embed_dim_to_check,
    num_heads,
    in_proj_weight,
    in_proj_bias,
    bias_k,
    bias_v,
    add_zero_attn,
    dropout_p,
    out_proj_weight,
    out_proj_bias,
    training=True,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    use_separate_proj_weight=False,
    q_proj_weight=None,
    k_proj_weight=None,
    v_proj_weight=None,
    static_k=None,
    static_v=None,
    average_attn_weights=True,
    is_causal=False,
):
    """``F.multi_head_attention_forward`` whose heads may be narrower in total than ``embed_dim``:
    inputs (L, N, E) or unbatched (L, E); the q/k/v projections have ``num_heads * head_dim`` rows each."""
    tensors = (
        query,
        key,
        value,
        in_proj_weight,
        in_proj_bias,
        bias_k,
        bias_v,
        out_proj_weight,
        out_proj_bias,
    )
    if has_torch_function(tensors):
        return handle_torch_function(
            multi_head_attention_forward,
            tensors,
            query,
            key,
            value,
            embed_dim_to_check,
            num_heads,
            in_proj_weight,
            in_proj_bias,
            bias_k,
            bias_v,
            add_zero_attn,
            dropout_p,
            out_proj_weight,
            out_proj_bias,
            training=training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=use_separate_proj_weight,
            q_proj_weight=q_proj_weight,
            k_proj_weight=k_proj_weight,
            v_proj_weight=v_proj_weight,
            static_k=static_k,
            static_v=static_v,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
    if static_k is not None or static_v is not None:
        raise PrunekitError("static_k / static_v are not supported by a head-pruned MultiheadAttention")
    if query.shape[-1] != embed_dim_to_check:
        raise PrunekitError(f"query has width {query.shape[-1]}, the module expects {embed_dim_to_check}")
    batched = query.dim() == 3
    if not batched:  # (L, E): a batch of one in the middle, as PyTorch does
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    dtype = query.dtype
    key_padding_mask = _additive(key_padding_mask, dtype, "key_padding_mask")
    attn_mask = _additive(attn_mask, dtype, "attn_mask")
    if is_causal and attn_mask is None:
        raise PrunekitError("is_causal=True needs attn_mask as well (PyTorch's MultiheadAttention rule)")

    if use_separate_proj_weight:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        weights = in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, weights[0], biases[0])
    k = F.linear(key, weights[1], biases[1])
    v = F.linear(value, weights[2], biases[2])
    head_dim = q.shape[-1] // num_heads

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    src_len = k.shape[1]
    if key_padding_mask is not None:
        padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
        padding = padding.reshape(bsz * num_heads, 1, src_len)
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if not training:
        dropout_p = 0.0

    scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights_ = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights_ = F.dropout(weights_, p=dropout_p)
    out = torch.bmm(weights_, v)  # (N*h, L, head_dim)
    out = out.transpose(0, 1).reshape(tgt_len, bsz, num_heads * head_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    if not batched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    attention = weights_.view(bsz, num_heads, tgt_len, src_len)
    if average_attn_weights:
        attention = attention.mean(dim=1)
    if not batched:
        attention = attention.squeeze(0)
    return out, attention


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` that has lost whole heads: ``embed_dim`` and ``head_dim`` are unchanged,
    ``num_heads`` is smaller, ``in_proj_weight`` has ``3 * num_heads * head_dim`` rows and ``out_proj``
    that many columns. Same parameter names, same call signature, same outputs as the original module with
    the removed heads' weights zeroed (attention weights, if asked for, average the remaining heads)."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        # the steps of nn.MultiheadAttention.forward's general path, in its order, so that a trace of the
        # pruned module runs the same operations as the original (the structured pruner compares them)
        batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and batched:
            if key is value:  # transpose shared inputs once, as the original does
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights


def fix_multihead_attention(module: nn.MultiheadAttention) -> None:
    """After its projections were sliced: count the remaining heads, read the embedding width, and take the
    forward that allows an attention width other than ``embed_dim``."""
    rows = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
    inner = rows.shape[0] // 3 if module._qkv_same_embed_dim else rows.shape[0]
    module.num_heads = inner // module.head_dim
    module.embed_dim = module.out_proj.weight.shape[0]  # the residual width may have been pruned too
    if module._qkv_same_embed_dim:
        module.kdim = module.vdim = module.embed_dim
    else:
        module.kdim, module.vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
    if inner != module.embed_dim and not isinstance(module, HeadPrunedMultiheadAttention):
        module.__class__ = HeadPrunedMultiheadAttention


def disable_fused_paths(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """Keep ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` off their fused inference kernels
    where the attention lost heads: those kernels read ``in_proj_weight`` directly and require
    ``3 * embed_dim`` rows. The attributes changed only steer that choice (the general path still uses
    the layer's activation). Returns ``(module, attribute, old value)`` for undoing."""
    changed: list[tuple[nn.Module, str, object]] = []
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if isinstance(module.self_attn, HeadPrunedMultiheadAttention) and module.activation_relu_or_gelu:
                changed.append((module, "activation_relu_or_gelu", module.activation_relu_or_gelu))
                module.activation_relu_or_gelu = 0
        elif (
            isinstance(module, nn.TransformerEncoder)
            and getattr(module, "use_nested_tensor", False)
            and any(isinstance(m, HeadPrunedMultiheadAttention) for m in module.modules())
        ):
            changed.append((module, "use_nested_tensor", True))
            module.use_nested_tensor = False
    return changed
