"""Configuration detection from official state dicts: every architecture, the ambiguous case, inconsistent dicts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.config import OFFICIAL_ARGS, AnchorDETRConfig, ConfigError
from weights import official_shapes
from weights.inspect import detect_config
from weights.random_init import training_args

ARCHITECTURES = [
    "r50_c5", "r50_dc5", "r101_c5", "r101_dc5",  # the released models
    "r50_c5_mha", "r101_dc5_mha", "r50_dc5_3lvl", "r50_dc5_mha_3lvl", "r50_c5_grid", "r101_dc5_mha_3lvl_grid",
]


def shaped(cfg: AnchorDETRConfig) -> dict[str, np.ndarray]:
    """A state dict of cfg's layout; detection reads only names and shapes, so zero-stride zeros will do."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in official_shapes(cfg).items()}


@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_detects_each_architecture_from_shapes_and_args(variant):
    cfg = AnchorDETRConfig.from_variant(variant)
    detected = detect_config(shaped(cfg), vars(training_args(cfg)))
    assert detected == cfg
    assert detected.variant == variant


def test_from_variant_rejects_unknown_and_impossible_names():
    with pytest.raises(ConfigError, match="unknown variant 'r34_dc5'"):
        AnchorDETRConfig.from_variant("r34_dc5")
    # Three levels are stacked at one stride, which needs the dilated last stage.
    with pytest.raises(ConfigError, match="needs the dilated"):
        AnchorDETRConfig.from_variant("r101_c5_3lvl")


