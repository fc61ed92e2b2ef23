"""Official AnchorDETR checkpoints: their state-dict layout, and reading them without arbitrary unpickling.

``official_shapes(cfg)`` lists every key the official model's ``state_dict()`` holds for a configuration,
in the official order, derived from the module structure (torchvision ResNet with frozen BN, input
projections, transformer). ``read_checkpoint`` opens a file saved by the official training script with
``torch.load(weights_only=True)`` and an explicit allow-list; torch is imported only there, so this module
(and ``weights.load``) stays usable without torch.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from core.config import BACKBONE_BLOCKS, OFFICIAL_ARGS, AnchorDETRConfig
from core.errors import BadInput
from weights import naming
from weights.inspect import detect_config


class CheckpointError(BadInput, ValueError):
    """A file that is not a usable official AnchorDETR checkpoint; the message is one line."""


# torchvision ResNet: (stage, bottleneck width); a bottleneck outputs 4x its width.
RESNET_STAGES = (("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512))
_EXPANSION = 4


def _bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{b}": (n,) for b in naming.BN_BUFFERS}


def _linear(prefix: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def _norm(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _attention(prefix: str, d: int, projections: int) -> dict[str, tuple[int, ...]]:
    """nn.MultiheadAttention (3 projections) or RCDA (5): one packed in_proj, then out_proj."""
    return {
        f"{prefix}.in_proj_weight": (projections * d, d),
        f"{prefix}.in_proj_bias": (projections * d,),
        **_linear(f"{prefix}.out_proj", d, d),
    }


def _ffn(prefix: str, d: int, ffn: int) -> dict[str, tuple[int, ...]]:
    return {**_linear(f"{prefix}.linear1", ffn, d), **_linear(f"{prefix}.linear2", d, ffn), **_norm(f"{prefix}.norm2", d)}


def _backbone(cfg: AnchorDETRConfig) -> dict[str, tuple[int, ...]]:
    body = "backbone.body"
    shapes = {f"{body}.conv1.weight": (64, 3, 7, 7), **_bn(f"{body}.bn1", 64)}
    in_ch = 64
    for (stage, width), blocks in zip(RESNET_STAGES, BACKBONE_BLOCKS[cfg.backbone]):
        out_ch = width * _EXPANSION
        for i in range(blocks):
            p = f"{body}.{stage}.{i}"
            shapes[f"{p}.conv1.weight"] = (width, in_ch, 1, 1)
            shapes.update(_bn(f"{p}.bn1", width))
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes.update(_bn(f"{p}.bn2", width))
            shapes[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
            shapes.update(_bn(f"{p}.bn3", out_ch))
            if i == 0:  # the first block changes the channel count (and stride): projected shortcut
                shapes[f"{p}.downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                shapes.update(_bn(f"{p}.downsample.1", out_ch))
            in_ch = out_ch
    return shapes


def _input_proj(cfg: AnchorDETRConfig) -> dict[str, tuple[int, ...]]:
    d = cfg.d_model
    if cfg.num_feature_levels == 1:
        levels = [(2048, 1)]
    else:  # layer2 through a 3x3 stride-2 conv, then layer3 and layer4 through 1x1 convs
        levels = [(512, 3), (1024, 1), (2048, 1)]
    shapes = {}
    for i, (in_ch, k) in enumerate(levels):
        shapes[f"input_proj.{i}.0.weight"] = (d, in_ch, k, k)
        shapes[f"input_proj.{i}.0.bias"] = (d,)
        shapes.update(_norm(f"input_proj.{i}.1", d))
    return shapes


def _transformer(cfg: AnchorDETRConfig) -> dict[str, tuple[int, ...]]:
    d, ffn, t = cfg.d_model, cfg.dim_feedforward, "transformer"
    spatial = 5 if cfg.attention_type == "RCDA" else 3
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.enc_layers_spatial):
        p = f"{t}.encoder_layers.{i}"
        shapes.update({**_attention(f"{p}.self_attn", d, spatial), **_norm(f"{p}.norm1", d), **_ffn(f"{p}.ffn", d, ffn)})
    for i in range(cfg.enc_layers_level):
        p = f"{t}.encoder_layers_level.{i}"
        shapes.update({**_attention(f"{p}.self_attn_level", d, 3), **_norm(f"{p}.norm1", d), **_ffn(f"{p}.ffn", d, ffn)})
    for i in range(cfg.dec_layers):
        p = f"{t}.decoder_layers.{i}"
        shapes.update(_attention(f"{p}.cross_attn", d, spatial))
        shapes.update(_norm(f"{p}.norm1", d))
        shapes.update(_attention(f"{p}.self_attn", d, 3))
        shapes.update(_norm(f"{p}.norm2", d))
        if cfg.num_feature_levels > 1:
            shapes.update(_linear(f"{p}.level_fc", d, d * cfg.num_feature_levels))
        shapes.update(_ffn(f"{p}.ffn", d, ffn))
    if cfg.num_feature_levels > 1:
        shapes[f"{t}.level_embed.weight"] = (cfg.num_feature_levels, d)
    shapes[f"{t}.pattern.weight"] = (cfg.num_query_pattern, d)
    if cfg.spatial_prior == "learned":
        shapes[f"{t}.position.weight"] = (cfg.num_query_position, 2)
    for mlp in ("adapt_pos2d", "adapt_pos1d"):
        shapes.update({**_linear(f"{t}.{mlp}.0", d, d), **_linear(f"{t}.{mlp}.2", d, d)})
    # One shared module per head, saved once per decoder layer.
    for i in range(cfg.dec_layers):
        shapes.update(_linear(f"{t}.class_embed.{i}", cfg.num_classes, d))
    for i in range(cfg.dec_layers):
        for j, n_out in enumerate((d, d, 4)):
            shapes.update(_linear(f"{t}.bbox_embed.{i}.layers.{j}", n_out, d))
    return shapes


def official_shapes(cfg: AnchorDETRConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official model's state dict for `cfg`, in state-dict order, with its shape."""
    return {**_transformer(cfg), **_input_proj(cfg), **_backbone(cfg)}


