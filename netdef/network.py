"""AnchorDETR as a TensorRT network, one function per PyTorch block.

Read side by side with the PyTorch reference reference/torch_model.py (and the official modules it
mirrors): same names, same order (tests/test_network.py checks it); docs/netdef.md has a reading
guide. Layers are named after the PyTorch
module or parameter they mirror ("transformer.encoder_layers.3.self_attn.k_row_proj"), and the
tensors the reference model reports from ``intermediates()`` carry the same keys and layouts:

================  =============  ==============================================================
key               layout         what
================  =============  ==============================================================
backbone          (B,2048,h,w)   ResNet layer4 output
mask              (B,h,w) bool   padding mask at feature resolution, True = padding
input_proj        (B,256,h,w)    Conv1x1 + GroupNorm
posemb_row        (B,w,256)      adapt_pos1d(_sine(pos_row))
posemb_col        (B,h,256)      adapt_pos1d(_sine(pos_col))
encoder.{i}       (B,h,w,256)    after encoder layer i (the encoder works channels-last)
decoder.{i}       (B,Q,256)      after decoder layer i
================  =============  ==============================================================

In FP16 networks these tensors are fp16 (``mask`` stays bool). Outputs are always float32.

Exact rewrites used (each is named where it is made):

* Anything that depends only on weights is evaluated at build time (``fold_constants``): the anchor
  points, the pattern queries tiled over positions, the query position embeddings, and the whole
  self-attention of decoder layer 0, whose input is that constant query.
* RCDA keys are pooled before, not after, their projection: the mean over rows (columns) commutes
  with an affine map, so w + h vectors are projected instead of 2*h*w.
* The value bias passes through attention unchanged (every attention row sums to 1, so
  sum_j a_j (v_j + b) = sum_j a_j v_j + b); it is folded into out_proj's bias.
* Projections of one input share one matmul against concatenated weights, and position terms that
  are constant become constant offsets: W (x + p) + b = W x + (W p + b).
* The 1/sqrt(head_dim) query scaling is folded into the query weights.

Left to TensorRT on purpose: bias adds after matmuls (fused into the GEMM epilogue), the FP16 casts
around softmax and normalisation (fused into those kernels), and head split/merge shuffles (strides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from core.backend import backend_of, check_plugins
from core.config import BACKBONE_BLOCKS, NUM_TOPK, SINE_TEMPERATURE, AnchorDETRConfig
from core.errors import BadInput
from netdef import plugin_ops
from netdef.functional import MASK_FILL, Net
from plugins import NAMES as PLUGINS

INVERSE_SIGMOID_EPS = 1e-5


class NetworkConfigError(BadInput, ValueError):
    """A configuration, weights dict or option this network cannot build (command lines exit 2)."""


@dataclass(frozen=True)
class KeyMask:
    """The padding mask of one attention's keys, True = padding: ``mask`` (B, K) as the masked_softmax plugin
    takes it, and ``for_logits`` (B, 1, 1, K), which broadcasts over the heads and queries of (B, heads, Q, K)
    logits."""

    mask: Any
    for_logits: Any


@dataclass(frozen=True)
class KeyMasks:
    """The key masks of the transformer's attentions, taken once from the feature mask. RCDA: ``row`` (K = w),
    the mask's first row, masks the row logits and ``col`` (K = h), its first column, the column logits;
    multi-head: ``all`` (K = h*w), every position."""

    row: KeyMask | None = None
    col: KeyMask | None = None
    all: KeyMask | None = None


@dataclass
class BuildContext:
    """What every block function gets as ``ctx``: the verbs (``net``), the config, the weights, the enabled
    plugins. ``ctx.<op>_module(x, name)`` applies the PyTorch module ``name`` (its weights looked up by name);
    ``net.<op>(x, weights..., name)`` is the verb with explicit weights."""

    net: Net
    cfg: AnchorDETRConfig
    tensors: Mapping[str, Any]
    plugins: frozenset[str] = frozenset()

    def w(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise NetworkConfigError(
                f"weights have no tensor {key!r}: not builder-named weights for {self.cfg.variant} "
                "(load them with weights.load)"
            )
        return np.asarray(self.tensors[key], np.float32)

    def linear_module(self, x, name: str, scale: float = 1.0, bias: bool = True):
        """The PyTorch Linear called ``name``; ``scale`` multiplies its output (folded into the weights)."""
        b = self.w(f"{name}.bias") * scale if bias else None
        return self.net.linear(x, self.w(f"{name}.weight") * scale, b, name)

    def layer_norm_module(self, x, name: str):
        """The PyTorch LayerNorm called ``name`` (eps 1e-5)."""
        if self.uses("layer_norm"):
            return plugin_ops.layer_norm(self, x, name)
        return self.net.layer_norm(x, self.w(f"{name}.weight"), self.w(f"{name}.bias"), name)

    def uses(self, plugin_name: str) -> bool:
        """Whether plugin ``plugin_name`` is enabled, the one plugin switch: a block then calls its plugin
        formulation (netdef.plugin_ops), else composes native layers. A name that is no plugin is refused (a typo
        would otherwise pick the native formulation silently)."""
        if plugin_name not in PLUGINS:
            raise ValueError(f"no plugin {plugin_name!r}: choose from {', '.join(PLUGINS)}")
        return plugin_name in self.plugins


# ================================ Reference functions (reference.torch_model's module-level functions)
def inverse_sigmoid(ctx: BuildContext, x):
    net, p = ctx.net, "transformer.inverse_sigmoid"
    x = net.clamp(x, 0.0, 1.0, f"{p}.clamp")
    x1 = net.clamp(x, INVERSE_SIGMOID_EPS, 1.0, f"{p}.x1")
    x2 = net.clamp(net.sub(1.0, x, f"{p}.one_minus"), INVERSE_SIGMOID_EPS, 1.0, f"{p}.x2")
    return net.log(net.div(x1, x2, f"{p}.ratio"), p)


def feature_mask(ctx: BuildContext, masks, feature):
    """``F.interpolate(mask[None].float(), size=(h, w)).bool()``: nearest, input index floor(i*H/h).
    Resize does not take bool, so a float32 copy is resized (0/1 are exact in any float type)."""
    net = ctx.net
    as_float = net.cast(masks, net.trt.float32, "mask.to_float")
    size = net.shape_of(feature, (0, 2, 3), "mask.size")
    small = net.resize_nearest(as_float, size, "mask.interpolate")
    return net.rename(net.cast(small, net.trt.bool, "mask.to_bool"), "mask")


def mask2pos(ctx: BuildContext, mask, key_masks: KeyMasks | None = None):
    """pos_col (B, h), pos_row (B, w): (cumsum of not-mask along the first column / row - 0.5) / last. The first
    column and row are RCDA's key masks where ``key_masks`` has them already."""
    net = ctx.net
    out = []
    for kind, axis in (("col", 2), ("row", 1)):
        taken = getattr(key_masks, kind) if key_masks is not None else None
        first = taken.mask if taken is not None else net.take(mask, 0, axis, f"mask2pos.{kind}.first")
        not_mask = net.cast(net.logical_not(first, f"mask2pos.{kind}.not"), net.trt.float32, f"mask2pos.{kind}.float")
        embed = net.cumsum(not_mask, 1, f"mask2pos.{kind}.cumsum")
        # The last cumsum value is the count of unpadded entries: a sum needs no dynamic slice.
        last = net.sum(not_mask, (1,), f"mask2pos.{kind}.last")
        out.append(net.div(net.sub(embed, 0.5, f"mask2pos.{kind}.center"), last, f"mask2pos.{kind}"))
    return out[0], out[1]


