"""The one mapping between an official AnchorDETR state dict and our builder tensors.

Builder names keep the official module paths, so a tensor is found by the PyTorch parameter it comes
from. Only three things change, each done once here instead of at build or run time:

* Frozen BatchNorm is folded into the convolution before it: ``conv.weight`` is scaled per output
  channel and the BN's shift becomes ``conv.bias`` (the official convs have no bias). The BN keys go.
* Each attention ``in_proj_weight``/``in_proj_bias`` is sliced into one Linear per projection:
  RCDA: ``q_row_proj``, ``q_col_proj``, ``k_row_proj``, ``k_col_proj``, ``v_proj`` (row blocks in that
  order); standard multi-head attention: ``q_proj``, ``k_proj``, ``v_proj``.
* The class and box heads, saved once per decoder layer although they are one shared module, are kept
  once as ``transformer.class_embed.*`` and ``transformer.bbox_embed.layers.N.*``.

Linear weights stay (out, in) as in PyTorch: TensorRT takes the transpose as a matmul operand flag,
folded at build time, so no transpose exists at run time.

Works on any array type with ``.shape``, slicing, ``*`` and broadcasting (torch tensors or numpy).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from core.config import AnchorDETRConfig

BN_EPS = 1e-5
RCDA_PROJ = ("q_row_proj", "q_col_proj", "k_row_proj", "k_col_proj", "v_proj")
MHA_PROJ = ("q_proj", "k_proj", "v_proj")
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# conv -> the frozen BN that follows it, in torchvision's ResNet layout.
_CONV_BN = re.compile(r"^(backbone\.body\.(?:layer\d+\.\d+\.)?)(conv(\d)|downsample\.0)\.weight$")


def _bn_of(conv_key: str) -> str:
    m = _CONV_BN.match(conv_key)
    prefix, conv, idx = m[1], m[2], m[3]
    return prefix + ("downsample.1" if conv == "downsample.0" else f"bn{idx}")


def _attention_modules(cfg: AnchorDETRConfig) -> dict[str, tuple[str, ...]]:
    """Official attention module path -> the projections its in_proj holds."""
    spatial = RCDA_PROJ if cfg.attention_type == "RCDA" else MHA_PROJ
    mods = {}
    for i in range(cfg.enc_layers_spatial):
        mods[f"transformer.encoder_layers.{i}.self_attn"] = spatial
    for i in range(cfg.enc_layers_level):
        mods[f"transformer.encoder_layers_level.{i}.self_attn_level"] = MHA_PROJ
    for i in range(cfg.dec_layers):
        mods[f"transformer.decoder_layers.{i}.cross_attn"] = spatial
        mods[f"transformer.decoder_layers.{i}.self_attn"] = MHA_PROJ
    return mods


def _is_shared_head(key: str) -> re.Match | None:
    return re.match(r"^transformer\.(class_embed|bbox_embed)\.(\d+)\.(.+)$", key)


def to_builder(state_dict: Mapping[str, Any], cfg: AnchorDETRConfig) -> dict[str, Any]:
    """Official state dict -> builder tensors. Raises KeyError naming the first missing key."""
    sd = dict(state_dict)
    out: dict[str, Any] = {}
    used: set[str] = set()

    for key, w in sd.items():
        if not _CONV_BN.match(key):
            continue
        bn = _bn_of(key)
        g, b, m, v = (sd[f"{bn}.{n}"] for n in BN_BUFFERS)
        scale = g / (v + BN_EPS) ** 0.5
        out[key] = w * scale.reshape(-1, 1, 1, 1)
        out[key[: -len("weight")] + "bias"] = b - m * scale
        used.add(key)
        used.update(f"{bn}.{n}" for n in BN_BUFFERS)
        used.discard(f"{bn}.num_batches_tracked")

    for mod, names in _attention_modules(cfg).items():
        w, b = sd[f"{mod}.in_proj_weight"], sd[f"{mod}.in_proj_bias"]
        d = cfg.d_model
        for j, name in enumerate(names):
            out[f"{mod}.{name}.weight"] = w[j * d : (j + 1) * d]
            out[f"{mod}.{name}.bias"] = b[j * d : (j + 1) * d]
        used.update((f"{mod}.in_proj_weight", f"{mod}.in_proj_bias"))

    for key, t in sd.items():
        if key in used or key.endswith("num_batches_tracked"):
            continue
        head = _is_shared_head(key)
        if head:
            if head[2] == "0":
                out[f"transformer.{head[1]}.{head[3]}"] = t
            continue
        out[key] = t
    return out


def shared_head_copies(state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """Builder head key -> the per-decoder-layer official keys that must all hold the same tensor."""
    groups: dict[str, list[str]] = {}
    for key in state_dict:
        head = _is_shared_head(key)
        if head:
            groups.setdefault(f"transformer.{head[1]}.{head[3]}", []).append(key)
    return groups


def to_official(tensors: Mapping[str, Any], cfg: AnchorDETRConfig, ones, zeros, cat) -> dict[str, Any]:
    """Builder tensors -> an official-layout state dict that computes the same function.

    Folded BNs come back as identity BNs carrying the shift: weight 1, bias shift, mean 0, var 1.
    Their scale is then rsqrt(1 + eps), not 1: the loader must set those BNs' eps to 0 (the
    reference model's ``from_safetensors`` does). ``ones``, ``zeros`` and ``cat`` make arrays of the
    caller's type, so this serves torch and numpy alike.
    """
    t = dict(tensors)
    sd: dict[str, Any] = {}
    for key in list(t):
        if _CONV_BN.match(key):
            bn = _bn_of(key)
            bias = t.pop(key[: -len("weight")] + "bias")
            sd[key] = t.pop(key)
            n = bias.shape[0]
            sd[f"{bn}.weight"], sd[f"{bn}.bias"] = ones(n), bias
            sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"] = zeros(n), ones(n)
    for mod, names in _attention_modules(cfg).items():
        sd[f"{mod}.in_proj_weight"] = cat([t.pop(f"{mod}.{n}.weight") for n in names])
        sd[f"{mod}.in_proj_bias"] = cat([t.pop(f"{mod}.{n}.bias") for n in names])
    for key in list(t):
        m = re.match(r"^transformer\.(class_embed|bbox_embed)\.(.+)$", key)
        if m:
            value = t.pop(key)
            for i in range(cfg.dec_layers):
                sd[f"transformer.{m[1]}.{i}.{m[2]}"] = value
    sd.update(t)
    return sd
