"""Model configuration: every architecture the official AnchorDETR code can produce.

A configuration is detected from a state dict's key names and shapes. Two facts are not visible in
shapes: the dilation of the last ResNet stage (C5 and DC5 have identical weights) and the number of
attention heads. Those come from the checkpoint's `args`; without args, DC5 and 8 heads are assumed
only when the caller says so (``assume_defaults=True``), because guessing wrong is silent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from core.errors import BadInput

BACKBONE_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
ATTENTION_TYPES = ("RCDA", "nn.MultiheadAttention")
SPATIAL_PRIORS = ("learned", "grid")


class ConfigError(BadInput, ValueError):
    """A state dict or configuration that does not describe one AnchorDETR architecture."""


@dataclass(frozen=True)
class AnchorDETRConfig:
    backbone: str = "resnet50"
    dilation: bool = True  # True: DC5 (layer4 dilated, stride 16); False: C5 (stride 32)
    attention_type: str = "RCDA"
    num_feature_levels: int = 1
    d_model: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    enc_layers: int = 6
    dec_layers: int = 6
    num_query_position: int = 300
    num_query_pattern: int = 3
    spatial_prior: str = "learned"
    num_classes: int = 91

    def __post_init__(self) -> None:
        problems = []
        if self.backbone not in BACKBONE_BLOCKS:
            problems.append(f"backbone {self.backbone!r} (known: {', '.join(BACKBONE_BLOCKS)})")
        if self.attention_type not in ATTENTION_TYPES:
            problems.append(f"attention_type {self.attention_type!r} (known: {', '.join(ATTENTION_TYPES)})")
        if self.spatial_prior not in SPATIAL_PRIORS:
            problems.append(f"spatial_prior {self.spatial_prior!r} (known: {', '.join(SPATIAL_PRIORS)})")
        if self.num_feature_levels not in (1, 3):
            problems.append(f"num_feature_levels {self.num_feature_levels} (the official code builds 1 or 3)")
        if self.num_feature_levels == 3 and not self.dilation:
            # The three levels are stacked into one (B, L, C, h, w) tensor, so they must share a stride:
            # layer2 (stride 8, then a stride-2 conv), layer3 (16) and a dilated layer4 (16).
            problems.append("num_feature_levels 3 needs the dilated (DC5) backbone")
        if self.d_model % self.nheads:
            problems.append(f"d_model {self.d_model} is not divisible by nheads {self.nheads}")
        if problems:
            raise ConfigError("invalid AnchorDETR configuration: " + "; ".join(problems))

    # Derived quantities, named as the official code names them.
    @property
    def head_dim(self) -> int:
        return self.d_model // self.nheads

    @property
    def num_position(self) -> int:
        """Anchor points actually used: the grid prior rounds to a square number."""
        if self.spatial_prior == "grid":
            side = round(self.num_query_position**0.5)
            return side * side
        return self.num_query_position

    @property
    def num_queries(self) -> int:
        return self.num_position * self.num_query_pattern

    @property
    def enc_layers_level(self) -> int:
        return 0 if self.num_feature_levels == 1 else self.enc_layers // 2

    @property
    def enc_layers_spatial(self) -> int:
        return self.enc_layers - self.enc_layers_level

    @property
    def stride(self) -> int:
        return 16 if self.dilation else 32

    @property
    def variant(self) -> str:
        """Short name: r50_dc5 for a released model; ablations add suffixes."""
        name = f"r{self.backbone.removeprefix('resnet')}_{'dc5' if self.dilation else 'c5'}"
        if self.attention_type != "RCDA":
            name += "_mha"
        if self.num_feature_levels != 1:
            name += f"_{self.num_feature_levels}lvl"
        if self.spatial_prior != "learned":
            name += f"_{self.spatial_prior}"
        return name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AnchorDETRConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration fields {unknown}: written by a newer anchortrt?")
        return cls(**data)

    @classmethod
    def from_variant(cls, name: str) -> "AnchorDETRConfig":
        m = re.fullmatch(r"r(50|101)_(c5|dc5)(_mha)?(_3lvl)?(_grid)?", name)
        if not m:
            raise ConfigError(
                f"unknown variant {name!r}: use r50_c5, r50_dc5, r101_c5 or r101_dc5 "
                "(ablations: append _mha, _3lvl, _grid)"
            )
        return cls(
            backbone=f"resnet{m[1]}",
            dilation=m[2] == "dc5",
            attention_type="nn.MultiheadAttention" if m[3] else "RCDA",
            num_feature_levels=3 if m[4] else 1,
            spatial_prior="grid" if m[5] else "learned",
        )


VARIANTS = ("r50_c5", "r50_dc5", "r101_c5", "r101_dc5")


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
    arg_names = {
        "backbone": "backbone", "dilation": "dilation", "attention_type": "attention_type",
        "num_feature_levels": "num_feature_levels", "d_model": "hidden_dim", "nheads": "nheads",
        "dim_feedforward": "dim_feedforward", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
        "num_query_position": "num_query_position", "num_query_pattern": "num_query_pattern",
        "spatial_prior": "spatial_prior",
    }
    disagreements = []
    for field, arg in arg_names.items():
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