class _ShapeOnly:
    """Stands in for an array in ``naming.to_builder``: carries a shape through slicing and arithmetic."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)

    def _broadcast(self, other: Any) -> "_ShapeOnly":
        return _ShapeOnly(np.broadcast_shapes(self.shape, getattr(other, "shape", ())))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _broadcast
    __truediv__ = __rtruediv__ = __pow__ = _broadcast

    def reshape(self, *shape: int) -> "_ShapeOnly":
        known = math.prod(s for s in shape if s != -1)
        return _ShapeOnly(tuple(math.prod(self.shape) // known if s == -1 else s for s in shape))

    def __getitem__(self, rows: slice) -> "_ShapeOnly":
        return _ShapeOnly((len(range(*rows.indices(self.shape[0]))),) + self.shape[1:])


def builder_shapes(cfg: AnchorDETRConfig) -> dict[str, tuple[int, ...]]:
    """Every builder tensor name for `cfg` with its shape: what a weights file must hold."""
    fake = {k: _ShapeOnly(s) for k, s in official_shapes(cfg).items()}
    return {k: v.shape for k, v in naming.to_builder(fake, cfg).items()}


def _listing(keys: list[str], limit: int = 10) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def compare_keys(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems with a state dict against expected shapes: missing, unexpected, wrong shape (at most 10 each)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing {_keys(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {_keys(unexpected)}: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} {_keys(wrong)} with another shape: {_listing(wrong)}")
    return problems


def _keys(items: list) -> str:
    return "key" if len(items) == 1 else "keys"


def configure(
    state_dict: Mapping[str, Any], args: Mapping[str, Any] | None, variant: str | None
) -> AnchorDETRConfig:
    """The configuration of an official state dict, checked key by key against the official layout.

    `args` (the checkpoint's training namespace) decides what shapes cannot show; without them `variant`
    must. Both given: they must agree. Raises CheckpointError (a ConfigError for a bad variant name).
    """
    wanted = AnchorDETRConfig.from_variant(variant) if variant else None
    fallback = {"dilation": wanted.dilation, "nheads": wanted.nheads} if wanted else {}
    try:
        cfg = detect_config(state_dict, args if args is not None else fallback)
    except ValueError as exc:
        expected = official_shapes(wanted or _closest(args))
        if sum(k in expected for k in state_dict) < len(state_dict) / 2:
            # Mostly foreign keys: another model. Name the keys rather than the first shape that failed.
            problems = compare_keys(state_dict, expected)
            raise CheckpointError(
                "not an AnchorDETR state dict: " + "; ".join(problems) + ": use a checkpoint of the official model zoo"
            ) from exc
        raise CheckpointError(str(exc)) from exc
    if wanted is not None and cfg != wanted:
        raise CheckpointError(
            f"--variant {variant} does not match the checkpoint, which holds {cfg.variant}: "
            f"drop --variant or pass --variant {cfg.variant}"
        )
    problems = compare_keys(state_dict, official_shapes(cfg))
    if problems:
        raise CheckpointError(
            f"not an official {cfg.variant} state dict: " + "; ".join(problems) + ": the model was modified"
        )
    return cfg


def _closest(args: Mapping[str, Any] | None) -> AnchorDETRConfig:
    """The configuration the args ask for where they make one, else the default (R50-DC5)."""
    try:
        return AnchorDETRConfig(**{f: args[a] for f, a in OFFICIAL_ARGS.items() if a in (args or {})})
    except (ValueError, TypeError):
        return AnchorDETRConfig()


def _allow_list() -> list:
    """What the official training script pickles besides tensors and containers.

    `args` is an argparse.Namespace. Optimizer and scheduler states are numbers and tensors; numpy
    scalars, dtypes and arrays are allowed too because schedulers and RNG states fed from numpy carry
    them. numpy pickles name `numpy.core` (numpy 1) or `numpy._core` (numpy 2): both are mapped.
    """
    import argparse

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [argparse.Namespace, np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    allowed += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    return allowed


def check_checkpoint_file(path: str | os.PathLike) -> bool:
    """Raise CheckpointError unless `path` looks like a torch.save file; True for the zip format, False for the
    legacy pickle. Reads a few bytes and needs no torch, so a wrong path is reported before torch loads."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file: check the path")
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return True
    if head.startswith(b"PK"):
        raise CheckpointError(f"{path} is a truncated or corrupt zip checkpoint (no central directory): download it again")
    if not head.startswith(b"\x80"):  # legacy (pre-1.6) torch.save files start with a pickle protocol mark
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    return False


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict of torch tensors, training args as a dict or None) from an official checkpoint.

    Accepts the training script's dict (`model`, `args`, maybe `optimizer`, `lr_scheduler`, `epoch`) or a
    bare state dict. Zip-format files are memory-mapped, so optimizer states are never read into memory.
    """
    import torch

    path = os.fspath(path)
    is_zip = check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(_allow_list()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(path, exc)) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(exc)}): download it again") from exc

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict with a 'model' state dict")
    if "model" in obj:
        state_dict, args = obj["model"], obj.get("args")
    else:
        state_dict, args = obj, None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors (keys: {_listing(list(obj), 5)})")
    if args is not None and not isinstance(args, Mapping):
        if not hasattr(args, "__dict__"):
            raise CheckpointError(f"{path}: 'args' is a {type(args).__name__}, not the training argparse.Namespace")
        args = vars(args)
    # Like the official loader, ignore the counters a FLOP profiler (thop) leaves behind as buffers.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(("total_ops", "total_params"))}
    return state_dict, (dict(args) if args is not None else None)


_ALLOWED = "tensors, containers, argparse.Namespace, numpy scalars and arrays"
_RESAVE = ("if you trust the file, re-save only what extraction needs: "
           "torch.save({'model': ckpt['model'], 'args': ckpt['args']}, 'clean.pth')")


def _refusal(path: str, exc: pickle.UnpicklingError) -> str:
    """One line for an unpickling failure. torch wraps the weights-only unpickler's reason in advice to pass
    weights_only=False (that is, to let the file run code): that advice is left out."""
    found = re.search(r"GLOBAL (\S+)", str(exc))  # "Unsupported global: GLOBAL x.Y" or "GLOBAL x.y whose module"
    if found:
        return (f"{path} needs the global {found[1]}, which is not on the allow-list ({_ALLOWED}): the file is "
                f"refused for safety, as unpickling it could run code; {_RESAVE}")
    if str(exc).startswith("Weights only load failed"):
        # torch raises its message `from None`; the unpickler's own reason is the suppressed context.
        reason = _first_line(exc.__context__) if isinstance(exc.__context__, pickle.UnpicklingError) else "unknown reason"
        return (f"{path} holds pickled data that torch's safe loader does not accept ({reason}): the file is "
                f"refused for safety; {_RESAVE}, or download it again if it is corrupt")
    return f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)}): download it again"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
