"""The PyTorch side of our plugins: each plugin's formulation in PyTorch (what its kernel must compute), the
map the network interpreter evaluates plugin layers through, and wrappers that run the kernels on CUDA torch
tensors (tests, benchmarks). `plugins/` holds the kernels, specs and TensorRT glue, and no torch.
"""

from __future__ import annotations

import json

import torch

import plugins
from plugins import launch as _launch
from plugins.spec import METADATA_KEY
from reference.dtypes import DTYPE_NAMES, TORCH_DTYPES
from reference.torch_model import mask2pos as _positions
from reference.torch_model import pos2posemb1d

SPECS = {name: plugins.get(name).SPEC for name in plugins.NAMES}


# ---------------------------------------------------------------- the ops in PyTorch, computed in fp32


def masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over K with padded keys (key_mask True) at 0 and all-padding rows all 0; in the logits' dtype."""
    padding = key_mask[:, None, None, :]
    probs = torch.softmax(logits.float().masked_fill(padding, float("-inf")), dim=-1)
    return torch.where(padding.all(dim=-1, keepdim=True), 0.0, probs).to(logits.dtype)


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis, returned in x's dtype."""
    out = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], gamma.float(), beta.float(), eps)
    return out.to(x.dtype)


def add_bias_transpose(x: torch.Tensor, bias: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """(B, Q, C) -> ((x + bias) * scale) as (B, heads, Q, C / heads), in x's dtype."""
    b, q, c = x.shape
    y = (x.float() + bias.float()) * scale
    return y.reshape(b, q, heads, c // heads).permute(0, 2, 1, 3).contiguous().to(x.dtype)


def mask2pos(mask: torch.Tensor, d: int, fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(emb_col, emb_row): the reference model's positions and 1-D sine embeddings, in fp16 with fp16=True."""
    dtype = torch.float16 if fp16 else torch.float32
    pos_col, pos_row = _positions(mask)
    return pos2posemb1d(pos_col, d).to(dtype), pos2posemb1d(pos_row, d).to(dtype)


# Plugin name -> (layer inputs in order, normalised attributes) -> outputs: how the interpreter evaluates a layer.
REFERENCES = {
    "masked_softmax": lambda inputs, attrs: [masked_softmax(*inputs)],
    "layer_norm": lambda inputs, attrs: [layer_norm(*inputs, eps=attrs["eps"])],
    "add_bias_transpose": lambda inputs, attrs: [add_bias_transpose(*inputs, attrs["heads"], attrs["scale"])],
    "mask2pos": lambda inputs, attrs: list(mask2pos(*inputs, attrs["d"], attrs["fp16"])),
}


def interpret(metadata: str, inputs) -> list:
    """Outputs of a plugin layer through its PyTorch formulation, from the layer's metadata string."""
    try:
        record = json.loads(metadata)
        name = record[METADATA_KEY]
        attrs = SPECS[name].normalize_attrs(record["attrs"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not an anchortrt plugin layer (metadata {metadata!r}): {exc}") from None
    return REFERENCES[name](list(inputs), attrs)


# ---------------------------------------------------------------- the kernels on CUDA torch tensors


def apply_torch(spec, tensors, attrs: dict, image: str = "cubin"):
    """Run the kernel on CUDA torch tensors (made contiguous and 16-byte aligned) on torch's current stream."""
    prepared = []
    for t in tensors:
        if not t.is_cuda or t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{spec.name}: inputs must be CUDA tensors of {', '.join(TORCH_DTYPES)}, got {t.dtype}")
        t = t.contiguous()
        if t.data_ptr() % 16:  # vector loads need aligned rows
            t = t.clone()
        prepared.append(t)
    attrs = spec.normalize_attrs(attrs)
    shapes = [tuple(t.shape) for t in prepared]
    dtypes = [DTYPE_NAMES[t.dtype] for t in prepared]
    spec.check_inputs(shapes, dtypes, attrs)
    device = prepared[0].device
    outs = [
        torch.empty(shape, dtype=TORCH_DTYPES[dtype], device=device)
        for shape, dtype in spec.output_rule(shapes, dtypes, attrs)
    ]
    stream = torch.cuda.current_stream(device).cuda_stream
    _launch.launch_kernel(spec, dtypes, attrs, [t.data_ptr() for t in prepared + outs], shapes, stream, image)
    return outs


def run_masked_softmax(logits: torch.Tensor, key_mask: torch.Tensor, image: str = "cubin") -> torch.Tensor:
    return apply_torch(SPECS["masked_softmax"], [logits, key_mask], {}, image)[0]


def run_layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = 1e-5,
                   image: str = "cubin") -> torch.Tensor:
    """gamma and beta are used as float32."""
    attrs = {"eps": eps, "channels": x.shape[-1]}
    return apply_torch(SPECS["layer_norm"], [x, gamma.float(), beta.float()], attrs, image)[0]


def run_add_bias_transpose(x: torch.Tensor, bias: torch.Tensor, heads: int, scale: float,
                           image: str = "cubin") -> torch.Tensor:
    """bias is used as float32."""
    attrs = {"heads": heads, "scale": scale, "channels": x.shape[-1]}
    return apply_torch(SPECS["add_bias_transpose"], [x, bias.float()], attrs, image)[0]


def run_mask2pos(mask: torch.Tensor, d: int, fp16: bool = False,
                 image: str = "cubin") -> tuple[torch.Tensor, torch.Tensor]:
    emb_col, emb_row = apply_torch(SPECS["mask2pos"], [mask], {"d": d, "fp16": fp16}, image)
    return emb_col, emb_row
