"""PyTorch reference AnchorDETR, eval only: the model the TensorRT network is proven against.

Written from the paper and docs (../shared/spec/anchordetr.md); module paths, parameter names and
shapes follow the official checkpoints, so an official ``model`` state dict loads unchanged.

Layouts: images (B,3,H,W) normalised, masks (B,H,W) bool, True on padding. Inside the transformer
features are kept channel-last, (B,h,w,C), and queries (B,Q,C); attention runs batch-first.

Module-level functions (``mask2pos``, ``pos2posemb1d``, ``pos2posemb2d``, ``inverse_sigmoid``,
``feature_mask``, ``rcda``, ``multihead_attention``) are the reference semantics other parts (plugins,
builder tests) compare against.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import BACKBONE_BLOCKS, SINE_TEMPERATURE, AnchorDETRConfig

BN_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Reference functions
# ---------------------------------------------------------------------------------------------


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms clamped below at eps."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def feature_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Padding mask (B,H,W) bool resized to a feature map's (h,w) by nearest sampling, as the official code."""
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].bool()


def mask2pos(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised pixel-centre positions of the valid area, from its first column and first row.

    Returns ``pos_col`` (B,h) (y of each row) and ``pos_row`` (B,w) (x of each column): the running
    count of valid cells minus 0.5, over the total count. Padding cells repeat the last value.
    """
    valid = ~mask
    y = valid[:, :, 0].cumsum(1, dtype=torch.float32)
    x = valid[:, 0, :].cumsum(1, dtype=torch.float32)
    return (y - 0.5) / y[:, -1:], (x - 0.5) / x[:, -1:]


def _sine(pos: Tensor, d: int) -> Tensor:
    # Frequencies computed in float32 exactly as the official code does, so the embeddings agree bitwise.
    i = torch.arange(d, dtype=torch.float32, device=pos.device)
    freq = SINE_TEMPERATURE ** (2 * (i // 2) / d)
    angle = pos[..., None] * (2 * math.pi) / freq
    return torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb1d(pos: Tensor, d: int = 256) -> Tensor:
    """Sine embedding (..., d) of positions (...): feature 2j = sin(2*pi*p / 10000^(2j/d)), 2j+1 = cos."""
    return _sine(pos, d)


def pos2posemb2d(pos: Tensor, d: int = 128) -> Tensor:
    """Embedding (..., 2d) of (x, y) points (..., 2): the d features of y first, then those of x."""
    return torch.cat((_sine(pos[..., 1], d), _sine(pos[..., 0], d)), dim=-1)


def _heads(x: Tensor, nheads: int) -> Tensor:
    """(B, ..., C) -> (B, nheads, ..., C / nheads)."""
    x = x.unflatten(-1, (nheads, -1))
    return x.movedim(-2, 1)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, nheads, Q, d) -> (B, Q, nheads * d)."""
    return x.movedim(1, -2).flatten(-2)


def _masked_softmax(logits: Tensor, key_mask: Tensor | None) -> Tensor:
    """Softmax over the last axis; key_mask (B, K) True -> weight 0. logits (B, nheads, Q, K)."""
    if key_mask is not None:
        logits = logits.masked_fill(key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def rcda(q_row: Tensor, q_col: Tensor, k_row: Tensor, k_col: Tensor, v: Tensor,
         key_padding_mask: Tensor | None, nheads: int) -> Tensor:
    """Row-column decoupled attention on already projected tensors (before the output projection).

    q_row, q_col (B,Q,C); k_row, k_col, v (B,h,w,C); key_padding_mask (B,h,w) True on padding (its
    first row masks the w keys, its first column the h keys). Row keys are averaged over all h rows
    and column keys over all w columns, padding included. Returns (B,Q,C):
    ``out[q] = sum_{y,x} A_col[q,y] A_row[q,x] v[y,x]`` per head.
    """
    scale = (q_row.shape[-1] // nheads) ** -0.5
    kr = _heads(k_row.mean(1), nheads)  # (B,n,w,d)
    kc = _heads(k_col.mean(2), nheads)  # (B,n,h,d)
    qr = _heads(q_row * scale, nheads)  # (B,n,Q,d)
    qc = _heads(q_col * scale, nheads)
    mask_row = mask_col = None
    if key_padding_mask is not None:
        mask_row, mask_col = key_padding_mask[:, 0, :], key_padding_mask[:, :, 0]
    a_row = _masked_softmax(qr @ kr.transpose(-1, -2), mask_row)  # (B,n,Q,w)
    a_col = _masked_softmax(qc @ kc.transpose(-1, -2), mask_col)  # (B,n,Q,h)
    vh = _heads(v, nheads)  # (B,n,h,w,d)
    b, n, h, w, d = vh.shape
    # Sum over x first (one matmul for all rows), then weight the rows.
    per_row = a_row @ vh.transpose(2, 3).reshape(b, n, w, h * d)  # (B,n,Q,h*d)
    out = (a_col[..., None, :] @ per_row.unflatten(-1, (h, d))).squeeze(-2)  # (B,n,Q,d)
    return _merge_heads(out)


def multihead_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                        nheads: int) -> Tensor:
    """Scaled dot-product attention on projected q (B,Q,C), k, v (B,K,C); mask (B,K) True = ignore."""
    scale = (q.shape[-1] // nheads) ** -0.5
    a = _masked_softmax(_heads(q * scale, nheads) @ _heads(k, nheads).transpose(-1, -2), key_padding_mask)
    return _merge_heads(a @ _heads(v, nheads))


# ---------------------------------------------------------------------------------------------
# Backbone: torchvision's ResNet layout with frozen BatchNorm
# ---------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics, all four as buffers (official checkpoint layout)."""

    def __init__(self, n: int, eps: float = BN_EPS):
        super().__init__()
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), fill))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints made from a trainable BatchNorm carry a step counter that means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride and dilation), 1x1 expand x4, residual."""

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: bool):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), FrozenBatchNorm2d(out))
            if downsample else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """ResNet-50/101 without pool and fc; returns layer2, layer3 and layer4 outputs."""

    def __init__(self, blocks: tuple[int, int, int, int], dilate_layer4: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            # Dilating layer4 (DC5) keeps stride 16: its first block keeps dilation 1 and drops the
            # stride, the following blocks use dilation 2 (torchvision's replace_stride_with_dilation).
            dilate = i == 3 and dilate_layer4
            layer = [Bottleneck(inplanes, planes, 1 if dilate else stride, 1, downsample=True)]
            layer += [Bottleneck(planes * 4, planes, 1, 2 if dilate else 1, downsample=False) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes * 4

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, padding=1)
        x = self.layer1(x)
        out = {"layer2": self.layer2(x)}
        out["layer3"] = self.layer3(out["layer2"])
        out["layer4"] = self.layer4(out["layer3"])
        return out


class Backbone(nn.Module):
    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.body = ResNetBody(BACKBONE_BLOCKS[cfg.backbone], cfg.dilation)


# ---------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------


class _InProj(nn.Module):
    """Attention with all input projections stacked in one ``in_proj_weight`` (checkpoint layout)."""

    def __init__(self, d_model: int, nheads: int, n_proj: int):
        super().__init__()
        self.nheads = nheads
        self.in_proj_weight = nn.Parameter(torch.empty(n_proj * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(n_proj * d_model))
        nn.init.xavier_uniform_(self.in_proj_weight)  # a usable model before any weights are loaded
        self.out_proj = nn.Linear(d_model, d_model)

    def project(self, x: Tensor, j: int) -> Tensor:
        """Apply the j-th stacked projection."""
        d = self.out_proj.in_features
        return F.linear(x, self.in_proj_weight[j * d:(j + 1) * d], self.in_proj_bias[j * d:(j + 1) * d])


class RCDA(_InProj):
    """Row-column decoupled attention; in_proj rows: q_row, q_col, k_row, k_col, v."""

    def __init__(self, d_model: int, nheads: int):
        super().__init__(d_model, nheads, 5)

    def forward(self, q_row: Tensor, q_col: Tensor, k_row: Tensor, k_col: Tensor, v: Tensor,
                key_padding_mask: Tensor | None) -> Tensor:
        proj = [self.project(x, j) for j, x in enumerate((q_row, q_col, k_row, k_col, v))]
        return self.out_proj(rcda(*proj, key_padding_mask, self.nheads))


class MultiheadAttention(_InProj):
    """Standard multi-head attention, batch-first; parameters named as torch.nn.MultiheadAttention's."""

    def __init__(self, d_model: int, nheads: int):
        super().__init__(d_model, nheads, 3)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        proj = [self.project(x, j) for j, x in enumerate((q, k, v))]
        return self.out_proj(multihead_attention(*proj, key_padding_mask, self.nheads))


