"""What a plugin is, independently of who runs it.

A `KernelSpec` holds everything that differs between our four plugins: the `.cu` source, the tensor inputs and
attributes, the output shape/type rule, which kernel and compile-time constants a dtype/attribute set needs, and
the launch rule (grid, block and the int32 scalars passed between the input and output pointers). The same spec
drives the cuda-python launcher (`plugins.launch`, integer shapes) and the TensorRT glue (`plugins.trt_glue`,
symbolic shapes), so a launch rule proven on a GPU by the launcher is the one embedded in an engine.

Rules receive shapes as tuples whose entries are ints or TensorRT `ShapeExpr`s. TensorRT's dimension algebra only
has `+ - * //` with the symbolic operand on the left, plus ceil-division through `ops.cdiv`, so rules are written
as `dim * 8`, never `8 * dim`, and never compare dimensions.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Callable

from core.dtypes import element_size
from core.errors import BadInput

FLOAT_TYPES = ("float32", "float16")
_SUFFIX = {"float32": "f32", "float16": "f16"}
METADATA_KEY = "anchortrt_plugin"


class PluginError(BadInput, ValueError):
    """A plugin was given inputs or attributes it cannot take (command lines exit 2)."""


def suffix(dtype: str) -> str:
    """Kernel-name suffix of a float dtype: every kernel exists as `<name>_f32` and `<name>_f16`."""
    return _SUFFIX[dtype]


def like_first_input(shapes, dtypes, attrs):
    """Output rule of a plugin whose one output has its first input's shape and dtype."""
    return [(shapes[0], dtypes[0])]


def float_literal(value: float) -> str:
    """`value` rounded to float32 as an exact C++17 hex literal, so a baked constant equals float32(value)."""
    rounded = struct.unpack("<f", struct.pack("<f", value))[0]
    return rounded.hex() + "f"


def vector_width(dtype: str, extent: int) -> int:
    """Elements per vector access: 16 bytes' worth, halved until it divides `extent` (a row or a head)."""
    width = 16 // element_size(dtype)
    while extent % width:
        width //= 2
    return width


def prod(dims) -> Any:
    """Product of dims, symbolic operand kept on the left; 1 for no dims."""
    dims = list(dims)
    if not dims:
        return 1
    total = dims[0]
    for d in dims[1:]:
        total = total * d
    return total


class IntOps:
    """The dimension operations rules may use, on plain ints (the launcher, tests)."""

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)


@dataclass(frozen=True)
class Launch:
    grid: tuple
    block: tuple
    args: tuple  # int32 scalars, passed after the input pointers and before the output pointers
    shared_mem: int = 0


@dataclass(frozen=True)
class Port:
    name: str
    dtypes: tuple[str, ...]
    rank: int | None  # None: any rank >= 1


@dataclass(frozen=True)
class KernelSpec:
    name: str
    source: str
    inputs: tuple[Port, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, type], ...]  # registration order, which TensorRT's plugin schema depends on
    output_rule: Callable  # (shapes, dtypes, attrs) -> [(shape, dtype), ...]
    kernel_rule: Callable  # (dtypes, attrs) -> (kernel name, {define: value})
    launch_rule: Callable  # (shapes, dtypes, attrs, ops) -> Launch
    check_rule: Callable  # (shapes with -1 for unknown, attrs) -> None, raises PluginError

    def normalize_attrs(self, attrs: dict) -> dict:
        """Attributes in registration order with exact Python types (TensorRT's schema check compares types)."""
        names = [n for n, _ in self.attrs]
        unknown = sorted(set(attrs) - set(names))
        missing = [n for n in names if n not in attrs]
        if unknown or missing:
            raise PluginError(
                f"{self.name}: attributes must be exactly {names}; unknown {unknown}, missing {missing}"
            )
        return {n: t(attrs[n]) for n, t in self.attrs}

    def check_inputs(self, shapes, dtypes, attrs: dict) -> None:
        """Dtype, rank and shape consistency of the inputs; -1 marks a dimension not known yet."""
        if len(shapes) != len(self.inputs):
            raise PluginError(f"{self.name}: expected {len(self.inputs)} inputs, got {len(shapes)}")
        for port, shape, dtype in zip(self.inputs, shapes, dtypes):
            if dtype not in port.dtypes:
                raise PluginError(
                    f"{self.name}: input {port.name} has dtype {dtype}; it must be one of {', '.join(port.dtypes)}"
                )
            if (port.rank is not None and len(shape) != port.rank) or len(shape) == 0:
                raise PluginError(
                    f"{self.name}: input {port.name} has shape {tuple(shape)}; expected rank {port.rank or '>= 1'}"
                )
        self.check_rule([tuple(s) for s in shapes], attrs)

    def metadata(self, attrs: dict) -> str:
        """What the network interpreter needs to evaluate a layer of this plugin (stored in `layer.metadata`)."""
        return json.dumps({METADATA_KEY: self.name, "attrs": self.normalize_attrs(attrs)})


def same_dim(a: int, b: int) -> bool:
    """Equal, or one of them is not known before the engine runs (-1)."""
    return a == b or a < 0 or b < 0
