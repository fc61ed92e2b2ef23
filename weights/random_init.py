"""Random official-layout weights that make mistakes visible.

Default initialisations give near-uniform attention and near-constant outputs, so a wrong mask, a swapped
projection or a misplaced bias changes nothing measurable. Here instead:

* attention query/key projections are scaled so that the logits have a standard deviation of several units:
  softmax is peaked and the choice of keys depends on the input; residual branches end in small weights,
  so that queries and encoder positions stay distinct through six layers;
* the frozen BatchNorm statistics are calibrated on a forward pass of a smooth random image and of white
  noise through the randomly initialised ResNet, then perturbed: BN is far from the identity (conv scales
  vary per layer, means are not zero) yet activations stay O(1) over 50 or 101 layers for photo-like and
  noise inputs alike (calibrating on one kind only lets the other grow ~10x through ResNet-101's layer3);
  the last BN of each residual branch gets a small scale, so every block contributes without the residual
  stream growing;
* anchor points lie in (0.05, 0.95), class logits vary around -2 and box deltas are O(1), so the heads'
  outputs are spread, not saturated.
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F

from core.config import BACKBONE_BLOCKS, OFFICIAL_ARGS, AnchorDETRConfig
from weights.checkpoint import RESNET_STAGES, official_shapes
from weights.naming import BN_EPS, shared_head_copies

QK_GAIN = 3.0  # query/key weight std QK_GAIN/sqrt(d): logit std ~3 after key pooling, max weight ~0.5
# Weight std BRANCH_GAIN/sqrt(fan_in) for the last Linear of each residual branch (attention out_proj, FFN
# linear2, level_fc): with gain 1 the shared part of the attention averages swamps the residual stream, and
# queries (encoder positions) become near copies of each other after six layers.
BRANCH_GAIN = 0.3
RESIDUAL_BN_SCALE = (0.2, 0.5)  # gamma of a residual branch's last BN


def _uniform(shape, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape).uniform_(low, high, generator=gen)


def _normal(shape, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.empty(shape).normal_(mean, std, generator=gen)  # in place: one allocation for 40M weights


def _init(key: str, shape: tuple[int, ...], cfg: AnchorDETRConfig, gen: torch.Generator) -> torch.Tensor:
    """One official tensor; backbone BN running statistics are placeholders until calibration."""
    d = cfg.d_model
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 1
    name = key.rsplit(".", 1)[-1]
    if key.startswith("backbone."):
        if len(shape) == 4:  # He init, times a per-layer factor so that BN statistics are far from (0, 1)
            return _normal(shape, (2 / fan_in) ** 0.5 * float(_uniform((), 0.5, 2.0, gen)), gen)
        if name == "weight":
            low, high = RESIDUAL_BN_SCALE if ".bn3." in key else (0.6, 1.4)
            return _uniform(shape, low, high, gen)
        if name == "bias":
            return _normal(shape, 0.2, gen)
        return torch.zeros(shape) if name == "running_mean" else torch.ones(shape)  # set by calibration
    if name == "in_proj_weight":  # query/key blocks scaled for peaked softmax, value block plain
        w = _normal(shape, 1 / d**0.5, gen)
        w[:-d] *= QK_GAIN
        return w
    if name in ("bias", "in_proj_bias"):
        if key.startswith("transformer.class_embed."):
            return _normal(shape, 0.5, gen, mean=-2.0)
        if re.search(r"bbox_embed\.\d+\.layers\.2\.", key):  # w, h around sigmoid(-1.5): mid-sized boxes
            return _normal(shape, 0.2, gen) + torch.tensor([0.0, 0.0, -1.5, -1.5])
        return _normal(shape, 0.1, gen)
    if re.search(r"(norm\d?|input_proj\.\d+\.1)\.weight$", key):  # LayerNorm / GroupNorm scale
        return _uniform(shape, 0.6, 1.4, gen)
    if key == "transformer.position.weight":
        return _uniform(shape, 0.05, 0.95, gen)
    if key in ("transformer.pattern.weight", "transformer.level_embed.weight"):
        return _normal(shape, 1.0, gen)
    if re.search(r"(linear1|adapt_pos\wd\.0|layers\.[01])\.weight$", key):  # followed by ReLU: He
        return _normal(shape, (2 / fan_in) ** 0.5, gen)
    if re.search(r"(out_proj|linear2|level_fc)\.weight$", key):
        return _normal(shape, BRANCH_GAIN / fan_in**0.5, gen)
    if key.startswith("transformer.class_embed."):
        return _normal(shape, 1.5 / fan_in**0.5, gen)
    if re.search(r"bbox_embed\.\d+\.layers\.2\.weight$", key):  # the decoder output varies little per query
        return _normal(shape, 1.5 / fan_in**0.5, gen)
    return _normal(shape, 1 / fan_in**0.5, gen)  # adapt_pos*.2, input_proj


def random_state_dict(cfg: AnchorDETRConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every key of ``official_shapes(cfg)`` as an FP32 tensor, deterministic in `seed`.

    The per-decoder-layer copies of the shared heads are one tensor, as in an official checkpoint.
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in official_shapes(cfg).items():
        head = re.match(r"transformer\.(class_embed|bbox_embed)\.(\d+)\.", key)
        if head and head[2] != "0":
            continue
        sd[key] = _init(key, shape, cfg, gen)
    for copies in shared_head_copies(official_shapes(cfg)).values():
        for key in copies[1:]:
            sd[key] = sd[copies[0]]
    _calibrate_backbone(sd, cfg, gen)
    return {k: sd[k] for k in official_shapes(cfg)}


def _calibration_images(gen: torch.Generator, size: int = 96) -> torch.Tensor:
    """A smooth image (like a photo) and white noise (like many tests' inputs): the statistics serve both."""
    coarse = torch.randn((1, 3, size // 8, size // 8), generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([smooth / smooth.std(), torch.randn((1, 3, size, size), generator=gen)])


def _conv_frozen_bn(
    sd: dict[str, torch.Tensor], conv: str, bn: str, x: torch.Tensor, gen: torch.Generator,
    stride: int = 1, dilation: int = 1,
) -> torch.Tensor:
    """conv then frozen BN, whose running statistics are set from this very output, perturbed."""
    w = sd[f"{conv}.weight"]
    y = F.conv2d(x, w, stride=stride, padding=dilation * (w.shape[-1] // 2), dilation=dilation)
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3))
    var = var.clamp_min(1e-2 * float(var.mean()))  # a dead channel must not get a huge scale
    n = mean.shape[0]
    sd[f"{bn}.running_mean"] = mean + _normal(n, 0.2, gen) * var.sqrt()
    sd[f"{bn}.running_var"] = var * _uniform(n, 0.7, 1.4, gen)
    scale = sd[f"{bn}.weight"] / (sd[f"{bn}.running_var"] + BN_EPS).sqrt()
    shift = sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale
    return y * scale[:, None, None] + shift[:, None, None]


@torch.no_grad()
def _calibrate_backbone(sd: dict[str, torch.Tensor], cfg: AnchorDETRConfig, gen: torch.Generator) -> None:
    """torchvision's ResNet (stride on the 3x3 conv; DC5: layer4 dilated instead of strided)."""
    body = "backbone.body"
    x = F.relu(_conv_frozen_bn(sd, f"{body}.conv1", f"{body}.bn1", _calibration_images(gen), gen, stride=2))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for (stage, _), blocks in zip(RESNET_STAGES, BACKBONE_BLOCKS[cfg.backbone]):
        dilated = stage == "layer4" and cfg.dilation
        for i in range(blocks):
            p = f"{body}.{stage}.{i}"
            stride = 2 if i == 0 and stage != "layer1" and not dilated else 1
            dilation = 2 if dilated and i > 0 else 1
            out = F.relu(_conv_frozen_bn(sd, f"{p}.conv1", f"{p}.bn1", x, gen))
            out = F.relu(_conv_frozen_bn(sd, f"{p}.conv2", f"{p}.bn2", out, gen, stride, dilation))
            out = _conv_frozen_bn(sd, f"{p}.conv3", f"{p}.bn3", out, gen)
            if i == 0:
                x = _conv_frozen_bn(sd, f"{p}.downsample.0", f"{p}.downsample.1", x[..., ::stride, ::stride], gen)
            x = F.relu(out + x)


def training_args(cfg: AnchorDETRConfig) -> argparse.Namespace:
    """The `args` namespace the official training script saves, for `cfg` (model fields and common others)."""
    return argparse.Namespace(
        lr=2e-4, lr_backbone=2e-5, lr_backbone_names=["backbone"], batch_size=1, weight_decay=1e-4,
        epochs=50, lr_drop=40, clip_max_norm=0.1, sgd=False, frozen_weights=None,
        **{arg: getattr(cfg, field) for field, arg in OFFICIAL_ARGS.items()},
        dropout=0.0, masks=False, aux_loss=True, dataset_file="coco",
        coco_path="/data/coco", output_dir="/data/detr-workdir/r50-dc5", device="cuda", seed=42,
        resume="", start_epoch=0, eval=False, num_workers=2, distributed=True, world_size=8, rank=0,
        gpu=0, dist_url="env://", dist_backend="nccl",
    )


def training_checkpoint(
    cfg: AnchorDETRConfig, state_dict: dict[str, torch.Tensor], optimizer: bool = True, epoch: int = 49
) -> dict:
    """What the official training script passes to torch.save: model, optimizer, lr_scheduler, epoch, args.

    The AdamW state (two moments per trainable parameter, the stem and layer1 are frozen) makes the file
    about three times the model's size, as a checkpoint saved during training is.
    """
    params = {id(t): k for k, t in state_dict.items() if not re.search(r"running_|\.bn\d\.|downsample\.1\.", k)}
    trainable = [k for k in params.values() if not re.match(r"backbone\.body\.(conv1|layer1)\.", k)]
    state = {}
    if optimizer:
        gen = torch.Generator().manual_seed(epoch)
        for i, key in enumerate(trainable):
            shape = state_dict[key].shape
            state[i] = {"step": torch.tensor(float(epoch * 7330)), "exp_avg": _normal(shape, 1e-4, gen),
                        "exp_avg_sq": _uniform(shape, 0.0, 1e-8, gen)}
    groups = [{"lr": 2e-5 if epoch >= 40 else 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4,
               "amsgrad": False, "initial_lr": 2e-4, "params": list(range(len(trainable)))}]
    return {
        "model": state_dict,
        "optimizer": {"state": state, "param_groups": groups},
        "lr_scheduler": {"step_size": 40, "gamma": 0.1, "base_lrs": [2e-4], "last_epoch": epoch + 1,
                         "_step_count": epoch + 2, "_last_lr": [groups[0]["lr"]]},
        "epoch": epoch,
        "args": training_args(cfg),
    }