class FFN(nn.Module):
    """linear1, ReLU, linear2, residual, LayerNorm (the norm belongs to the FFN in the checkpoint)."""

    def __init__(self, d_model: int, d_ffn: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (box head: 256-256-256-4)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _spatial_attention(cfg: AnchorDETRConfig) -> nn.Module:
    """The attention over feature maps: RCDA, or standard multi-head in the ablation."""
    return (RCDA if cfg.attention_type == "RCDA" else MultiheadAttention)(cfg.d_model, cfg.nheads)


def _mlp2(d: int) -> nn.Sequential:
    """Linear, ReLU, Linear: the position adapters (Sequential indices 0 and 2 are the checkpoint keys)."""
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


class EncoderLayer(nn.Module):
    """Spatial self-attention over one feature map (B,h,w,C), then FFN."""

    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.self_attn = _spatial_attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.dim_feedforward)

    def forward(self, src: Tensor, mask: Tensor, pos: dict[str, Tensor]) -> Tensor:
        b, h, w, c = src.shape
        if isinstance(self.self_attn, RCDA):
            row = src + pos["row"][:, None]  # posemb_row (B,w,C) is the same for every row
            col = src + pos["col"][:, :, None]
            attn = self.self_attn(row.reshape(b, h * w, c), col.reshape(b, h * w, c), row, col, src, mask)
        else:
            q = (src + pos["2d"]).reshape(b, h * w, c)
            attn = self.self_attn(q, q, src.reshape(b, h * w, c), mask.reshape(b, h * w))
        return self.ffn(self.norm1(src + attn.reshape(b, h, w, c)))


