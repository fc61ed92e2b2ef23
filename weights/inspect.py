"""What a state dict holds: its AnchorDETR configuration, detected from key names and shapes.

Two facts are not visible in shapes: the dilation of the last ResNet stage (C5 and DC5 have identical weights)
and the number of attention heads. Those come from the checkpoint's `args`; without args, DC5 and 8 heads are
assumed only when the caller says so (``assume_defaults=True``), because guessing wrong is silent.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from core.config import BACKBONE_BLOCKS, OFFICIAL_ARGS, AnchorDETRConfig, ConfigError


def _count_indices(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def detect_config(
    state_dict: Mapping[str, Any],
    args: Mapping[str, Any] | None = None,
    assume_defaults: bool = False,
) -> AnchorDETRConfig:
    """The configuration of an official AnchorDETR state dict.

    `args` is the checkpoint's training namespace as a mapping; where it and the shapes disagree the
    error names the keys. Shapes win nothing silently.
    """
    args = dict(args or {})
    if isinstance(args.get("dilation"), str):  # the official --dilation has no type: "True"/"False" from a shell
        if args["dilation"].lower() not in ("true", "false"):
            raise ConfigError(f"args.dilation={args['dilation']!r} is neither True nor False")
        args["dilation"] = args["dilation"].lower() == "true"
    keys = list(state_dict.keys())

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise ConfigError(f"not an AnchorDETR state dict: key {key!r} is missing")
        return tuple(state_dict[key].shape)

    found: dict[str, Any] = {}
    where: dict[str, str] = {}

    layer3 = _count_indices(keys, "backbone.body.layer3.")
    by_blocks = {v[2]: k for k, v in BACKBONE_BLOCKS.items()}
    if layer3 not in by_blocks:
        raise ConfigError(
            f"backbone.body.layer3 has {layer3} blocks; ResNet-50 has 6 and ResNet-101 has 23"
        )
    found["backbone"], where["backbone"] = by_blocks[layer3], "backbone.body.layer3.*"

    d_model = shape("transformer.pattern.weight")[1]
    found["d_model"], where["d_model"] = d_model, "transformer.pattern.weight"
    found["num_query_pattern"], where["num_query_pattern"] = shape("transformer.pattern.weight")[0], "transformer.pattern.weight"

    enc_rows = shape("transformer.encoder_layers.0.self_attn.in_proj_weight")[0]
    if enc_rows == 5 * d_model:
        found["attention_type"] = "RCDA"
    elif enc_rows == 3 * d_model:
        found["attention_type"] = "nn.MultiheadAttention"
    else:
        raise ConfigError(
            f"transformer.encoder_layers.0.self_attn.in_proj_weight has {enc_rows} rows: "
            f"expected {5 * d_model} (RCDA) or {3 * d_model} (multi-head) for d_model {d_model}"
        )
    where["attention_type"] = "transformer.encoder_layers.0.self_attn.in_proj_weight"

    found["num_feature_levels"] = _count_indices(keys, "input_proj.")
    where["num_feature_levels"] = "input_proj.*"
    if found["num_feature_levels"] > 1 and "transformer.level_embed.weight" not in state_dict:
        raise ConfigError("input_proj has several levels but transformer.level_embed.weight is missing")

    found["dim_feedforward"] = shape("transformer.encoder_layers.0.ffn.linear1.weight")[0]
    where["dim_feedforward"] = "transformer.encoder_layers.0.ffn.linear1.weight"
    spatial = _count_indices(keys, "transformer.encoder_layers.")
    level = _count_indices(keys, "transformer.encoder_layers_level.")
    found["enc_layers"], where["enc_layers"] = spatial + level, "transformer.encoder_layers*.N"
    found["dec_layers"] = _count_indices(keys, "transformer.decoder_layers.")
    where["dec_layers"] = "transformer.decoder_layers.N"
    found["num_classes"] = shape("transformer.class_embed.0.weight")[0]
    where["num_classes"] = "transformer.class_embed.0.weight"

    if "transformer.position.weight" in state_dict:
        found["spatial_prior"] = "learned"
        found["num_query_position"] = shape("transformer.position.weight")[0]
        where["num_query_position"] = "transformer.position.weight"
    else:
        found["spatial_prior"] = "grid"
    where["spatial_prior"] = "transformer.position.weight (present or not)"

    # args fields that shapes cannot see, and cross-checks for those they can.
    disagreements = []
    for field, arg in OFFICIAL_ARGS.items():
        if arg not in args:
            continue
        value = args[arg]
        if field in found and found[field] != value:
            if field == "num_query_position" and found["spatial_prior"] == "grid":
                continue
            disagreements.append(f"args.{arg}={value!r} but {where[field]} says {found[field]!r}")
        elif field not in found:
            found[field] = value
    if disagreements:
        raise ConfigError("checkpoint args and state dict disagree: " + "; ".join(disagreements))

    for field in ("dilation", "nheads"):
        if field not in found:
            if not assume_defaults:
                raise ConfigError(
                    f"the state dict does not determine {field!r} (no checkpoint args): "
                    "name the variant explicitly (e.g. --variant r50_dc5)"
                )
            found[field] = getattr(AnchorDETRConfig, field)
    if found["spatial_prior"] == "grid" and "num_query_position" not in found:
        found["num_query_position"] = AnchorDETRConfig.num_query_position

    cfg = AnchorDETRConfig(**found)
    _check_layer_shapes(state_dict, cfg)
    return cfg


def _check_layer_shapes(state_dict: Mapping[str, Any], cfg: AnchorDETRConfig) -> None:
    """Every repeated layer has the shapes of the first: a mixed state dict is an error."""
    bad = []
    for group in ("transformer.encoder_layers.", "transformer.decoder_layers."):
        first = {k[len(group) + 2:]: tuple(v.shape) for k, v in state_dict.items() if k.startswith(group + "0.")}
        n = _count_indices(state_dict.keys(), group)
        for i in range(1, n):
            for suffix, shp in first.items():
                key = f"{group}{i}.{suffix}"
                if key not in state_dict:
                    bad.append(f"{key} missing")
                elif tuple(state_dict[key].shape) != shp:
                    bad.append(f"{key} has shape {tuple(state_dict[key].shape)}, layer 0 has {shp}")
    if bad:
        raise ConfigError("inconsistent layers: " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
