"""The plugin formulations of netdef.network's blocks: where a plugin is enabled (``ctx.uses(name)``), the block
calls the function here instead of composing native layers.

Each function takes the block's ``ctx`` (netdef.network.BuildContext) and returns what the native formulation
returns, in the same layouts and dtypes, with layers named as the native ones are. Each plugin's contract (inputs,
attributes, outputs) is its KernelSpec in plugins/; the plugin layer is added by that plugin's ``add_layer`` and
named through the naming funnel (``net.plugin``). A constant input folds in numpy, as every verb's does, so
weights-only work never reaches a plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from plugins import get as get_plugin

if TYPE_CHECKING:
    from netdef.network import BuildContext


def layer_norm(ctx: BuildContext, x, name: str):
    """The PyTorch LayerNorm called ``name`` (eps 1e-5) through the layer_norm plugin."""
    net = ctx.net
    if net.fold and net.is_const(x):
        return net.layer_norm(x, ctx.w(f"{name}.weight"), ctx.w(f"{name}.bias"), name)
    layer = get_plugin("layer_norm").add_layer(net.trt, net.network, net.tensor(x, f"{name}.input", net.dtype),
                                               ctx.w(f"{name}.weight"), ctx.w(f"{name}.bias"), 1e-5)
    return net.plugin(layer, name)[0]


def mask2posemb1d(ctx: BuildContext, mask):
    """emb_col (B, h, C) and emb_row (B, w, C), float32, in one mask2pos plugin layer."""
    net = ctx.net
    layer = get_plugin("mask2pos").add_layer(net.trt, net.network, mask, ctx.cfg.d_model)
    emb_col, emb_row = net.plugin(layer, "transformer.mask2pos")
    return emb_col, emb_row


def masked_softmax(ctx: BuildContext, logits, key_mask, name: str):
    """Softmax over the keys of (B, heads, Q, K) ``logits`` with padded keys (``key_mask`` (B, K) True) at 0."""
    net = ctx.net
    layer = get_plugin("masked_softmax").add_layer(net.trt, net.network, logits, key_mask)
    return net.plugin(layer, name)[0]


def add_bias_transpose(ctx: BuildContext, x, name: str):
    """(x W^T + b) * head_dim**-0.5 of the Linear ``name``, split into heads (B, heads, Q, head_dim): the matmul
    natively, bias, scale and head split in the plugin."""
    net, cfg = ctx.net, ctx.cfg
    scale = cfg.head_dim ** -0.5
    y = ctx.linear_module(x, name, bias=False)
    if net.is_const(y):  # the head split of netdef.network._heads, in numpy
        return net.shuffle((y + ctx.w(f"{name}.bias")) * np.float32(scale), f"{name}.heads",
                           dims=(0, 0, cfg.nheads, cfg.head_dim), second=(0, 2, 1, 3))
    layer = get_plugin("add_bias_transpose").add_layer(net.trt, net.network, y, ctx.w(f"{name}.bias"), cfg.nheads,
                                                       scale)
    return net.plugin(layer, f"{name}.add_bias_transpose")[0]


def encoder_rcda_in_proj(ctx: BuildContext, a: str, src, posemb_row, posemb_col):
    """The encoder RCDA's q_row, q_col in heads and v (B, h, w, C) without bias: the plugin adds the bias and
    scales, so the positions are added before the projection."""
    net, c = ctx.net, ctx.cfg.d_model
    query_row = net.add(src, net.unsqueeze(posemb_row, (1,), f"{a}.posemb_row"), f"{a}.query_row")
    flat_row = net.reshape(query_row, (0, -1, c), f"{a}.query_row.flat")
    query_col = net.add(src, net.unsqueeze(posemb_col, (2,), f"{a}.posemb_col"), f"{a}.query_col")
    flat_col = net.reshape(query_col, (0, -1, c), f"{a}.query_col.flat")
    q_row = add_bias_transpose(ctx, flat_row, f"{a}.q_row_proj")
    q_col = add_bias_transpose(ctx, flat_col, f"{a}.q_col_proj")
    return q_row, q_col, ctx.linear_module(src, f"{a}.v_proj", bias=False)


def decoder_rcda_queries(ctx: BuildContext, a: str, tgt, query_pos):
    """The decoder RCDA's q_row = tgt + query_pos_x and q_col = tgt + query_pos_y, projected, in heads."""
    net = ctx.net
    q_row = add_bias_transpose(ctx, net.add(tgt, query_pos["x"], f"{a}.query_row"), f"{a}.q_row_proj")
    q_col = add_bias_transpose(ctx, net.add(tgt, query_pos["y"], f"{a}.query_col"), f"{a}.q_col_proj")
    return q_row, q_col