class EncoderLayerLevel(nn.Module):
    """Self-attention across the stacked feature maps at each pixel (3-level ablation), then FFN."""

    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.self_attn_level = MultiheadAttention(cfg.d_model, cfg.nheads)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.dim_feedforward)

    def forward(self, src: Tensor, level_emb: Tensor) -> Tensor:
        """src (N,h,w,C) with N = B*L stacked batch-major; level_emb (N,C).

        The official layer hands (N, h*w, C) to a sequence-first nn.MultiheadAttention, so the
        attended sequence is all N = B*L maps, not the L levels of one image: for B > 1 images
        attend to each other's levels. Reproduced as is (no mask either: padding is attended).
        """
        n, h, w, c = src.shape
        seq = src.reshape(n, h * w, c).transpose(0, 1)  # (h*w, N, C): batch = pixels, sequence = maps
        qk = seq + level_emb[None]
        attn = self.self_attn_level(qk, qk, seq).transpose(0, 1).reshape(n, h, w, c)
        return self.ffn(self.norm1(src + attn))


class DecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN."""

    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.cross_attn = _spatial_attention(cfg)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.nheads)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        if cfg.num_feature_levels > 1:
            self.level_fc = nn.Linear(cfg.d_model * cfg.num_feature_levels, cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.dim_feedforward)

    def forward(self, tgt: Tensor, query_pos: dict[str, Tensor], memory: Tensor, mask: Tensor,
                pos: dict[str, Tensor]) -> Tensor:
        """tgt (B,Q,C); memory (B*L,h,w,C) batch-major; mask (B*L,h,w); query_pos / pos: embeddings."""
        b, nq, c = tgt.shape
        n, h, w, _ = memory.shape
        levels = n // b
        q = tgt + query_pos["2d"]
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt))

        # The official code repeats the queries level-major (item i gets image i % B) while memory
        # items are batch-major (item i is image i // L, level i % L); the results are then read back
        # batch-major. For B > 1 with 3 levels, queries of one image thus meet another image's
        # memory. Reproduced as is; with B = 1 or one level the two orders coincide.
        def repeat(x: Tensor) -> Tensor:
            return x.repeat(levels, 1, 1)

        if isinstance(self.cross_attn, RCDA):
            k_row = memory + pos["row"][:, None]
            k_col = memory + pos["col"][:, :, None]
            attn = self.cross_attn(repeat(tgt + query_pos["x"]), repeat(tgt + query_pos["y"]),
                                   k_row, k_col, memory, mask)
        else:
            attn = self.cross_attn(repeat(tgt + query_pos["2d"]), (memory + pos["2d"]).reshape(n, h * w, c),
                                   memory.reshape(n, h * w, c), mask.reshape(n, h * w))
        if levels > 1:
            # Levels are interleaved per channel: input feature c * L + l.
            attn = self.level_fc(attn.reshape(b, levels, nq, c).permute(0, 2, 3, 1).reshape(b, nq, c * levels))
        tgt = self.norm1(tgt + attn)
        return self.ffn(tgt)


class Transformer(nn.Module):
    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers_spatial))
        self.encoder_layers_level = nn.ModuleList(EncoderLayerLevel(cfg) for _ in range(cfg.enc_layers_level))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        if cfg.num_feature_levels > 1:
            self.level_embed = nn.Embedding(cfg.num_feature_levels, d)
        self.pattern = nn.Embedding(cfg.num_query_pattern, d)
        if cfg.spatial_prior == "learned":
            self.position = nn.Embedding(cfg.num_position, 2)
        self.adapt_pos2d = _mlp2(d)
        self.adapt_pos1d = _mlp2(d)
        # One head shared by all decoder layers, registered under every layer index as the checkpoint
        # stores it (state_dict emits every index; loading writes the same tensor each time).
        class_embed = nn.Linear(d, cfg.num_classes)
        bbox_embed = MLP([d, d, d, 4])
        self.class_embed = nn.ModuleList([class_embed] * cfg.dec_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * cfg.dec_layers)

    def anchor_points(self) -> Tensor:
        """(num_position, 2) anchor (x, y) in [0, 1]."""
        if self.cfg.spatial_prior == "learned":
            return self.position.weight
        side = round(math.sqrt(self.cfg.num_query_position))
        centres = (torch.arange(side, dtype=torch.float32, device=self.pattern.weight.device) + 0.5) / side
        # meshgrid 'ij' as the official code: x varies slowest (anchor i*side + j is (c_i, c_j)).
        gx, gy = torch.meshgrid(centres, centres, indexing="ij")
        return torch.stack((gx.reshape(-1), gy.reshape(-1)), -1)

    def memory_pos(self, mask: Tensor) -> dict[str, Tensor]:
        """Position embeddings of the memory: RCDA uses 1-D row/column ones, multi-head a 2-D one."""
        pos_col, pos_row = mask2pos(mask)
        if self.cfg.attention_type == "RCDA":
            return {"row": self.adapt_pos1d(pos2posemb1d(pos_row)), "col": self.adapt_pos1d(pos2posemb1d(pos_col))}
        h, w = mask.shape[1:]
        xy = torch.stack((pos_row[:, None, :].expand(-1, h, w), pos_col[:, :, None].expand(-1, h, w)), -1)
        return {"2d": self.adapt_pos2d(pos2posemb2d(xy))}

    def query_pos(self, reference: Tensor) -> dict[str, Tensor]:
        out = {"2d": self.adapt_pos2d(pos2posemb2d(reference))}
        if self.cfg.attention_type == "RCDA":
            out["x"] = self.adapt_pos1d(pos2posemb1d(reference[..., 0]))
            out["y"] = self.adapt_pos1d(pos2posemb1d(reference[..., 1]))
        return out

    def forward(self, srcs: list[Tensor], mask: Tensor, record: dict | None = None):
        """srcs: per level (B,C,h,w); mask (B,h,w). Returns per-layer logits and boxes (lists)."""
        cfg = self.cfg
        b = srcs[0].shape[0]
        levels = len(srcs)
        # Levels are stacked batch-major, (B*L, ...): item i is image i // L, level i % L.
        memory = torch.stack(srcs, 1).flatten(0, 1).permute(0, 2, 3, 1)
        mask = mask.repeat_interleave(levels, 0)
        pos = self.memory_pos(mask)
        if record is not None:
            for k, v in pos.items():
                record[f"posemb_{k}"] = v[::levels]

        for i, layer in enumerate(self.encoder_layers):
            memory = layer(memory, mask, pos)
            if record is not None:
                record[f"encoder.{i}"] = memory
            if i < cfg.enc_layers_level:
                memory = self.encoder_layers_level[i](memory, self.level_embed.weight.repeat(b, 1))
                if record is not None:
                    record[f"encoder_level.{i}"] = memory

        anchors = self.anchor_points()
        reference = anchors.repeat(cfg.num_query_pattern, 1)[None].expand(b, -1, -1)  # pattern-major
        query_pos = self.query_pos(reference)
        tgt = self.pattern.weight.repeat_interleave(cfg.num_position, 0)[None].expand(b, -1, -1)
        anchor_logit = inverse_sigmoid(reference)

        logits, boxes = [], []
        for i, layer in enumerate(self.decoder_layers):
            tgt = layer(tgt, query_pos, memory, mask, pos)
            if record is not None:
                record[f"decoder.{i}"] = tgt
            logits.append(self.class_embed[i](tgt))
            delta = self.bbox_embed[i](tgt)
            # Only the centre is anchored: w and h come straight from the head.
            boxes.append(torch.cat((delta[..., :2] + anchor_logit, delta[..., 2:]), -1).sigmoid())
        return logits, boxes


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------


class AnchorDETR(nn.Module):
    """AnchorDETR for inference; ``load_state_dict`` takes an official checkpoint's ``model`` dict."""

    def __init__(self, cfg: AnchorDETRConfig):
        super().__init__()
        self.cfg = cfg
        # Registration order gives the checkpoint's key order: transformer, input_proj, backbone.
        self.transformer = Transformer(cfg)
        d = cfg.d_model
        if cfg.num_feature_levels == 1:
            self.input_proj = nn.ModuleList([nn.Sequential(nn.Conv2d(2048, d, 1), nn.GroupNorm(32, d))])
        else:  # layer2 is brought to layer3's stride by a strided 3x3 conv
            self.input_proj = nn.ModuleList([
                nn.Sequential(nn.Conv2d(512, d, 3, 2, padding=1), nn.GroupNorm(32, d)),
                nn.Sequential(nn.Conv2d(1024, d, 1), nn.GroupNorm(32, d)),
                nn.Sequential(nn.Conv2d(2048, d, 1), nn.GroupNorm(32, d)),
            ])
        self.backbone = Backbone(cfg)
        self.eval()

    def _run(self, images: Tensor, masks: Tensor, record: dict | None) -> dict:
        if images.ndim != 4 or images.shape[1] != 3 or masks.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"expected images (B,3,H,W) and masks (B,H,W), got {tuple(images.shape)} and {tuple(masks.shape)}"
            )
        feats = self.backbone.body(images)
        levels = ["layer4"] if self.cfg.num_feature_levels == 1 else ["layer2", "layer3", "layer4"]
        srcs = [proj(feats[name]) for proj, name in zip(self.input_proj, levels)]
        # The mask of the last feature map serves every level (all levels share its size).
        mask = feature_mask(masks, feats["layer4"].shape[-2:])
        if record is not None:
            record["backbone"] = feats["layer4"]
            record["mask"] = mask
            if len(srcs) == 1:
                record["input_proj"] = srcs[0]
            else:
                record.update({f"backbone.{n}": feats[n] for n in levels[:-1]})
                record.update({f"input_proj.{i}": s for i, s in enumerate(srcs)})
        logits, boxes = self.transformer(srcs, mask, record)
        return {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
        }

    @torch.no_grad()
    def forward(self, images: Tensor, masks: Tensor) -> dict:
        return self._run(images, masks, None)

    @torch.no_grad()
    def intermediates(self, images: Tensor, masks: Tensor) -> dict[str, Tensor]:
        """Every block's output, named like the builder's blocks.

        ``backbone`` (B,2048,h,w), ``mask`` (B,h,w), ``input_proj`` (B,C,h,w), ``posemb_row`` (B,w,C) and
        ``posemb_col`` (B,h,C) (RCDA) or ``posemb_2d`` (B,h,w,C) (multi-head), ``encoder.{i}`` (B,h,w,C),
        ``decoder.{i}`` (B,Q,C), ``pred_logits``, ``pred_boxes``. With 3 feature levels: also
        ``backbone.layer2``/``.layer3``, ``input_proj.{0,1,2}`` instead of ``input_proj``, and
        ``encoder.{i}``/``encoder_level.{i}`` are (B*L,h,w,C) with image b, level l at b*L + l.
        """
        record: dict[str, Tensor] = {}
        out = self._run(images, masks, record)
        record["pred_logits"], record["pred_boxes"] = out["pred_logits"], out["pred_boxes"]
        return record

    def frozen_batchnorms(self) -> list[FrozenBatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, FrozenBatchNorm2d)]

    @classmethod
    def from_builder_tensors(cls, cfg: AnchorDETRConfig, tensors: dict, device="cpu") -> "AnchorDETR":
        """Model from builder-named tensors (numpy or torch), the inverse of weights.naming.to_builder."""
        from weights import naming

        tensors = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
        sd = naming.to_official(tensors, cfg, ones=torch.ones, zeros=torch.zeros, cat=torch.cat)
        model = cls(cfg)
        model.load_state_dict(sd)
        # Folded BNs come back as identity BNs (var 1, mean 0, weight 1) that must scale by exactly 1.
        for bn in model.frozen_batchnorms():
            bn.eps = 0.0
        return model.to(device)

    @classmethod
    def from_safetensors(cls, path: str | Path, device="cpu") -> "AnchorDETR":
        """Model from a file written by ``weights.save`` / ``python -m weights.extract``."""
        import weights

        cfg, tensors = weights.load(path)
        return cls.from_builder_tensors(cfg, tensors, device)
