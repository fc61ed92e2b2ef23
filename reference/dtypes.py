"""The torch dtype of each name in core.dtypes.DTYPES (the interpreter and the plugins' torch side use it)."""

from __future__ import annotations

import torch

from core.dtypes import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
