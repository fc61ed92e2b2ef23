"""Plugins without a GPU: NVRTC compilation, PyTorch references against plain formulas, launch/output rules,
the TensorRT glue as far as TensorRT-RTX allows (it has no plugin layers)."""

from __future__ import annotations

import importlib
import math
import re
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import plugins
from core import cuda
from plugins import add_bias_transpose, layer_norm, mask2pos, masked_softmax, nvrtc, trt_glue
from plugins.spec import IntOps, PluginError, float_literal
from reference import plugins as ref

SPECS = [importlib.import_module(f"plugins.{name}").SPEC for name in plugins.NAMES]
# Attributes a network of the R50 variants uses (256 channels, 8 heads of 32).
ATTRS = {
    "masked_softmax": {},
    "layer_norm": {"eps": 1e-5, "channels": 256},
    "add_bias_transpose": {"heads": 8, "scale": 32**-0.5, "channels": 256},
    "mask2pos": {"d": 256, "fp16": False},
}


def io_dtypes(spec, dtype: str) -> list[str]:
    """Input dtypes of a spec when its activations are `dtype`."""
    return [dtype if dtype in p.dtypes else p.dtypes[0] for p in spec.inputs]


def kernel_variants(spec):
    """(kernel name, defines) for fp32 and fp16."""
    for dtype in ("float32", "float16"):
        attrs = dict(ATTRS[spec.name])
        if spec.name == "mask2pos":
            attrs["fp16"] = dtype == "float16"
        yield spec.kernel_rule(io_dtypes(spec, dtype), attrs)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache, so that compilations really run NVRTC."""
    monkeypatch.setenv("ANCHORTRT_KERNEL_CACHE", str(tmp_path))
    nvrtc._compile_cached.cache_clear()
    yield tmp_path
    nvrtc._compile_cached.cache_clear()


# ---------------------------------------------------------------- NVRTC

# PTX ISA that a CUDA 13.0 driver (R580) can load: the newest our AOT plugins may embed.
MAX_PTX_VERSION = (9, 0)


def ptx_version(ptx: bytes) -> tuple[int, int]:
    """The `.version` directive of a PTX module, e.g. (9, 0)."""
    found = re.search(rb"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.MULTILINE)
    assert found, "no .version directive in the PTX"
    return int(found.group(1)), int(found.group(2))


def ptx_entries(ptx: bytes) -> list[str]:
    """Names of the kernels (`.entry`) a PTX module defines."""
    return [m.decode() for m in re.findall(rb"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)", ptx)]



@pytest.mark.parametrize("arch", [80, 86, 89, 90])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kernels_compile_to_loadable_ptx(spec, arch, fresh_cache):
    for name, defines in kernel_variants(spec):
        ptx = nvrtc.compile_kernel(spec.source, defines, arch)
        assert name in ptx_entries(ptx)
        assert f".target sm_{arch}".encode() in ptx
        # An R580 (CUDA 13.0) driver loads PTX up to ISA 9.0; newer NVRTC emits newer PTX.
        assert ptx_version(ptx) <= MAX_PTX_VERSION, (
            f"NVRTC {cuda.nvrtc_version()} emits PTX {ptx_version(ptx)}: pin nvidia-cuda-nvrtc==13.0.*"
        )


def test_cubin_for_an_exact_architecture(fresh_cache):
    name, defines = next(kernel_variants(masked_softmax.SPEC))
    assert nvrtc.compile_kernel("masked_softmax.cu", defines, 90, "cubin").startswith(b"\x7fELF")


def test_compilation_is_cached_on_disk_by_source_options_and_arch(fresh_cache):
    defines = layer_norm.SPEC.kernel_rule(["float32"] * 3, ATTRS["layer_norm"])[1]
    ptx = nvrtc.compile_kernel("layer_norm.cu", defines, 90)
    (cached,) = fresh_cache.iterdir()
    assert cached.read_bytes() == ptx
    # A later process (empty in-memory cache) reads the file instead of compiling: prove it with a marked file.
    cached.write_bytes(b"from the cache")
    nvrtc._compile_cached.cache_clear()
    assert nvrtc.compile_kernel("layer_norm.cu", defines, 90) == b"from the cache"
    nvrtc.compile_kernel("layer_norm.cu", {**defines, "EPS": 1e-6}, 90)
    nvrtc.compile_kernel("layer_norm.cu", defines, 80)
    assert len(list(fresh_cache.iterdir())) == 3


def test_float_attributes_are_baked_into_the_ptx(fresh_cache):
    def bits(value: float) -> str:
        return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]

    for eps in (1e-5, 1e-6):
        defines = layer_norm._kernel(["float32"], {**ATTRS["layer_norm"], "eps": eps})[1]
        ptx = nvrtc.compile_kernel("layer_norm.cu", defines, 90)
        assert bits(eps).encode() in ptx
    attrs = ATTRS["add_bias_transpose"]
    ptx = nvrtc.compile_kernel("add_bias_transpose.cu", add_bias_transpose._kernel(["float16"], attrs)[1], 90)
    assert bits(attrs["scale"]).encode() in ptx


@pytest.mark.parametrize("value", [1e-5, 32**-0.5, 1 / 3, 10000.0, -2.5e-12])
def test_float_literal_is_the_float32_value(value):
    literal = float_literal(value)
    assert literal.endswith("f")
    assert float.fromhex(literal[:-1]) == struct.unpack("<f", struct.pack("<f", value))[0]


def test_compile_errors_carry_the_nvrtc_log(fresh_cache):
    with pytest.raises(nvrtc.CompileError, match="CHANNELS"):
        nvrtc.compile_kernel("layer_norm.cu", {"VEC": 4, "EPS": 1e-5, "ROWS_PER_BLOCK": 8}, 90)


@pytest.mark.parametrize("channels,dtype", [(7, "float32"), (12, "float16"), (1000, "float16")])
def test_layer_norm_compiles_for_channels_that_do_not_fill_a_warp(channels, dtype, fresh_cache):
    attrs = {"eps": 1e-5, "channels": channels}
    name, defines = layer_norm._kernel([dtype], attrs)
    assert channels % defines["VEC"] == 0
    assert name in ptx_entries(nvrtc.compile_kernel("layer_norm.cu", defines, 90))


def test_target_arch_picks_the_newest_supported_not_above_the_device():
    assert nvrtc.target_arch(90) == 90
    assert nvrtc.target_arch(95) == 90
    with pytest.raises(nvrtc.CompileError, match="compute capability 50"):
        nvrtc.target_arch(50)


# ---------------------------------------------------------------- references vs plain formulas


def plain_masked_softmax(logits, key_mask):
    """Row by row in float64: exp(x - max over valid keys) over valid keys, normalised; empty rows are zeros."""
    b, heads, q, k = logits.shape
    out = torch.zeros(b, heads, q, k, dtype=torch.float64)
    for bi in range(b):
        valid = [j for j in range(k) if not key_mask[bi, j]]
        if not valid:
            continue
        for h in range(heads):
            for qi in range(q):
                row = [float(logits[bi, h, qi, j]) for j in valid]
                top = max(row)
                e = [math.exp(v - top) for v in row]
                for j, ej in zip(valid, e):
                    out[bi, h, qi, j] = ej / sum(e)
    return out


def test_masked_softmax_reference_matches_plain_formula_and_zeroes_fully_padded_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 3, 9, generator=gen) * 8
    key_mask = torch.zeros(3, 9, dtype=torch.bool)
    key_mask[0, 6:] = True
    key_mask[2] = True  # every key is padding
    probs = ref.masked_softmax(logits, key_mask)
    torch.testing.assert_close(probs.double(), plain_masked_softmax(logits, key_mask), atol=1e-6, rtol=1e-6)
    assert not probs.isnan().any()
    assert (probs[2] == 0).all() and (probs[0, ..., 6:] == 0).all()
    # Elsewhere it is the native masked_fill(-inf) + softmax.
    native = torch.softmax(logits.masked_fill(key_mask[:, None, None, :], float("-inf")), -1)
    torch.testing.assert_close(probs[:2], native[:2])
    half = ref.masked_softmax(logits.half(), key_mask)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), probs, atol=1e-3, rtol=1e-3)


def test_layer_norm_reference_matches_plain_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=gen) * 3 + 1
    gamma, beta = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    xd = x.double()
    mean = xd.sum(-1, keepdim=True) / 16
    var = ((xd - mean) ** 2).sum(-1, keepdim=True) / 16
    plain = (xd - mean) / torch.sqrt(var + 1e-5) * gamma.double() + beta.double()
    torch.testing.assert_close(ref.layer_norm(x, gamma, beta, 1e-5).double(), plain, atol=1e-5, rtol=1e-5)
    assert ref.layer_norm(x.half(), gamma, beta, 1e-5).dtype == torch.float16


def test_add_bias_transpose_reference_matches_index_formula():
    gen = torch.Generator().manual_seed(2)
    b, q, heads, hd = 2, 3, 4, 5
    x, bias = torch.randn(b, q, heads * hd, generator=gen), torch.randn(heads * hd, generator=gen)
    out = ref.add_bias_transpose(x, bias, heads, 0.25)
    assert out.shape == (b, heads, q, hd)
    for bi in range(b):
        for h in range(heads):
            for qi in range(q):
                for d in range(hd):
                    c = h * hd + d
                    assert out[bi, h, qi, d] == (x[bi, qi, c] + bias[c]) * 0.25


def test_mask2pos_reference_matches_plain_formula():
    d = 8
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[0, 3:, :] = True  # image 0: 3 valid rows, 5 valid columns
    mask[0, :, 5:] = True
    emb_col, emb_row = ref.mask2pos(mask, d)
    assert emb_col.shape == (2, 4, d) and emb_row.shape == (2, 6, d)

    def plain(line_mask, out):
        total = sum(not m for m in line_mask)
        count = 0
        for k, m in enumerate(line_mask):
            count += not m
            pos = (count - 0.5) / total
            for i in range(d):
                angle = 2 * math.pi * pos / 10000 ** (2 * (i // 2) / d)
                assert out[k, i] == pytest.approx(math.sin(angle) if i % 2 == 0 else math.cos(angle), abs=1e-6)

    for b in range(2):
        plain(mask[b, :, 0].tolist(), emb_col[b])
        plain(mask[b, 0, :].tolist(), emb_row[b])
    half_col, _ = ref.mask2pos(mask, d, fp16=True)
    assert half_col.dtype == torch.float16


# ---------------------------------------------------------------- rules

SHAPES = {  # feature maps of 320x512, 800x800, 1344x1344 images at stride 16, batch 1 and 4
    "masked_softmax": [[(1, 8, 640, 32), (1, 32)], [(4, 8, 900, 50), (4, 50)], [(4, 8, 7056, 84), (4, 84)]],
    "layer_norm": [[(1, 640, 256), (256,), (256,)], [(4, 900, 256), (256,), (256,)], [(7, 256), (256,), (256,)]],
    "add_bias_transpose": [[(1, 640, 256), (256,)], [(4, 2500, 256), (256,)], [(4, 7056, 256), (256,)]],
    "mask2pos": [[(1, 20, 32)], [(4, 50, 50)], [(4, 84, 84)], [(2, 1, 3)]],
}


def cases():
    for spec in SPECS:
        for shapes in SHAPES[spec.name]:
            for dtype in ("float32", "float16"):
                yield pytest.param(spec, shapes, dtype, id=f"{spec.name}-{shapes[0]}-{dtype}")


@pytest.mark.parametrize("spec,shapes,dtype", list(cases()))
def test_launch_rules_cover_exactly_the_work(spec, shapes, dtype):
    attrs = ATTRS[spec.name]
    rule = spec.launch_rule(shapes, io_dtypes(spec, dtype), attrs, IntOps)
    threads = rule.block[0] * rule.block[1] * rule.block[2]
    assert threads % 32 == 0 and threads <= 1024 and all(isinstance(a, int) for a in rule.args)
    (out_shape, _), *_ = spec.output_rule(shapes, io_dtypes(spec, dtype), attrs)
    if spec.name in ("masked_softmax", "layer_norm"):  # one warp per row
        rows, warps = math.prod(shapes[0][:-1]), threads // 32
        assert rule.args[0] == rows and (rule.grid[0] - 1) * warps < rows <= rule.grid[0] * warps
        if spec.name == "masked_softmax":
            assert rule.args[1:] == (shapes[0][1] * shapes[0][2], shapes[0][3])
    elif spec.name == "add_bias_transpose":  # one thread per vector of outputs
        vec = add_bias_transpose._kernel([dtype], attrs)[1]["VEC"]
        packs = rule.args[1]
        assert packs * vec == math.prod(out_shape) and rule.args[0] == shapes[0][1]
        assert (rule.grid[0] - 1) * threads < packs <= rule.grid[0] * threads
    else:  # mask2pos: one block per batch image and chunk of 4 positions, column chunks then row chunks
        b, h, w = shapes[0]
        assert rule.grid == (b, math.ceil(h / 4) + math.ceil(w / 4), 1) and rule.args == (h, w)


class Dim:
    """A dimension in TensorRT's algebra: + - * // only with the symbolic operand on the left, no comparisons."""

    def __init__(self, value):
        self.value = value

    def _other(self, other):
        assert isinstance(other, (Dim, int)), other
        return other.value if isinstance(other, Dim) else other

    def __add__(self, other):
        return Dim(self.value + self._other(other))

    def __sub__(self, other):
        return Dim(self.value - self._other(other))

    def __mul__(self, other):
        return Dim(self.value * self._other(other))

    def __floordiv__(self, other):
        return Dim(self.value // self._other(other))

    def __bool__(self):
        raise AssertionError("a rule branched on a symbolic dimension")

    __eq__ = __lt__ = __gt__ = __le__ = __ge__ = __bool__


def dim_cdiv(a, b):
    if isinstance(a, int):  # tensorrt.plugin.cdiv turns an int dividend into a constant expression
        a = Dim(a)
    return Dim(-(-a.value // (b.value if isinstance(b, Dim) else b)))


def concrete(x):
    return x.value if isinstance(x, Dim) else x


@pytest.mark.parametrize("spec,shapes,dtype", list(cases()))
def test_rules_only_use_tensorrt_dimension_algebra(spec, shapes, dtype):
    attrs, dtypes = ATTRS[spec.name], io_dtypes(spec, dtype)
    symbolic = [tuple(Dim(d) for d in s) for s in shapes]
    ops = trt_glue._SymOps(types.SimpleNamespace(cdiv=dim_cdiv))
    rule = spec.launch_rule(symbolic, dtypes, attrs, ops)
    expected = spec.launch_rule(shapes, dtypes, attrs, IntOps)
    for got, want in [(rule.grid, expected.grid), (rule.block, expected.block), (rule.args, expected.args)]:
        assert tuple(concrete(g) for g in got) == want
    outputs = spec.output_rule(symbolic, dtypes, attrs)
    for (shape, dt), (want_shape, want_dt) in zip(outputs, spec.output_rule(shapes, dtypes, attrs)):
        assert tuple(concrete(d) for d in shape) == tuple(want_shape) and dt == want_dt


@pytest.mark.parametrize(
    "spec,shapes,dtypes,attrs,expected",
    [
        (add_bias_transpose.SPEC, [(2, 900, 256), (256,)], ["float16", "float32"], ATTRS["add_bias_transpose"],
         [((2, 8, 900, 32), "float16")]),
        (mask2pos.SPEC, [(2, 38, 68)], ["bool"], {"d": 256, "fp16": True},
         [((2, 38, 256), "float16"), ((2, 68, 256), "float16")]),
        (masked_softmax.SPEC, [(1, 8, 5, 7), (1, 7)], ["float16", "bool"], {}, [((1, 8, 5, 7), "float16")]),
        (layer_norm.SPEC, [(3, 4, 256), (256,), (256,)], ["float32"] * 3, ATTRS["layer_norm"],
         [((3, 4, 256), "float32")]),
    ],
)
def test_output_rules(spec, shapes, dtypes, attrs, expected):
    assert spec.output_rule(shapes, dtypes, attrs) == expected


@pytest.mark.parametrize(
    "spec,shapes,dtypes,attrs,message",
    [
        (masked_softmax.SPEC, [(2, 8, 5, 7), (2, 6)], ["float32", "bool"], {}, "key_mask"),
        (masked_softmax.SPEC, [(2, 8, 5, 7), (2, 7)], ["float32", "float32"], {}, "must be one of bool"),
        (masked_softmax.SPEC, [(2, 5, 7), (2, 7)], ["float32", "bool"], {}, "rank 4"),
        (layer_norm.SPEC, [(2, 5, 128), (256,), (256,)], ["float32"] * 3, ATTRS["layer_norm"], "share 256"),
        (layer_norm.SPEC, [(2, 4096), (4096,), (4096,)], ["float32"] * 3, {"eps": 1e-5, "channels": 4096}, "1..1024"),
        (layer_norm.SPEC, [(2, 256), (256,), (256,)], ["int32", "float32", "float32"], ATTRS["layer_norm"],
         "dtype int32"),
        (add_bias_transpose.SPEC, [(2, 5, 250), (250,)], ["float32"] * 2,
         {"heads": 8, "scale": 1.0, "channels": 250}, "8 heads"),
        (add_bias_transpose.SPEC, [(2, 5, 256), (255,)], ["float32"] * 2, ATTRS["add_bias_transpose"], "256 channels"),
        (mask2pos.SPEC, [(2, 5, 7)], ["bool"], {"d": 0, "fp16": False}, "d=0"),
    ],
)
def test_bad_inputs_are_named(spec, shapes, dtypes, attrs, message):
    with pytest.raises(PluginError, match=message):
        spec.check_inputs(shapes, dtypes, spec.normalize_attrs(attrs))


def test_unknown_dimensions_are_accepted_and_attributes_normalised():
    masked_softmax.SPEC.check_inputs([(-1, 8, -1, -1), (-1, -1)], ["float16", "bool"], {})
    attrs = add_bias_transpose.SPEC.normalize_attrs({"channels": np.int64(256), "scale": np.float32(0.5), "heads": 8})
    assert list(attrs) == ["heads", "scale", "channels"]  # registration order
    assert [type(v) for v in attrs.values()] == [int, float, int]
    with pytest.raises(PluginError, match="unknown \\['epsilon'\\], missing \\['eps'\\]"):
        layer_norm.SPEC.normalize_attrs({"epsilon": 1e-5, "channels": 256})


def test_plugins_import_without_torch_and_name_one_list():
    """plugins/ holds kernels and glue only; the PyTorch side (one reference per plugin name) is reference.plugins,
    and the build CLI's names are this list."""
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            f"import plugins, plugins.trt_glue, {', '.join('plugins.' + n for n in plugins.NAMES)}")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(ref.REFERENCES) == set(ref.SPECS) == set(plugins.NAMES)
    from netdef.build import PLUGIN_NAMES

    assert PLUGIN_NAMES is plugins.NAMES


def test_interpreter_evaluates_plugin_metadata_through_the_reference():
    gen = torch.Generator().manual_seed(3)
    x, bias = torch.randn(1, 6, 16, generator=gen), torch.randn(16, generator=gen)
    attrs = {"heads": 2, "scale": 0.5, "channels": 16}
    metadata = add_bias_transpose.SPEC.metadata(attrs)
    (out,) = ref.interpret(metadata, [x, bias])
    assert torch.equal(out, ref.add_bias_transpose(x, bias, 2, 0.5))
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    emb_col, emb_row = ref.interpret(mask2pos.SPEC.metadata({"d": 8, "fp16": True}), [mask])
    assert emb_col.shape == (1, 3, 8) and emb_row.dtype == torch.float16
    with pytest.raises(ValueError, match="not an anchortrt plugin layer"):
        ref.interpret('{"other": 1}', [x])


def test_apply_rejects_host_tensors():
    with pytest.raises(ValueError, match="CUDA tensors"):
        ref.run_masked_softmax(torch.zeros(1, 1, 1, 4), torch.zeros(1, 4, dtype=torch.bool))


# ---------------------------------------------------------------- TensorRT glue


def test_glue_signatures_follow_the_plugin_schema():
    class TensorDesc: ...

    class KernelLaunchParams: ...

    class SymIntExprs: ...

    register, aot = trt_glue.signatures(layer_norm.SPEC, TensorDesc, KernelLaunchParams, SymIntExprs)
    assert list(register.parameters) == ["x", "gamma", "beta", "eps", "channels"]
    assert [p.annotation for p in register.parameters.values()] == [TensorDesc] * 3 + [float, int]
    assert register.return_annotation is TensorDesc
    assert list(aot.parameters) == ["x", "gamma", "beta", "eps", "channels", "outputs", "tactic"]
    assert aot.return_annotation.__args__[2:] == (KernelLaunchParams, SymIntExprs)
    register, _ = trt_glue.signatures(mask2pos.SPEC, TensorDesc, KernelLaunchParams, SymIntExprs)
    assert register.return_annotation.__args__ == (TensorDesc, TensorDesc)


@pytest.fixture
def rtx():
    trt = pytest.importorskip("tensorrt_rtx")
    network = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_network(0)
    return trt, network


def test_dtype_names_agree_with_tensorrt_numpy_and_torch(rtx):
    """core.dtypes is the one table: its names are TensorRT's numpy types, sizes and torch types agree."""
    from core.dtypes import DTYPES, element_size, trt_dtype_names
    from reference.dtypes import TORCH_DTYPES

    trt, _ = rtx
    names = trt_dtype_names(trt)
    assert sorted(names.values()) == sorted(DTYPES) == sorted(TORCH_DTYPES)
    for dtype, name in names.items():
        assert np.dtype(trt.nptype(dtype)).name == name
        assert trt_glue.to_trt_dtype(trt, name) == dtype
        assert element_size(name) == np.dtype(trt.nptype(dtype)).itemsize == TORCH_DTYPES[name].itemsize


def test_add_layer_on_tensorrt_rtx_names_the_backend_and_adds_nothing(rtx):
    from core.backend import BackendError, backend_of

    trt, network = rtx
    logits = network.add_input("logits", trt.float16, (-1, 8, -1, -1))
    key_mask = network.add_input("key_mask", trt.bool, (-1, -1))
    x = network.add_input("x", trt.float32, (-1, -1, 256))
    mask = network.add_input("mask", trt.bool, (-1, -1, -1))
    params = np.ones(256, np.float32)
    calls = [
        lambda: masked_softmax.add_layer(trt, network, logits, key_mask),
        lambda: layer_norm.add_layer(trt, network, x, params, params, 1e-5),
        lambda: add_bias_transpose.add_layer(trt, network, x, params, 8, 32**-0.5),
        lambda: mask2pos.add_layer(trt, network, mask, 256),
    ]
    for call in calls:
        with pytest.raises(BackendError) as refused:  # the one support check: Backend.plugin_problem
            call()
        assert str(refused.value) == backend_of(trt).plugin_problem()
        assert str(refused.value).startswith(f"tensorrt-rtx {trt.__version__} has no plugin layers")
    assert network.num_layers == 0


def test_add_layer_checks_inputs_before_the_backend(rtx):
    trt, network = rtx
    logits = network.add_input("logits", trt.float32, (1, 8, 5, 7))
    float_mask = network.add_input("key_mask", trt.float32, (1, 7))
    with pytest.raises(PluginError, match="key_mask has dtype float32"):
        masked_softmax.add_layer(trt, network, logits, float_mask)
    x = network.add_input("x", trt.float32, (1, 5, 128))
    with pytest.raises(PluginError, match="share 256 channels"):
        layer_norm.add_layer(trt, network, x, np.ones(256), np.zeros(256))


def test_mask2pos_kernel_bakes_the_models_sine_temperature(fresh_cache):
    from core.config import SINE_TEMPERATURE

    _, defines = mask2pos.SPEC.kernel_rule(["bool"], ATTRS["mask2pos"])
    assert defines["TEMPERATURE"] == SINE_TEMPERATURE
    bits = lambda value: f"0f{struct.unpack('<I', struct.pack('<f', value))[0]:08X}".encode()  # PTX float literal
    assert bits(SINE_TEMPERATURE) in nvrtc.compile_kernel("mask2pos.cu", defines, 90)
    other = nvrtc.compile_kernel("mask2pos.cu", {**defines, "TEMPERATURE": 20000.0}, 90)
    assert bits(20000.0) in other and bits(SINE_TEMPERATURE) not in other


def test_benchmark_compares_like_with_like_and_takes_the_bandwidth_of_the_device():
    from benchmarks.plugins_bench import derived, peak_gbps

    assert peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_gbps("NVIDIA H200") == 4800.0 and peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert peak_gbps("Some Future GPU") is None
    row = {"bytes": 2e6, "ours_gpu_us": 10.0, "ours_wall_us": 40.0, "eager_gpu_us": 20.0, "eager_wall_us": 60.0,
           "copy_gpu_us": 5.0}
    out = derived(row, 4000.0)
    assert out["speedup_vs_eager_wall"] == 1.5 and out["speedup_vs_eager_gpu"] == 2.0
    assert out["ours_gbps"] == 200.0 and out["ours_hbm_fraction"] == 0.05
    assert "ours_hbm_fraction" not in derived(row, None)


def test_a_tensorrt_without_its_plugin_module_is_one_backend_error(monkeypatch):
    """tensorrt-cu13 10.13 has `tensorrt_bindings.plugin` but no `tensorrt.plugin`: one line naming the fix, not an
    ImportError traceback; and Backend.plugin_problem refuses those versions before the glue is reached."""
    import sys
    import types

    from core.backend import Backend, BackendError

    fake = types.ModuleType("fake_tensorrt_1013")
    fake.__version__ = "10.13.3.9"
    monkeypatch.setitem(sys.modules, "fake_tensorrt_1013", fake)
    with pytest.raises(BackendError, match=r"fake_tensorrt_1013 10\.13\.3\.9 has no fake_tensorrt_1013\.plugin module"):
        trt_glue.plugin_module(fake)
    fake.QuickPluginCreationRequest = object
    assert "10.16" in Backend("tensorrt", fake).plugin_problem(numpy_version="2.3.5")