def _sine(ctx: BuildContext, pos, num_feats: int, name: str):
    """The sine embedding of positions (...,) -> (..., num_feats), float32 (a position needs more than
    fp16's 11 bits: 2*pi*p reaches the top frequency's period)."""
    net = ctx.net
    dim_t = np.arange(num_feats, dtype=np.float32)
    dim_t = (float(SINE_TEMPERATURE) ** (2 * (dim_t // 2) / num_feats).astype(np.float64)).astype(np.float32)
    pos = net.unsqueeze(pos, (net.rank(pos),), f"{name}.unsqueeze")
    # pos * 2pi / dim_t in the official order of operations.
    angle = net.div(net.mul(pos, np.float32(2 * math.pi), f"{name}.scale"), dim_t, f"{name}.angle")
    even = (np.arange(num_feats) % 2 == 0)
    # Interleaved: feature 2j = sin(angle 2j), 2j+1 = cos(angle 2j+1).
    return net.select(even, net.sin(angle, f"{name}.sin"), net.cos(angle, f"{name}.cos"), name)


def pos2posemb1d(ctx: BuildContext, pos, name: str):
    return _sine(ctx, pos, ctx.cfg.d_model, name)


def mask2posemb1d(ctx: BuildContext, mask, key_masks: KeyMasks):
    """pos2posemb1d(mask2pos(mask)): emb_col (B, h, C) and emb_row (B, w, C), float32."""
    if ctx.uses("mask2pos"):
        return plugin_ops.mask2posemb1d(ctx, mask)
    pos_col, pos_row = mask2pos(ctx, mask, key_masks)
    emb_row = pos2posemb1d(ctx, pos_row, "transformer.posemb_row")
    return pos2posemb1d(ctx, pos_col, "transformer.posemb_col"), emb_row


def pos2posemb2d(ctx: BuildContext, pos, name: str):
    """Points (..., 2) as (x, y) -> the y embedding then the x embedding, d_model/2 features each."""
    net, half = ctx.net, ctx.cfg.d_model // 2
    x = _sine(ctx, net.take(pos, 0, -1, f"{name}.x"), half, f"{name}.emb_x")
    y = _sine(ctx, net.take(pos, 1, -1, f"{name}.y"), half, f"{name}.emb_y")
    return net.concat([y, x], -1, name)


def _heads(ctx: BuildContext, x, name: str):
    """(B, L, C) -> (B, heads, L, head_dim)."""
    return ctx.net.shuffle(x, name, dims=(0, 0, ctx.cfg.nheads, ctx.cfg.head_dim), second=(0, 2, 1, 3))


def _merge_heads(ctx: BuildContext, x, name: str):
    """(B, heads, L, head_dim) -> (B, L, C)."""
    return ctx.net.shuffle(x, name, first=(0, 2, 1, 3), dims=(0, 0, ctx.cfg.d_model))


def _masked_softmax(ctx: BuildContext, logits, key_mask: KeyMask | None, name: str):
    """Softmax over keys with padded keys at 0, or over all keys without a mask (the official fills -inf; a
    finite fill keeps a fully padded row finite)."""
    if key_mask is not None and ctx.uses("masked_softmax"):  # the plugin needs a mask
        return plugin_ops.masked_softmax(ctx, logits, key_mask.mask, name)
    net = ctx.net
    # FP16: max, exp and the row sum in float32; the casts fuse into the softmax kernel.
    x = net.to_float32(logits, f"{name}.to_float32")
    if key_mask is not None:
        x = net.select(key_mask.for_logits, np.float32(MASK_FILL), x, f"{name}.masked_fill")
    return net.to_compute(net.softmax(x, -1, name), f"{name}.to_half")


def row_column_attention(ctx: BuildContext, a: str, q_row, q_col, k_row, k_col, v, key_masks: KeyMasks):
    """The reference's ``rcda`` on what this network has at hand: scaled queries in heads and keys pooled (and
    projected) before their head split, where the reference takes the raw projections.

    q_row, q_col (B|1, heads, Q, head_dim), already scaled; k_row (B, w, C) and k_col (B, h, C) pooled;
    v (B, h, w, C) without bias. Returns (B, Q, C), before out_proj:
    out[q] = sum_{y,x} A_col[q,y] A_row[q,x] v[y,x], rows first (T[q,y] = sum_x A_row[q,x] v[y,x], then
    sum_y A_col[q,y] T[q,y]): T has the short edge h for landscape images, as the official code's
    efficient path chooses for them.
    """
    net, cfg = ctx.net, ctx.cfg
    k_row = _heads(ctx, k_row, f"{a}.k_row.heads")
    k_col = _heads(ctx, k_col, f"{a}.k_col.heads")
    attn_row = _masked_softmax(ctx, net.matmul(q_row, k_row, f"{a}.logits_row", transpose_b=True),
                               key_masks.row, f"{a}.softmax_row")
    attn_col = _masked_softmax(ctx, net.matmul(q_col, k_col, f"{a}.logits_col", transpose_b=True),
                               key_masks.col, f"{a}.softmax_col")
    # v (B, h, w, C) -> (B, heads, w, h*head_dim)
    v = net.shuffle(v, f"{a}.v.heads", dims=(0, 0, 0, cfg.nheads, cfg.head_dim), second=(0, 3, 2, 1, 4))
    v = net.reshape(v, (0, 0, 0, -1), f"{a}.v.flat")
    per_row = net.matmul(attn_row, v, f"{a}.attend_row")  # (B, heads, Q, h*head_dim)
    per_row = net.reshape(per_row, (0, 0, 0, -1, cfg.head_dim), f"{a}.attend_row.split")  # (B, heads, Q, h, hd)
    # Weight the rows: sum over h of A_col (B, heads, Q, h, 1) * T (B, heads, Q, h, hd). As a product and a
    # sum rather than a batched (1 x h) @ (h x hd) matmul: Myelin then reads T once in place, where the
    # matmul form made the FP32 build at batch 8 x 1344x1344 ask for 8.7 GB of workspace (T is 4.9 GB).
    attn_col = net.reshape(attn_col, (0, 0, 0, -1, 1), f"{a}.softmax_col.unsqueeze")
    out = net.sum(net.mul(attn_col, per_row, f"{a}.attend_col.weight"), (3,), f"{a}.attend_col", keep_dims=False)
    return _merge_heads(ctx, out, f"{a}.merge_heads")


def dot_product_attention(ctx: BuildContext, a: str, q, k, v, key_mask: KeyMask | None = None):
    """The reference's ``multihead_attention`` on heads: q (B|1, heads, Lq, hd) already scaled, k and v
    (B|1, heads, Lk, hd), v without bias -> (B, Lq, C), before out_proj."""
    net = ctx.net
    logits = net.matmul(q, k, f"{a}.logits", transpose_b=True)
    attn = _masked_softmax(ctx, logits, key_mask, f"{a}.softmax")
    return _merge_heads(ctx, net.matmul(attn, v, f"{a}.attend"), f"{a}.merge_heads")


# ================================ Backbone: torchvision's ResNet (Bottleneck, ResNetBody)
def bottleneck(ctx: BuildContext, x, p: str, stride: int, dilation: int, downsample: bool):
    net = ctx.net
    identity = x
    out = net.conv2d(x, ctx.w(f"{p}.conv1.weight"), ctx.w(f"{p}.conv1.bias"), f"{p}.conv1")
    out = net.relu(out, f"{p}.relu1")
    out = net.conv2d(out, ctx.w(f"{p}.conv2.weight"), ctx.w(f"{p}.conv2.bias"), f"{p}.conv2",
                     stride=stride, padding=dilation, dilation=dilation)
    out = net.relu(out, f"{p}.relu2")
    out = net.conv2d(out, ctx.w(f"{p}.conv3.weight"), ctx.w(f"{p}.conv3.bias"), f"{p}.conv3")
    if downsample:
        identity = net.conv2d(x, ctx.w(f"{p}.downsample.0.weight"), ctx.w(f"{p}.downsample.0.bias"),
                              f"{p}.downsample.0", stride=stride)
    out = net.add(out, identity, f"{p}.residual")
    return net.relu(out, f"{p}.relu3")


def backbone(ctx: BuildContext, x):
    """ResNet body up to layer4; every BatchNorm is already folded into the conv before it."""
    net, p = ctx.net, "backbone.body"
    x = net.conv2d(x, ctx.w(f"{p}.conv1.weight"), ctx.w(f"{p}.conv1.bias"), f"{p}.conv1", stride=2, padding=3)
    x = net.relu(x, f"{p}.relu")
    x = net.max_pool2d(x, 3, 2, 1, f"{p}.maxpool")
    dilation = 1
    for layer, (blocks, stride) in enumerate(zip(BACKBONE_BLOCKS[ctx.cfg.backbone], (1, 2, 2, 2)), 1):
        previous = dilation
        if layer == 4 and ctx.cfg.dilation:
            # DC5 (replace_stride_with_dilation): layer4 keeps the resolution; its first block
            # keeps the previous dilation, the others use dilation 2.
            dilation, stride = dilation * 2, 1
        for i in range(blocks):
            x = bottleneck(ctx, x, f"{p}.layer{layer}.{i}", stride if i == 0 else 1,
                           previous if i == 0 else dilation, downsample=i == 0)
    return x


# ================================ Transformer blocks (RCDA, MultiheadAttention, FFN, MLP, adapters, layers)
def _out_proj(ctx: BuildContext, a: str, x):
    """out_proj(attention + v_proj.bias): the value bias moved through the attention (rows sum to 1)."""
    weight, bias = ctx.w(f"{a}.out_proj.weight"), ctx.w(f"{a}.out_proj.bias")
    moved = bias + weight.astype(np.float64) @ ctx.w(f"{a}.v_proj.bias")  # float64: the same on every CPU's BLAS
    return ctx.net.linear(x, weight, moved.astype(np.float32), f"{a}.out_proj")


def _add_query_offset(ctx: BuildContext, heads, offset, name: str):
    """heads (B, heads, Q, head_dim) + the per-query constant offset (1, Q, C) split into heads.

    Added after the head split, never to the in-projection's output: full TensorRT and TensorRT-RTX fail to
    build (a segfault, or Myelin's "Arguments to operator* cannot be undefined") when a (1, Q, N) constant is
    added to a matmul output of that same shape, which is what a static batch of 1 makes of it."""
    return ctx.net.add(heads, _heads(ctx, offset, f"{name}.offset.heads"), f"{name}.add_offset")


def encoder_rcda(ctx: BuildContext, a: str, src, posemb_row, posemb_col, key_masks: KeyMasks):
    """self_attn(q_row = src + posemb_row, q_col = src + posemb_col, k_row = src + posemb_row,
    k_col = src + posemb_col, v = src) with posemb_row broadcast over h and posemb_col over w."""
    net, c, s = ctx.net, ctx.cfg.d_model, ctx.cfg.head_dim ** -0.5
    if ctx.uses("add_bias_transpose"):
        q_row, q_col, v = plugin_ops.encoder_rcda_in_proj(ctx, a, src, posemb_row, posemb_col)
    else:
        # One matmul for the three projections that read src: W_qr (src + p) + b = W_qr src + (W_qr p + b), and
        # the position term is projected at (B, w, C) / (B, h, C) instead of (B, h, w, C).
        weight = np.concatenate([ctx.w(f"{a}.q_row_proj.weight") * s, ctx.w(f"{a}.q_col_proj.weight") * s,
                                 ctx.w(f"{a}.v_proj.weight")])
        proj = net.reshape(net.linear(src, weight, None, f"{a}.in_proj"), (0, 0, 0, 3, c), f"{a}.in_proj.split")
        q_row = net.add(net.take(proj, 0, 3, f"{a}.in_proj.q_row"),
                        net.unsqueeze(ctx.linear_module(posemb_row, f"{a}.q_row_proj", s), (1,),
                                      f"{a}.q_row_proj.rows"), f"{a}.q_row")
        q_col = net.add(net.take(proj, 1, 3, f"{a}.in_proj.q_col"),
                        net.unsqueeze(ctx.linear_module(posemb_col, f"{a}.q_col_proj", s), (2,),
                                      f"{a}.q_col_proj.cols"), f"{a}.q_col")
        v = net.take(proj, 2, 3, f"{a}.in_proj.v")
        q_row = _heads(ctx, net.reshape(q_row, (0, -1, c), f"{a}.q_row.flat"), f"{a}.q_row.heads")
        q_col = _heads(ctx, net.reshape(q_col, (0, -1, c), f"{a}.q_col.flat"), f"{a}.q_col.heads")
    # Keys pooled before projection (mean and an affine map commute).
    key_row = net.add(net.mean(src, (1,), f"{a}.mean_rows", keep_dims=False), posemb_row, f"{a}.key_row")
    k_row = ctx.linear_module(key_row, f"{a}.k_row_proj")
    key_col = net.add(net.mean(src, (2,), f"{a}.mean_cols", keep_dims=False), posemb_col, f"{a}.key_col")
    k_col = ctx.linear_module(key_col, f"{a}.k_col_proj")
    out = _out_proj(ctx, a, row_column_attention(ctx, a, q_row, q_col, k_row, k_col, v, key_masks))
    return net.reshape(out, net.shape(src, f"{a}.src_shape"), f"{a}.unflatten")  # (B, h*w, C) -> (B, h, w, C)


def decoder_rcda(ctx: BuildContext, a: str, tgt, query_pos, memory, pooled, key_masks: KeyMasks):
    """cross_attn(q_row = tgt + query_pos_x, q_col = tgt + query_pos_y, k_row = memory + posemb_row,
    k_col = memory + posemb_col, v = memory), the keys pooled once for all layers (``pooled``)."""
    net, cfg = ctx.net, ctx.cfg
    if ctx.uses("add_bias_transpose"):
        q_row, q_col = plugin_ops.decoder_rcda_queries(ctx, a, tgt, query_pos)
    else:
        # [q_row | q_col] = tgt [Wqr s | Wqc s]^T + [(Wqr pos_x + bqr) s | (Wqc pos_y + bqc) s]
        s = cfg.head_dim ** -0.5
        weight = np.concatenate([ctx.w(f"{a}.q_row_proj.weight") * s, ctx.w(f"{a}.q_col_proj.weight") * s])
        q = net.linear(tgt, weight, None, f"{a}.in_proj")
        q = net.shuffle(q, f"{a}.heads", dims=(0, 0, 2, cfg.nheads, cfg.head_dim), second=(2, 0, 3, 1, 4))
        q_row = _add_query_offset(ctx, net.take(q, 0, 0, f"{a}.q_row"),
                                  ctx.linear_module(query_pos["x"], f"{a}.q_row_proj", s), f"{a}.q_row")
        q_col = _add_query_offset(ctx, net.take(q, 1, 0, f"{a}.q_col"),
                                  ctx.linear_module(query_pos["y"], f"{a}.q_col_proj", s), f"{a}.q_col")
    k_row = ctx.linear_module(pooled["row"], f"{a}.k_row_proj")
    k_col = ctx.linear_module(pooled["col"], f"{a}.k_col_proj")
    v = ctx.linear_module(memory, f"{a}.v_proj", bias=False)
    return _out_proj(ctx, a, row_column_attention(ctx, a, q_row, q_col, k_row, k_col, v, key_masks))


def self_attention(ctx: BuildContext, a: str, tgt, query_pos):
    """nn.MultiheadAttention(q = k = tgt + query_pos, v = tgt) over the queries, no mask."""
    net, cfg = ctx.net, ctx.cfg
    s = cfg.head_dim ** -0.5
    wq, wk, wv = (ctx.w(f"{a}.{n}_proj.weight") for n in ("q", "k", "v"))
    # [q | k | v] = tgt [Wq s | Wk | Wv]^T + [(Wq pos + bq) s | Wk pos + bk | 0] (v's bias: out_proj)
    qkv = net.linear(tgt, np.concatenate([wq * s, wk, wv]), None, f"{a}.in_proj")
    qkv = net.shuffle(qkv, f"{a}.heads", dims=(0, 0, 3, cfg.nheads, cfg.head_dim), second=(2, 0, 3, 1, 4))
    q, k, v = (net.take(qkv, j, 0, f"{a}.{n}") for j, n in enumerate("qkv"))
    q = _add_query_offset(ctx, q, ctx.linear_module(query_pos, f"{a}.q_proj", s), f"{a}.q")
    k = _add_query_offset(ctx, k, ctx.linear_module(query_pos, f"{a}.k_proj"), f"{a}.k")
    return _out_proj(ctx, a, dot_product_attention(ctx, a, q, k, v))


def encoder_mha(ctx: BuildContext, a: str, src, posemb_2d, key_masks: KeyMasks):
    """self_attn(q = k = src + posemb_2d, v = src) over all h*w positions, padding masked (ablation)."""
    net, cfg = ctx.net, ctx.cfg
    c, s = cfg.d_model, cfg.head_dim ** -0.5
    flat = net.reshape(src, (0, -1, c), f"{a}.src.flat")
    query = net.reshape(net.add(src, posemb_2d, f"{a}.query"), (0, -1, c), f"{a}.query.flat")
    weight = np.concatenate([ctx.w(f"{a}.q_proj.weight") * s, ctx.w(f"{a}.k_proj.weight")])
    bias = np.concatenate([ctx.w(f"{a}.q_proj.bias") * s, ctx.w(f"{a}.k_proj.bias")])
    qk = net.shuffle(net.linear(query, weight, bias, f"{a}.in_proj"), f"{a}.heads",
                     dims=(0, 0, 2, cfg.nheads, cfg.head_dim), second=(2, 0, 3, 1, 4))
    v = _heads(ctx, ctx.linear_module(flat, f"{a}.v_proj", bias=False), f"{a}.v.heads")
    q, k = net.take(qk, 0, 0, f"{a}.q"), net.take(qk, 1, 0, f"{a}.k")
    out = _out_proj(ctx, a, dot_product_attention(ctx, a, q, k, v, key_masks.all))
    return net.reshape(out, net.shape(src, f"{a}.src_shape"), f"{a}.unflatten")


def decoder_mha(ctx: BuildContext, a: str, tgt, query_pos, memory, memory_key, key_masks: KeyMasks):
    """cross_attn(q = tgt + query_pos, k = memory_key = memory + posemb_2d, v = memory), padding masked
    (ablation)."""
    net, cfg = ctx.net, ctx.cfg
    c, s = cfg.d_model, cfg.head_dim ** -0.5
    # W_q (tgt + pos) + b = W_q tgt + (W_q pos + b): the position term is a constant.
    q = _heads(ctx, net.linear(tgt, ctx.w(f"{a}.q_proj.weight") * s, None, f"{a}.q_proj[tgt]"), f"{a}.q.heads")
    q = _add_query_offset(ctx, q, ctx.linear_module(query_pos, f"{a}.q_proj", s), f"{a}.q")
    k = ctx.linear_module(memory_key, f"{a}.k_proj")
    v = ctx.linear_module(net.reshape(memory, (0, -1, c), f"{a}.memory.flat"), f"{a}.v_proj", bias=False)
    k, v = _heads(ctx, k, f"{a}.k.heads"), _heads(ctx, v, f"{a}.v.heads")
    return _out_proj(ctx, a, dot_product_attention(ctx, a, q, k, v, key_masks.all))


def ffn(ctx: BuildContext, p: str, src):
    net = ctx.net
    x = net.relu(ctx.linear_module(src, f"{p}.linear1"), f"{p}.activation")
    x = ctx.linear_module(x, f"{p}.linear2")
    return ctx.layer_norm_module(net.add(src, x, f"{p}.residual"), f"{p}.norm2")


def mlp(ctx: BuildContext, x, p: str, num_layers: int):
    """MLP: Linear layers with ReLU between them."""
    for j in range(num_layers):
        x = ctx.linear_module(x, f"{p}.layers.{j}")
        if j < num_layers - 1:
            x = ctx.net.relu(x, f"{p}.relu{j}")
    return x


def adapt_pos(ctx: BuildContext, emb, p: str, use: str | None = None):
    """adapt_pos1d / adapt_pos2d: Linear, ReLU, Linear. ``use`` tells apart the layers of one shared
    module applied to several inputs (their names must differ)."""
    net = ctx.net
    tag = f"[{use}]" if use else ""
    x = net.to_compute(emb, f"{p}{tag}.input")
    x = net.linear(x, ctx.w(f"{p}.0.weight"), ctx.w(f"{p}.0.bias"), f"{p}.0{tag}")
    x = net.relu(x, f"{p}.1{tag}")
    return net.linear(x, ctx.w(f"{p}.2.weight"), ctx.w(f"{p}.2.bias"), f"{p}.2{tag}")


def encoder_layer(ctx: BuildContext, i: int, src, pos, key_masks: KeyMasks):
    """src (B, h, w, C) channels-last throughout."""
    net, p = ctx.net, f"transformer.encoder_layers.{i}"
    if ctx.cfg.attention_type == "RCDA":
        src2 = encoder_rcda(ctx, f"{p}.self_attn", src, pos["row"], pos["col"], key_masks)
    else:
        src2 = encoder_mha(ctx, f"{p}.self_attn", src, pos["2d"], key_masks)
    src = ctx.layer_norm_module(net.add(src, src2, f"{p}.residual1"), f"{p}.norm1")
    return ffn(ctx, f"{p}.ffn", src)


def decoder_layer(ctx: BuildContext, i: int, tgt, query_pos, memory, pooled, key_masks: KeyMasks):
    net, p = ctx.net, f"transformer.decoder_layers.{i}"
    # self attention: q = k = tgt + query_pos, v = tgt
    tgt2 = self_attention(ctx, f"{p}.self_attn", tgt, query_pos["2d"])
    tgt = ctx.layer_norm_module(net.add(tgt, tgt2, f"{p}.residual2"), f"{p}.norm2")
    if ctx.cfg.attention_type == "RCDA":
        tgt2 = decoder_rcda(ctx, f"{p}.cross_attn", tgt, query_pos, memory, pooled, key_masks)
    else:
        tgt2 = decoder_mha(ctx, f"{p}.cross_attn", tgt, query_pos["2d"], memory, pooled["2d"], key_masks)
    tgt = ctx.layer_norm_module(net.add(tgt, tgt2, f"{p}.residual1"), f"{p}.norm1")
    return ffn(ctx, f"{p}.ffn", tgt)


# ================================ Transformer (anchor_points, memory_pos, query_pos, forward)
def anchor_points(ctx: BuildContext):
    """reference_points (1, Q, 2): the learned (or grid) anchors (x, y), repeated for every pattern."""
    cfg, net = ctx.cfg, ctx.net
    if cfg.spatial_prior == "learned":
        points = ctx.w("transformer.position.weight")
    else:
        side = round(math.sqrt(cfg.num_position))
        x = (np.arange(side, dtype=np.float32) + 0.5) / side
        # torch.meshgrid(x, y) is "ij"-indexed: position k = (x[k // side], y[k % side]).
        points = np.stack([np.repeat(x, side), np.tile(x, side)], -1).astype(np.float32)
    points = net.reshape(points, (1, 1, cfg.num_position, 2), "transformer.position")
    points = net.expand(points, (1, cfg.num_query_pattern, cfg.num_position, 2), "transformer.position.repeat")
    return net.reshape(points, (1, cfg.num_queries, 2), "transformer.reference_points")


def posemb2d_grid(ctx: BuildContext, pos_row, pos_col):
    """adapt_pos2d(pos2posemb2d(grid)) for the grid point (x = pos_row[j], y = pos_col[i]) at (i, j).

    The first Linear is split by its input halves, W [e_y; e_x] = W_y e_y + W_x e_x, so the (B, h, w, C)
    embedding grid is never materialised: (B, h, 1, C) + (B, 1, w, C) broadcast.
    """
    net, p, half = ctx.net, "transformer.adapt_pos2d", ctx.cfg.d_model // 2
    w0 = ctx.w(f"{p}.0.weight")
    e_y = net.to_compute(_sine(ctx, pos_col, half, "transformer.posemb_2d.emb_y"), f"{p}.0[y].input")
    e_x = net.to_compute(_sine(ctx, pos_row, half, "transformer.posemb_2d.emb_x"), f"{p}.0[x].input")
    y = net.unsqueeze(net.linear(e_y, w0[:, :half], ctx.w(f"{p}.0.bias"), f"{p}.0[y]"), (2,), f"{p}.0[y].cols")
    x = net.unsqueeze(net.linear(e_x, w0[:, half:], None, f"{p}.0[x]"), (1,), f"{p}.0[x].rows")
    hidden = net.relu(net.add(y, x, f"{p}.0[grid]"), f"{p}.1[grid]")
    return net.linear(hidden, ctx.w(f"{p}.2.weight"), ctx.w(f"{p}.2.bias"), f"{p}.2[grid]")


def memory_pos(ctx: BuildContext, mask, key_masks: KeyMasks) -> dict[str, Any]:
    """Position embeddings of the memory: RCDA "row" (B, w, C) and "col" (B, h, C); multi-head "2d"
    (B, h, w, C)."""
    net, t = ctx.net, "transformer"
    if ctx.cfg.attention_type != "RCDA":
        pos_col, pos_row = mask2pos(ctx, mask, key_masks)
        return {"2d": net.rename(posemb2d_grid(ctx, pos_row, pos_col), "posemb_2d")}
    emb_col, emb_row = mask2posemb1d(ctx, mask, key_masks)
    return {"row": net.rename(adapt_pos(ctx, emb_row, f"{t}.adapt_pos1d", "row"), "posemb_row"),
            "col": net.rename(adapt_pos(ctx, emb_col, f"{t}.adapt_pos1d", "col"), "posemb_col")}


def query_pos(ctx: BuildContext, reference_points) -> dict[str, Any]:
    """"2d": adapt_pos2d(pos2posemb2d(anchors)); RCDA also "x" and "y": adapt_pos1d of each coordinate."""
    net, t = ctx.net, "transformer"
    out = {"2d": adapt_pos(ctx, pos2posemb2d(ctx, reference_points, f"{t}.query_pos"), f"{t}.adapt_pos2d")}
    if ctx.cfg.attention_type == "RCDA":
        for j, axis in enumerate("xy"):
            coord = net.take(reference_points, j, -1, f"{t}.reference_{axis}")
            out[axis] = adapt_pos(ctx, pos2posemb1d(ctx, coord, f"{t}.query_pos_{axis}"), f"{t}.adapt_pos1d",
                                  f"query_pos_{axis}")
    return out


def key_masks(ctx: BuildContext, mask) -> KeyMasks:
    """The key padding masks of every attention over the memory, True = padding (KeyMasks)."""
    net = ctx.net
    if ctx.cfg.attention_type != "RCDA":
        flat = net.reshape(mask, (0, -1), "mask.flat")
        return KeyMasks(all=KeyMask(flat, net.unsqueeze(flat, (1, 2), "mask.flat.heads")))
    row = net.take(mask, 0, 1, "mask.row")
    col = net.take(mask, 0, 2, "mask.col")
    return KeyMasks(row=KeyMask(row, net.unsqueeze(row, (1, 2), "mask.row.heads")),
                    col=KeyMask(col, net.unsqueeze(col, (1, 2), "mask.col.heads")))


def pattern_queries(ctx: BuildContext):
    """tgt (1, Q, C): the pattern embeddings repeated over the positions, pattern-major."""
    net, cfg, t = ctx.net, ctx.cfg, "transformer.pattern"
    tgt = net.reshape(ctx.w(f"{t}.weight"), (1, cfg.num_query_pattern, 1, cfg.d_model), t)
    tgt = net.expand(tgt, (1, cfg.num_query_pattern, cfg.num_position, cfg.d_model), f"{t}.repeat")
    tgt = net.reshape(tgt, (1, cfg.num_queries, cfg.d_model), f"{t}.flatten")
    return net.to_compute(tgt, "transformer.tgt")


def pooled_keys(ctx: BuildContext, memory, pos) -> dict[str, Any]:
    """The decoder's cross-attention key inputs, the same for every layer. RCDA: the mean over rows
    (columns) of memory + posemb_row (posemb_col), pooled before projection (the mean commutes with
    the affine projection); multi-head: memory + posemb_2d over all h*w positions."""
    net, t = ctx.net, "transformer.memory"
    if ctx.cfg.attention_type != "RCDA":
        return {"2d": net.reshape(net.add(memory, pos["2d"], f"{t}.key"), (0, -1, ctx.cfg.d_model), f"{t}.key.flat")}
    return {"row": net.add(net.mean(memory, (1,), f"{t}.mean_rows", keep_dims=False), pos["row"], f"{t}.key_row"),
            "col": net.add(net.mean(memory, (2,), f"{t}.mean_cols", keep_dims=False), pos["col"], f"{t}.key_col")}


def prediction_heads(ctx: BuildContext, tgt, reference_points):
    """class_embed and bbox_embed of the last layer; boxes = sigmoid(delta + [inverse_sigmoid(anchor), 0, 0])."""
    net, t = ctx.net, "transformer"
    logits = ctx.linear_module(tgt, f"{t}.class_embed")
    x = mlp(ctx, tgt, f"{t}.bbox_embed", 3)
    # FP16: the box refinement runs in float32 (inverse_sigmoid of anchors near 0/1 is steep).
    delta = net.to_float32(x, f"{t}.bbox_embed.to_float32")
    anchor = inverse_sigmoid(ctx, reference_points)
    # w, h get no anchor
    offset = net.concat([anchor, np.zeros((1, ctx.cfg.num_queries, 2), np.float32)], -1, f"{t}.reference.offset")
    boxes = net.sigmoid(net.add(delta, offset, f"{t}.bbox_embed.add_reference"), f"{t}.bbox_embed.sigmoid")
    return net.to_float32(logits, f"{t}.class_embed.to_float32"), boxes


def transformer(ctx: BuildContext, src, mask):
    """src (B, C, h, w), mask (B, h, w) -> logits, boxes of the last decoder layer."""
    net, cfg = ctx.net, ctx.cfg
    masks = key_masks(ctx, mask)
    pos = memory_pos(ctx, mask, masks)
    # (B, C, h, w) -> (B, h, w, C): the encoder layers' permute, done once for all of them.
    memory = net.permute(src, (0, 2, 3, 1), "transformer.src")
    for i in range(cfg.enc_layers):
        memory = net.rename(encoder_layer(ctx, i, memory, pos, masks), f"encoder.{i}")

    # Queries: everything here depends on weights only (build-time constants when folding). The
    # official decoder layers recompute the query positions; they are the same in every layer.
    reference_points = anchor_points(ctx)
    queries_pos = query_pos(ctx, reference_points)
    tgt = pattern_queries(ctx)
    pooled = pooled_keys(ctx, memory, pos)
    for i in range(cfg.dec_layers):
        tgt = net.rename(decoder_layer(ctx, i, tgt, queries_pos, memory, pooled, masks), f"decoder.{i}")
    # Heads of the last layer only: earlier layers' predictions (aux outputs) are training-only.
    return prediction_heads(ctx, tgt, reference_points)


# ================================ The detector (AnchorDETR: input_proj, forward)
def input_proj(ctx: BuildContext, feature):
    net, p = ctx.net, "input_proj.0"
    x = net.conv2d(feature, ctx.w(f"{p}.0.weight"), ctx.w(f"{p}.0.bias"), f"{p}.0")
    return net.group_norm(x, 32, ctx.w(f"{p}.1.weight"), ctx.w(f"{p}.1.bias"), f"{p}.1")


def anchor_detr(ctx: BuildContext, images, masks):
    net = ctx.net
    x = net.to_compute(images, "images.cast")
    feature = net.rename(backbone(ctx, x), "backbone")
    mask = feature_mask(ctx, masks, feature)
    src = net.rename(input_proj(ctx, feature), "input_proj")
    return transformer(ctx, src, mask)


# ================================ PostProcess and the entry point
def topk_postprocess(ctx: BuildContext, logits, boxes):
    """Top-100 over sigmoid(logits) flattened (query, class) per image, as the official PostProcess.

    Ranked by the logits, then the sigmoid of the 100 kept: the same order (sigmoid is monotone) without the
    float32 rounding that makes large logits tie at a score of 1.0, as runtime.postprocess ranks."""
    net, p, classes = ctx.net, "postprocess", ctx.cfg.num_classes
    flat = net.reshape(logits, (0, -1), f"{p}.flatten")
    top, index = net.topk(flat, NUM_TOPK, 1, f"{p}.topk")
    scores = net.sigmoid(top, f"{p}.sigmoid")
    query = net.floor_div(index, np.int32(classes), f"{p}.query")
    labels = net.sub(index, net.mul(query, np.int32(classes), f"{p}.query_start"), f"{p}.labels")
    picked = net.gather(boxes, query, 1, f"{p}.gather_boxes", batch_dims=1)  # (B, 100, 4)
    # (cx, cy, w, h) -> (cx - w/2, cy - h/2, cx + w/2, cy + h/2) as one small matmul.
    to_xyxy = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [-0.5, 0, 0.5, 0], [0, -0.5, 0, 0.5]], np.float32)
    return scores, labels, net.matmul(picked, to_xyxy, f"{p}.xyxy")


def define_network(trt, network, cfg: AnchorDETRConfig, tensors: Mapping[str, Any], *, fp16: bool = False,
                   plugins=frozenset(), postprocess: bool = False, fold_constants: bool = True) -> list:
    """Add AnchorDETR to ``network``: inputs ``images`` (B,3,H,W) float32 and ``masks`` (B,H,W) bool
    (True = padding); outputs ``pred_logits`` (B,Q,91) and ``pred_boxes`` (B,Q,4) float32, plus with
    ``postprocess`` ``scores`` (B,100) float32, ``labels`` (B,100) int32 and ``boxes`` (B,100,4)
    float32 (x0,y0,x1,y1 normalised). Returns the numpy arrays TensorRT references (keep them
    alive until the engine is built)."""
    plugins = frozenset(plugins)
    check_supported(trt, cfg, plugins)
    net = Net(trt, network, fp16=fp16, fold_constants=fold_constants)
    ctx = BuildContext(net, cfg, tensors, plugins)
    dims = {0: "batch", 2: "height", 3: "width"}
    images = net.input("images", trt.float32, (-1, 3, -1, -1), dims)
    masks = net.input("masks", trt.bool, (-1, -1, -1), {0: "batch", 1: "height", 2: "width"})
    logits, boxes = anchor_detr(ctx, images, masks)
    net.output(logits, "pred_logits")
    net.output(boxes, "pred_boxes")
    if postprocess:
        scores, labels, xyxy = topk_postprocess(ctx, logits, boxes)
        net.output(scores, "scores")
        net.output(labels, "labels")
        net.output(xyxy, "boxes")
    return net.keepalive


def check_supported(trt, cfg: AnchorDETRConfig, plugins: frozenset[str]) -> None:
    if cfg.num_feature_levels != 1:
        raise NetworkConfigError(
            f"variant {cfg.variant}: {cfg.num_feature_levels} feature levels are not supported by the "
            "TensorRT network (only 1); the PyTorch reference reference.torch_model supports it"
        )
    unknown = sorted(set(plugins) - set(PLUGINS))
    if unknown:
        raise NetworkConfigError(f"unknown plugins {unknown}: choose from {', '.join(PLUGINS)}")
    check_plugins(backend_of(trt), plugins)
    if plugins and cfg.attention_type != "RCDA":
        raise NetworkConfigError(f"variant {cfg.variant}: plugins are written for RCDA attention only")

