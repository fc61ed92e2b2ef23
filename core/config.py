"""Model configuration: every architecture the official AnchorDETR code can produce, and the model constants
that the network, the reference model, the plugins and the post-processing share.

Detecting a configuration from a checkpoint is `weights.inspect.detect_config`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from core.errors import BadInput

BACKBONE_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
ATTENTION_TYPES = ("RCDA", "nn.MultiheadAttention")
SPATIAL_PRIORS = ("learned", "grid")
SINE_TEMPERATURE = 10000  # of the sine position embeddings (pos2posemb1d/2d, Mask2Pos)
NUM_TOPK = 100  # detections kept per image by the official PostProcess
# Configuration field -> the official training script's argument (`args` in a checkpoint) of the same meaning.
OFFICIAL_ARGS = {
    "backbone": "backbone", "dilation": "dilation", "attention_type": "attention_type",
    "num_feature_levels": "num_feature_levels", "d_model": "hidden_dim", "nheads": "nheads",
    "dim_feedforward": "dim_feedforward", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
    "num_query_position": "num_query_position", "num_query_pattern": "num_query_pattern",
    "spatial_prior": "spatial_prior",
}


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