def test_shape_facts_of_the_released_layout():
    cfg = AnchorDETRConfig.from_variant("r50_dc5")
    shapes = official_shapes(cfg)
    assert len(shapes) == 507  # as the spec counts an R50 checkpoint
    assert shapes["transformer.encoder_layers.0.self_attn.in_proj_weight"] == (1280, 256)
    assert shapes["transformer.decoder_layers.5.cross_attn.in_proj_weight"] == (1280, 256)
    assert shapes["transformer.decoder_layers.5.self_attn.in_proj_weight"] == (768, 256)
    assert shapes["transformer.position.weight"] == (300, 2)
    assert shapes["transformer.class_embed.5.weight"] == (91, 256)
    assert shapes["transformer.bbox_embed.3.layers.2.weight"] == (4, 256)
    assert shapes["input_proj.0.0.weight"] == (256, 2048, 1, 1)
    assert shapes["backbone.body.layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    r101 = official_shapes(AnchorDETRConfig.from_variant("r101_dc5"))
    assert "backbone.body.layer3.22.conv3.weight" in r101 and "backbone.body.layer3.23.conv1.weight" not in r101
    # ResNet-101 adds 17 bottlenecks of 3 convs + 3 frozen BNs (4 buffers each): 17 * 15 tensors.
    assert len(r101) == 507 + 17 * 15


def test_ablation_layouts():
    lvl3 = official_shapes(AnchorDETRConfig.from_variant("r50_dc5_3lvl"))
    assert lvl3["input_proj.0.0.weight"] == (256, 512, 3, 3)
    assert lvl3["input_proj.2.0.weight"] == (256, 2048, 1, 1)
    assert lvl3["transformer.level_embed.weight"] == (3, 256)
    assert lvl3["transformer.decoder_layers.0.level_fc.weight"] == (256, 768)
    assert "transformer.encoder_layers.3.self_attn.in_proj_weight" not in lvl3  # 3 spatial + 3 level layers
    assert lvl3["transformer.encoder_layers_level.2.self_attn_level.in_proj_weight"] == (768, 256)
    mha = official_shapes(AnchorDETRConfig.from_variant("r50_dc5_mha_grid"))
    assert mha["transformer.encoder_layers.0.self_attn.in_proj_weight"] == (768, 256)
    assert "transformer.position.weight" not in mha


@pytest.mark.parametrize("variant", ["r50_c5", "r101_dc5"])
def test_no_args_is_ambiguous_and_asks_for_the_variant(variant):
    sd = shaped(AnchorDETRConfig.from_variant(variant))
    with pytest.raises(ConfigError, match=r"--variant"):
        detect_config(sd)
    assert detect_config(sd, assume_defaults=True).dilation is True
    assert detect_config(sd, {"dilation": False, "nheads": 8}).variant == variant.replace("dc5", "c5")


def test_args_disagreeing_with_shapes_name_both_sides():
    sd = shaped(AnchorDETRConfig.from_variant("r50_dc5"))
    args = vars(training_args(AnchorDETRConfig.from_variant("r101_dc5")))
    with pytest.raises(ConfigError, match=r"args\.backbone='resnet101' but backbone\.body\.layer3\.\* says 'resnet50'"):
        detect_config(sd, args)
    args = vars(training_args(AnchorDETRConfig.from_variant("r50_dc5"))) | {"attention_type": "nn.MultiheadAttention"}
    with pytest.raises(ConfigError, match=r"args\.attention_type.*in_proj_weight says 'RCDA'"):
        detect_config(sd, args)


def _resized(key, shape):
    return lambda sd: sd.__setitem__(key, np.zeros(shape, np.float32))


def _removed(key):
    return lambda sd: sd.pop(key)


@pytest.mark.parametrize("variant, edit, message", [
    ("r50_dc5", _resized("transformer.decoder_layers.3.ffn.linear1.weight", (512, 256)),
     r"transformer\.decoder_layers\.3\.ffn\.linear1\.weight has shape \(512, 256\), layer 0 has \(1024, 256\)"),
    ("r50_dc5", _removed("transformer.encoder_layers.4.norm1.bias"), r"transformer\.encoder_layers\.4\.norm1\.bias missing"),
    ("r50_dc5", _resized("transformer.encoder_layers.0.self_attn.in_proj_weight", (1024, 256)),
     r"in_proj_weight has 1024 rows: expected 1280 \(RCDA\) or 768"),
    ("r50_dc5_3lvl", _removed("transformer.level_embed.weight"), r"transformer\.level_embed\.weight is missing"),
    ("r50_dc5", _removed("transformer.pattern.weight"), r"key 'transformer\.pattern\.weight' is missing"),
])
def test_inconsistent_state_dicts_name_the_keys(variant, edit, message):
    cfg = AnchorDETRConfig.from_variant(variant)
    sd = shaped(cfg)
    edit(sd)
    with pytest.raises(ConfigError, match=message):
        detect_config(sd, vars(training_args(cfg)))


def test_dilation_given_as_text_like_the_official_command_line():
    cfg = AnchorDETRConfig.from_variant("r50_c5")
    args = vars(training_args(cfg)) | {"dilation": "False"}
    assert detect_config(shaped(cfg), args).dilation is False
    with pytest.raises(ConfigError, match="neither True nor False"):
        detect_config(shaped(cfg), args | {"dilation": "maybe"})


def test_config_json_round_trip_and_newer_fields():
    cfg = AnchorDETRConfig.from_variant("r101_dc5_mha_3lvl_grid")
    assert AnchorDETRConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown configuration fields"):
        AnchorDETRConfig.from_json(cfg.to_json()[:-1] + ', "new_field": 1}')


def test_one_map_names_the_official_argument_of_every_field_args_carry():
    """num_classes is not a training argument (the official script derives it from the dataset); every other field
    is, and detection, the closest-config fallback and the synthetic checkpoints all read this one map."""
    fields = {f.name for f in dataclasses.fields(AnchorDETRConfig)}
    assert set(OFFICIAL_ARGS) == fields - {"num_classes"}
    cfg = AnchorDETRConfig(nheads=4, d_model=64, dim_feedforward=96)
    args = vars(training_args(cfg))
    assert {arg: args[arg] for arg in OFFICIAL_ARGS.values()} == {a: getattr(cfg, f) for f, a in OFFICIAL_ARGS.items()}
