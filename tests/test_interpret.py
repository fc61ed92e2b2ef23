"""The network interpreter, one layer type at a time, against plain PyTorch written independently.

Each test defines a tiny network with the installed TensorRT backend, evaluates it with the interpreter and
compares with a PyTorch expression of what TensorRT documents for the layer. With TensorRT-RTX (which builds on a
CPU in a fraction of a second) every network is also built with `build_serialized_network` at the shapes it is
run with, so the semantics interpreted are ones TensorRT accepts; the networks the interpreter rejects for mixed
types are checked to fail the build too. A few networks are built over a dynamic range as well. Semantics that the
interpreter infers rather than reads in TensorRT's documentation are marked so.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import interpret
from core.backend import BackendError, get_backend
from netdef.build import _creation_flags
from reference.interpret import InterpretError, interpret_network

try:
    BACKEND = get_backend()
except BackendError as err:
    pytest.skip(str(err), allow_module_level=True)
trt = BACKEND.trt

LOGGER = trt.Logger(trt.Logger.ERROR)
EW = trt.ElementWiseOperation


class Net:
    """A network under test; keeps the numpy arrays behind its constants alive (trt.Weights does not copy)."""

    def __init__(self, valid=True):
        self.builder = trt.Builder(LOGGER)
        self.network = self.builder.create_network(_creation_flags(BACKEND))
        self.keep = []
        self.unbuilt = valid and BACKEND.name == "tensorrt-rtx"  # build once, on the first run's shapes

    def input(self, name, dtype, shape):
        return self.network.add_input(name, dtype, shape)

    def const(self, array):
        array = np.array(array, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
        self.keep.append(array)
        return self.network.add_constant(array.shape, trt.Weights(array)).get_output(0)

    def i64(self, values):
        return self.const(np.array(values, dtype=np.int64))

    def out(self, tensor_or_layer, name, layer_name=None):
        """Mark a tensor (or a layer's first output) as output `name`; optionally name the layer too."""
        tensor = tensor_or_layer if isinstance(tensor_or_layer, trt.ITensor) else tensor_or_layer.get_output(0)
        if layer_name:
            tensor_or_layer.name = layer_name
        tensor.name = name
        self.network.mark_output(tensor)
        return tensor

    def run(self, outputs=None, **inputs):
        if self.unbuilt:
            self.unbuilt = False
            assert self.builds(**{n: (tuple(v.shape),) * 3 for n, v in inputs.items()}), "TensorRT rejects it"
        return interpret_network(self.network, inputs, outputs=outputs)

    def rejects(self, message, **inputs):
        with pytest.raises(InterpretError, match=message):
            self.run(**inputs)

    def builds(self, **profiles) -> bool:
        """Whether TensorRT builds the network, with one optimization profile of (min, opt, max) per input."""
        config = self.builder.create_builder_config()
        if profiles:
            profile = self.builder.create_optimization_profile()
            for name, shapes in profiles.items():
                profile.set_shape(name, *shapes)
            config.add_optimization_profile(profile)
        return self.builder.build_serialized_network(self.network, config) is not None


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def close(got, want, tol=1e-5):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- elementwise

FLOAT_OPS = {
    "SUM": lambda a, b: a + b,
    "PROD": lambda a, b: a * b,
    "SUB": lambda a, b: a - b,
    "DIV": lambda a, b: a / b,
    "FLOOR_DIV": lambda a, b: torch.floor(a / b),
}


@pytest.mark.parametrize("op", sorted(FLOAT_OPS))
def test_elementwise_float_ops_broadcast(op):
    net = Net()
    a = net.input("a", trt.float32, (2, 3, 4))
    b = net.input("b", trt.float32, (1, 3, 1))
    net.out(net.network.add_elementwise(a, b, EW.__members__[op]), "y")
    va, vb = rand(2, 3, 4).abs() + 0.5, rand(1, 3, 1, seed=1).abs() + 0.25
    close(net.run(a=va, b=vb)["y"], FLOAT_OPS[op](va, vb), tol=1e-5)


def test_integer_division():
    """FLOOR_DIV floors; DIV on integers truncates toward zero (inferred: the header only says 'divide')."""
    net = Net()
    a = net.input("a", trt.int32, (4,))
    b = net.input("b", trt.int32, (4,))
    net.out(net.network.add_elementwise(a, b, EW.FLOOR_DIV), "floor")
    net.out(net.network.add_elementwise(a, b, EW.DIV), "div")
    got = net.run(a=torch.tensor([7, -7, 7, -7], dtype=torch.int32), b=torch.tensor([2, 2, -2, -2], dtype=torch.int32))
    assert got["floor"].dtype == torch.int32
    assert got["floor"].tolist() == [3, -4, -4, 3]
    assert got["div"].tolist() == [3, -3, -3, 3]


def test_mixed_input_types_are_rejected_as_the_strongly_typed_build_would():
    net = Net(valid=False)
    a = net.input("a", trt.float32, (2,))
    h = net.network.add_cast(net.input("b", trt.float32, (2,)), trt.float16).get_output(0)
    layer = net.network.add_elementwise(a, h, EW.SUM)
    net.out(layer, "y", layer_name="bad_add")
    net.rejects("bad_add.*mixes input types", a=torch.ones(2), b=torch.ones(2))
    assert not net.builds()


# --------------------------------------------------------------------------------------------- unary, activation

UNARY = {
    "LOG": (lambda x: x.abs() + 0.1, lambda x: torch.log(x)),
    "SIN": (lambda x: x, torch.sin), "COS": (lambda x: x, torch.cos),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_float_ops(op):
    domain, reference = UNARY[op]
    x = domain(rand(9))
    net = Net()
    net.out(net.network.add_unary(net.input("x", trt.float32, tuple(x.shape)), trt.UnaryOperation.__members__[op]), "y")
    close(net.run(x=x)["y"], reference(x), tol=1e-5)


def test_unary_not():
    net = Net()
    net.out(net.network.add_unary(net.input("p", trt.bool, (2,)), trt.UnaryOperation.NOT), "y")
    assert net.run(p=torch.tensor([True, False]))["y"].tolist() == [False, True]


ACTIVATIONS = {  # type: (alpha, beta, reference)
    "RELU": (0.0, 0.0, F.relu),
    "SIGMOID": (0.0, 0.0, lambda x: 1 / (1 + torch.exp(-x))),
    "CLIP": (-0.5, 0.75, lambda x: x.clamp(-0.5, 0.75)),
}


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation(kind):
    alpha, beta, reference = ACTIVATIONS[kind]
    net = Net()
    layer = net.network.add_activation(net.input("x", trt.float32, (3, 5)), trt.ActivationType.__members__[kind])
    layer.alpha, layer.beta = alpha, beta
    net.out(layer, "y")
    x = rand(3, 5) * 2
    close(net.run(x=x)["y"], reference(x), tol=1e-5)


# ------------------------------------------------------------------------------------ convolution, pooling, matmul


def test_convolution_groups_stride_dilation_asymmetric_padding_bias():
    w, b = rand(6, 2, 3, 3, seed=1), rand(6, seed=2)
    net = Net()
    x = net.input("x", trt.float32, (-1, 4, -1, -1))
    conv = net.network.add_convolution_nd(x, 6, (3, 3), trt.Weights(w.numpy()), trt.Weights(b.numpy()))
    conv.num_groups, conv.stride_nd, conv.dilation_nd = 2, (2, 1), (1, 2)
    conv.pre_padding, conv.post_padding = (1, 0), (2, 1)
    net.out(conv, "y")
    vx = rand(2, 4, 9, 11, seed=3)
    want = F.conv2d(F.pad(vx, (0, 1, 1, 2)), w, b, stride=(2, 1), dilation=(1, 2), groups=2)
    close(net.run(x=vx)["y"], want, tol=1e-4)
    assert net.builds(x=((1, 4, 8, 8), (2, 4, 9, 11), (2, 4, 16, 16)))


def test_fp16_convolution_rounds_to_half():
    w = rand(4, 3, 3, 3, seed=1).half()
    net = Net()
    x = net.network.add_cast(net.input("x", trt.float32, (1, 3, 8, 8)), trt.float16).get_output(0)
    conv = net.network.add_convolution_nd(x, 4, (3, 3), trt.Weights(w.numpy()), trt.Weights())
    net.out(conv, "y")
    vx = rand(1, 3, 8, 8)
    got = net.run(x=vx)["y"]
    assert got.dtype == torch.float16
    # fp16 inputs, float32 accumulation, one rounding of the result
    close(got, F.conv2d(vx.half().float(), w.float()).half(), tol=1e-3)
    assert net.builds()


def test_fp32_weights_on_fp16_input_are_rejected():
    net = Net(valid=False)
    x = net.network.add_cast(net.input("x", trt.float32, (1, 3, 4, 4)), trt.float16).get_output(0)
    conv = net.network.add_convolution_nd(x, 2, (1, 1), trt.Weights(np.ones((2, 3, 1, 1), np.float32)), trt.Weights())
    net.out(conv, "y", layer_name="conv_mixed")
    net.rejects("conv_mixed.*float32 weights on a HALF input", x=torch.ones(1, 3, 4, 4))
    assert not net.builds()


def test_max_pooling_with_padding():
    net = Net()
    pool = net.network.add_pooling_nd(net.input("x", trt.float32, (1, 2, 7, 8)), trt.PoolingType.MAX, (3, 3))
    pool.stride_nd, pool.padding_nd = (2, 2), (1, 1)
    net.out(pool, "max")
    v = rand(1, 2, 7, 8)
    close(net.run(x=v)["max"], F.max_pool2d(v, 3, 2, padding=1))


MATMUL_CASES = {  # (shape a, op a, shape b, op b, reference)
    "batched_broadcast": ((2, 1, 3, 4), "NONE", (1, 5, 4, 6), "NONE",
                          lambda a, b: torch.einsum("xyik,yzkj->xzij", a, b)),
    "transpose_a": ((2, 4, 3), "TRANSPOSE", (2, 4, 5), "NONE", lambda a, b: torch.einsum("bki,bkj->bij", a, b)),
    "transpose_b": ((2, 3, 4), "NONE", (1, 5, 4), "TRANSPOSE", lambda a, b: torch.einsum("bik,xjk->bij", a, b)),
}


@pytest.mark.parametrize("case", sorted(MATMUL_CASES))
def test_matrix_multiply(case):
    shape_a, op_a, shape_b, op_b, reference = MATMUL_CASES[case]
    net = Net()
    a, b = net.input("a", trt.float32, shape_a), net.input("b", trt.float32, shape_b)
    op = trt.MatrixOperation.__members__
    net.out(net.network.add_matrix_multiply(a, op[op_a], b, op[op_b]), "y")
    va, vb = rand(*shape_a), rand(*shape_b, seed=1)
    close(net.run(a=va, b=vb)["y"], reference(va, vb), tol=1e-5)


# ------------------------------------------------------------------------------ shuffle, shape tensors, slicing


def test_shuffle_transposes_and_reshape_with_placeholder_and_wildcard():
    net = Net()
    sh = net.network.add_shuffle(net.input("x", trt.float32, (2, 3, 4, 5)))
    sh.first_transpose, sh.reshape_dims, sh.second_transpose = (0, 2, 1, 3), (0, -1, 5), (2, 0, 1)
    net.out(sh, "y")
    x = rand(2, 3, 4, 5)
    assert torch.equal(net.run(x=x)["y"], x.permute(0, 2, 1, 3).reshape(2, 12, 5).permute(2, 0, 1))


def dynamic_shape_network():
    """x (B,3,H,W) with dynamic B, H, W -> y (B, H*W, 3) by a reshape from shape-tensor arithmetic."""
    net = Net()
    x = net.input("x", trt.float32, (-1, 3, -1, -1))
    shape = net.network.add_shape(x).get_output(0)
    dim = lambda i: net.network.add_gather(shape, net.i64([i]), 0).get_output(0)  # noqa: E731
    hw = net.network.add_elementwise(dim(2), dim(3), EW.PROD).get_output(0)
    sh = net.network.add_shuffle(x)
    sh.first_transpose = (0, 2, 3, 1)
    sh.set_input(1, net.network.add_concatenation([dim(0), hw, net.i64([3])]).get_output(0))
    net.out(sh, "y")
    return net


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (2, 3, 7, 2)])
def test_dynamic_reshape_from_shape_tensors(shape):
    net = dynamic_shape_network()
    x = rand(*shape)
    got = net.run(x=x)
    b, _, h, w = shape
    assert torch.equal(got["y"], x.permute(0, 2, 3, 1).reshape(b, h * w, 3))


def test_dynamic_shape_network_builds():
    assert dynamic_shape_network().builds(x=((1, 3, 2, 2), (1, 3, 8, 8), (2, 3, 16, 16)))


def test_slice_static_stride_and_axes():
    net = Net()
    x = net.input("x", trt.float32, (4, 6))
    net.out(net.network.add_slice(x, (1, 5), (2, 3), (2, -2)), "strided")
    sl = net.network.add_slice(x, (1,), (4,), (1,))
    sl.axes = (1,)
    net.out(sl, "axes")
    v = torch.arange(24.0).reshape(4, 6)
    got = net.run(x=v)
    assert got["strided"].tolist() == v[[1, 3]][:, [5, 3, 1]].tolist()
    assert torch.equal(got["axes"], v[:, 1:5])


def test_slice_strict_bounds_rejects_out_of_range():
    net = Net()
    sl = net.network.add_slice(net.input("x", trt.float32, (-1,)), (2,), (3,), (1,))
    net.out(sl, "y", layer_name="tail")
    assert net.run(x=torch.arange(5.0))["y"].tolist() == [2.0, 3.0, 4.0]
    net.rejects("tail.*STRICT_BOUNDS", x=torch.arange(4.0))


def test_concatenation_unsqueeze():
    net = Net()
    a, b = net.input("a", trt.float32, (2, 1, 3)), net.input("b", trt.float32, (2, 2, 3))
    concat = net.network.add_concatenation([a, b])
    concat.axis = 1
    cat = net.out(concat, "cat")
    net.out(net.network.add_unsqueeze(cat, net.i64([0, -1])), "unsqueezed")
    va, vb = rand(2, 1, 3), rand(2, 2, 3, seed=1)
    got = net.run(a=va, b=vb)
    assert torch.equal(got["cat"], torch.cat([va, vb], 1))
    assert torch.equal(got["unsqueezed"], torch.cat([va, vb], 1)[None, ..., None])


# ------------------------------------------------------------------------------------------------------ gather


def test_gather_default_negative_and_out_of_bounds_indices():
    net = Net()
    x = net.input("x", trt.float32, (2, 5, 3))
    net.out(net.network.add_gather(x, net.const(np.array([[4, -1], [0, 7]], np.int32)), 1), "y")
    v = rand(2, 5, 3)
    got = net.run(x=v)["y"]
    assert got.shape == (2, 2, 2, 3)
    assert torch.equal(got[:, 0, 0], v[:, 4]) and torch.equal(got[:, 0, 1], v[:, 4])  # -1 counts from the end
    assert torch.equal(got[:, 1, 0], v[:, 0])
    assert torch.equal(got[:, 1, 1], torch.zeros(2, 3))  # out of bounds reads zero


def test_gather_batched():
    net = Net()
    x = net.input("x", trt.float32, (2, 5, 3))
    batched = net.network.add_gather(x, net.input("idx", trt.int64, (2, 4)), 1)
    batched.num_elementwise_dims = 1
    net.out(batched, "batched")
    v, vi = rand(2, 5, 3), torch.tensor([[0, 4, 4, 1], [3, 2, 0, 0]])
    assert torch.equal(net.run(x=v, idx=vi)["batched"], torch.stack([v[b][vi[b]] for b in range(2)]))


# ----------------------------------------------------------------------------- softmax, normalization, reduce


def test_softmax_on_the_axis_of_the_mask():
    net = Net()
    sm = net.network.add_softmax(net.input("x", trt.float32, (2, 3, 4)))
    sm.axes = 1 << 1
    net.out(sm, "y")
    x = rand(2, 3, 4)
    close(net.run(x=x)["y"], torch.exp(x) / torch.exp(x).sum(1, keepdim=True))


def test_layer_norm():
    g, b = rand(1, 1, 8, seed=1), rand(1, 1, 8, seed=2)
    net = Net()
    norm = net.network.add_normalization(net.input("x", trt.float32, (2, 5, 8)), net.const(g.numpy()),
                                         net.const(b.numpy()), 1 << 2)
    norm.epsilon = 1e-6
    net.out(norm, "y")
    x = rand(2, 5, 8) * 3 + 1
    close(net.run(x=x)["y"], F.layer_norm(x, (8,), g.reshape(8), b.reshape(8), 1e-6), tol=1e-5)


@pytest.mark.parametrize("v2", [False, pytest.param(True, marks=pytest.mark.skipif(
    not hasattr(trt.INetworkDefinition, "add_normalization_v2"), reason="add_normalization_v2 arrived in TensorRT 10.15"))])
def test_group_norm_v1_scales_per_group_v2_per_channel(v2):
    groups, channels = 2, 6
    g = rand(1, channels if v2 else groups, 1, 1, seed=1)
    b = rand(1, channels if v2 else groups, 1, 1, seed=2)
    net = Net()
    add = net.network.add_normalization_v2 if v2 else net.network.add_normalization
    norm = add(net.input("x", trt.float32, (2, channels, 3, 4)), net.const(g.numpy()), net.const(b.numpy()), 0b1100)
    norm.num_groups = groups
    net.out(norm, "y")
    x = rand(2, channels, 3, 4) * 2 + 1
    per_channel = (lambda t: t.reshape(channels)) if v2 else (lambda t: t.reshape(groups).repeat_interleave(3))
    close(net.run(x=x)["y"], F.group_norm(x, groups, per_channel(g), per_channel(b)), tol=1e-5)


def test_group_norm_layer_without_is_v2_is_v1():
    """TensorRT before 10.15 has no INormalizationLayer.is_v2 (and only add_normalization): per-group scale and bias."""
    groups, channels = 3, 6
    layer = types.SimpleNamespace(name="gn", epsilon=1e-5, num_groups=groups, axes=0b1100,
                                  get_input=lambda i: types.SimpleNamespace(dtype=trt.float32))
    assert not hasattr(layer, "is_v2")
    x, g, b = rand(2, channels, 3, 4) * 2 + 1, rand(1, groups, 1, 1, seed=1), rand(1, groups, 1, 1, seed=2)
    got = interpret._HANDLERS["NORMALIZATION"](interpret._Run("cpu", trt), layer, [x, g, b])
    per_channel = lambda t: t.reshape(groups).repeat_interleave(channels // groups)  # noqa: E731
    close(got, F.group_norm(x, groups, per_channel(g), per_channel(b)), tol=1e-5)


@pytest.mark.parametrize("keep", [False, True])
def test_reduce(keep):
    net = Net()
    x = net.input("x", trt.float32, (2, 3, 4))
    for op in ("SUM", "AVG"):
        net.out(net.network.add_reduce(x, trt.ReduceOperation.__members__[op], 0b101, keep), op)
    v = rand(2, 3, 4)
    got = net.run(x=v)
    flat = v.permute(1, 0, 2).reshape(3, 8)  # the reduced axes 0 and 2 side by side
    want = {"SUM": flat.sum(1), "AVG": flat.mean(1)}
    for op, value in want.items():
        close(got[op], value.reshape(1, 3, 1) if keep else value, tol=1e-5)


# -------------------------------------------------------------------------------------------- select, cast, types


def test_select_broadcasts_the_condition():
    net = Net()
    cond = net.input("c", trt.bool, (2, 1))
    fill = net.const(np.full((1, 1), -1e4, np.float32))
    net.out(net.network.add_select(cond, net.input("a", trt.float32, (2, 3)), fill), "y")
    a = rand(2, 3)
    got = net.run(c=torch.tensor([[True], [False]]), a=a)["y"]
    assert torch.equal(got[0], a[0]) and got[1].tolist() == [-1e4] * 3


def test_casts_between_float_half_int_bool():
    net = Net()
    x = net.input("x", trt.float32, (5,))
    for name, dtype in (("i32", trt.int32), ("b", trt.bool), ("h", trt.float16)):
        net.out(net.network.add_cast(x, dtype), name)
    got = net.run(x=torch.tensor([1.7, -1.7, 0.0, 2.0, 1.0001]))
    assert got["i32"].dtype == torch.int32 and got["i32"].tolist() == [1, -1, 0, 2, 1]  # toward zero
    assert got["b"].tolist() == [True, True, False, True, True]
    assert got["h"].dtype == torch.float16 and got["h"][4].item() == 1.0  # 1.0001 rounds to 1 in fp16


def test_fp16_chain_rounds_every_tensor():
    """cast -> (x * x) + 1e-4 in half: each fp16 tensor holds fp16-rounded values, as native fp16 ops give."""
    net = Net()
    h = net.network.add_cast(net.input("x", trt.float32, (1, 64)), trt.float16).get_output(0)
    sq = net.network.add_elementwise(h, h, EW.PROD).get_output(0)
    sq.name = "sq"
    net.out(net.network.add_elementwise(sq, net.const(np.full((1, 1), 1e-4, np.float16)), EW.SUM), "y")
    x = rand(1, 64) * 10
    got = net.run(x=x, outputs=["sq"])
    hx = x.half()
    assert got["sq"].dtype == got["y"].dtype == torch.float16
    assert torch.equal(got["sq"], hx * hx)
    assert torch.equal(got["y"], hx * hx + torch.tensor(1e-4, dtype=torch.float16))
    assert not torch.equal(got["y"].float(), x * x + 1e-4)  # fp32 arithmetic would differ


def test_shape_and_integer_constants():
    net = Net()
    x = net.input("x", trt.float32, (-1, 3))
    net.out(net.network.add_shape(x), "shape")
    net.out(net.network.add_elementwise(net.i64([2, 3]), net.i64([5, -1]), EW.SUM), "ints")
    v = rand(4, 3)
    got = net.run(x=v)
    assert got["shape"].dtype == torch.int64 and got["shape"].tolist() == [4, 3]
    assert got["ints"].tolist() == [7, 2]


# ------------------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("size,out", [((13, 17), (4, 6)), ((25, 40), (2, 3)), ((6, 6), (12, 9)), ((50, 64), (4, 4))])
def test_resize_nearest_asymmetric_floor_matches_interpolate(size, out):
    """The mask downsampling of DETR: F.interpolate(mode='nearest'), output size from a shape tensor."""
    net = Net()
    x = net.input("x", trt.float32, (1, 1, -1, -1))
    rs = net.network.add_resize(x)
    rs.set_input(1, net.i64([1, 1, *out]))
    rs.resize_mode = trt.InterpolationMode.NEAREST
    rs.coordinate_transformation = trt.ResizeCoordinateTransformation.ASYMMETRIC
    rs.nearest_rounding = trt.ResizeRoundMode.FLOOR
    net.out(rs, "y")
    v = rand(1, 1, *size)
    assert torch.equal(net.run(x=v)["y"], F.interpolate(v, size=out, mode="nearest"))


def test_resize_of_a_bool_mask_through_half():
    net = Net()
    m = net.network.add_cast(net.input("m", trt.bool, (2, 1, 21, 30)), trt.float16).get_output(0)
    rs = net.network.add_resize(m)
    rs.set_input(1, net.i64([2, 1, 2, 2]))
    rs.resize_mode = trt.InterpolationMode.NEAREST
    rs.coordinate_transformation = trt.ResizeCoordinateTransformation.ASYMMETRIC
    rs.nearest_rounding = trt.ResizeRoundMode.FLOOR
    net.out(net.network.add_cast(rs.get_output(0), trt.bool), "y")
    mask = torch.zeros(2, 1, 21, 30, dtype=torch.bool)
    mask[1, :, 10:, 15:] = True  # source rows 0, 10 and columns 0, 15 are sampled
    got = net.run(m=mask)["y"]
    assert torch.equal(got, F.interpolate(mask.float(), size=(2, 2)).bool())
    assert got[1, 0].tolist() == [[False, False], [False, True]]
    assert net.builds()


# ------------------------------------------------------------------------------------------- topk, cumulative


def test_topk_max_and_min_with_int32_indices():
    net = Net()
    x = net.input("x", trt.float32, (2, 6))
    top = net.network.add_topk(x, trt.TopKOperation.MAX, 3, 1 << 1)
    net.out(top.get_output(0), "values")
    net.out(top.get_output(1), "indices")
    net.out(net.network.add_topk(x, trt.TopKOperation.MIN, 2, 1 << 1).get_output(1), "min_indices")
    v = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    got = net.run(x=v)
    assert got["indices"].dtype == torch.int32
    assert got["indices"].tolist() == [[1, 3, 4], [0, 1, 2]]
    assert got["values"].tolist() == [[v[0, 1].item(), v[0, 3].item(), v[0, 4].item()], [5.0, 4.0, 3.0]]
    assert got["min_indices"].tolist() == [[0, 5], [5, 4]]


def test_cumulative_sum():
    net = Net()
    axis = net.const(np.array(1, np.int32))
    net.out(net.network.add_cumulative(net.input("x", trt.float32, (2, 4)), axis, trt.CumulativeOperation.SUM,
                                       False, False), "y")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    # y[j] sums x over 0..j (ICumulativeLayer docs)
    want = torch.stack([x[:, : j + 1].sum(1) for j in range(4)], 1)
    assert torch.equal(net.run(x=x)["y"], want)


# ------------------------------------------------------------------------------- what the network never defines


def _elementwise_max(net, x):
    return net.network.add_elementwise(x, x, EW.MAX)


def _unary_exp(net, x):
    return net.network.add_unary(x, trt.UnaryOperation.EXP)


def _slice_wrap(net, x):
    sl = net.network.add_slice(x, (0, 0), (2, 4), (1, 1))
    sl.mode = trt.SampleMode.WRAP
    return sl


def _gather_element(net, x):
    return net.network.add_gather_v2(x, net.const(np.zeros((2, 4), np.int32)), trt.GatherMode.ELEMENT)


def _resize_linear(net, x):
    rs = net.network.add_resize(x)
    rs.set_input(1, net.i64([2, 8]))
    rs.resize_mode = trt.InterpolationMode.LINEAR
    return rs


def _cumulative_exclusive(net, x):
    return net.network.add_cumulative(x, net.const(np.array(1, np.int32)), trt.CumulativeOperation.SUM, True, False)


def _matmul_vector(net, x):
    return net.network.add_matrix_multiply(x, trt.MatrixOperation.NONE, net.const(np.ones(4, np.float32)),
                                           trt.MatrixOperation.VECTOR)


@pytest.mark.parametrize("make,message", [
    (_elementwise_max, "elementwise operation MAX is not supported.*supported: SUM, PROD"),
    (_unary_exp, "unary operation EXP is not supported"),
    (_slice_wrap, "slice mode WRAP is not supported"),
    (_gather_element, "gather mode ELEMENT is not supported"),
    (_resize_linear, "resize .*LINEAR.* is not supported"),
    (_cumulative_exclusive, "cumulative SUM .*exclusive=True.* is not supported"),
    (_matmul_vector, "matrix operation VECTOR is not supported"),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_operations_and_modes_the_network_never_defines_are_refused_by_name(make, message):
    net = Net(valid=False)
    net.out(make(net, net.input("x", trt.float32, (2, 4))), "y", layer_name="unused_mode")
    net.rejects(f"'unused_mode': {message}", x=torch.ones(2, 4))


def test_same_padding_convolution_is_refused_by_name():
    net = Net(valid=False)
    conv = net.network.add_convolution_nd(net.input("x", trt.float32, (1, 2, 5, 5)), 2, (3, 3),
                                          trt.Weights(np.ones((2, 2, 3, 3), np.float32)), trt.Weights())
    conv.padding_mode = trt.PaddingMode.SAME_UPPER
    net.out(conv, "y", layer_name="same_conv")
    net.rejects("'same_conv': padding mode SAME_UPPER is not supported", x=torch.ones(1, 2, 5, 5))


# ------------------------------------------------------------------------------ plugins, errors, bookkeeping


def test_plugin_layers_are_evaluated_through_the_reference_map_in_their_declared_dtypes(monkeypatch):
    from plugins import layer_norm
    from reference import plugins as ref_plugins

    half = types.SimpleNamespace(dtype=trt.float16)
    single = types.SimpleNamespace(dtype=trt.float32)
    layer = types.SimpleNamespace(name="ln_plugin", get_input=lambda i: half if i == 0 else single, num_inputs=3,
                                  metadata=layer_norm.SPEC.metadata({"eps": 1e-5, "channels": 4}))
    run = interpret._Run("cpu", trt)
    seen = []
    monkeypatch.setitem(ref_plugins.REFERENCES, "layer_norm", lambda ins, attrs: seen.append((ins, attrs)) or [ins[0]])
    x, gamma, beta = torch.randn(2, 4), torch.ones(4), torch.zeros(4)
    (out,) = interpret._HANDLERS["PLUGIN_V3"](run, layer, [x, gamma, beta])
    ins, attrs = seen[0]
    assert [t.dtype for t in ins] == [torch.float16, torch.float32, torch.float32]  # declared, not compute dtypes
    assert attrs == {"eps": 1e-5, "channels": 4}
    monkeypatch.undo()
    (out,) = interpret._HANDLERS["PLUGIN_V3"](run, layer, [x, gamma, beta])
    torch.testing.assert_close(out, ref_plugins.layer_norm(x.half(), gamma, beta, 1e-5))
    layer.metadata = "not ours"
    with pytest.raises(InterpretError, match="ln_plugin.*not an anchortrt plugin layer"):
        interpret._HANDLERS["PLUGIN_V3"](run, layer, [x, gamma, beta])


def test_unsupported_layer_is_named():
    net = Net()
    lrn = net.network.add_lrn(net.input("x", trt.float32, (1, 4, 3, 3)), 3, 1.0, 0.75, 1.0)
    net.out(lrn, "y", layer_name="old_lrn")
    net.rejects("'old_lrn' has type LRN", x=torch.ones(1, 4, 3, 3))


def test_only_layers_that_outputs_need_are_evaluated():
    net = Net()
    x = net.input("x", trt.float32, (1, 4, 3, 3))
    net.network.add_lrn(x, 3, 1.0, 0.75, 1.0)  # a dead branch, as TensorRT would prune it
    net.out(net.network.add_elementwise(x, x, EW.SUM), "y")
    assert net.run(x=torch.ones(1, 4, 3, 3))["y"].sum().item() == 72.0


def test_input_checks():
    net = Net()
    m = net.input("masks", trt.bool, (-1, 4))
    x = net.input("images", trt.float32, (-1, 4))
    m.set_dimension_name(0, "batch")
    x.set_dimension_name(0, "batch")
    net.out(net.network.add_select(m, x, x), "y")
    good = {"masks": torch.zeros(2, 4, dtype=torch.bool), "images": torch.zeros(2, 4)}
    assert net.run(**good)["y"].shape == (2, 4)
    bad_cases = [
        ({**good, "masks": torch.zeros(2, 4, dtype=torch.uint8)}, "'masks' has dtype torch.uint8.*torch.bool"),
        ({**good, "images": torch.zeros(2, 5)}, r"'images' has shape \[2, 5\].*\[-1, 4\]"),
        ({**good, "images": torch.zeros(3, 4)}, "dimension 'batch' is 2 in input 'masks' but 3 in input 'images'"),
        ({**good, "extra": torch.zeros(1)}, r"unknown input\(s\) \['extra'\]"),
        ({"masks": good["masks"]}, r"missing input\(s\) \['images'\]"),
    ]
    for inputs, message in bad_cases:
        net.rejects(message, **inputs)


def test_intermediate_outputs_by_name_and_prefix():
    net = Net()
    x = net.input("x", trt.float32, (3,))
    a = net.network.add_unary(x, trt.UnaryOperation.SIN).get_output(0)
    a.name = "blk.0.sin"
    b = net.network.add_unary(a, trt.UnaryOperation.COS).get_output(0)
    b.name = "blk.0.cos"
    net.out(net.network.add_elementwise(b, x, EW.SUB), "y")
    v = torch.tensor([0.5, 1.0, 2.0])
    got = net.run(x=v, outputs=["blk.0.*"])
    assert sorted(got) == ["blk.0.cos", "blk.0.sin", "y"]
    assert torch.equal(got["blk.0.sin"], torch.sin(v))
    with pytest.raises(InterpretError, match="no tensor named 'blk.0.co'.*blk.0.cos"):
        net.run(x=v, outputs=["blk.0.co"])
    lenient = interpret_network(net.network, {"x": v}, outputs=["blk.0.co"], missing_ok=True)
    assert sorted(lenient) == ["y"]


# ------------------------------------------------------------------------------------------ the whole network


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    w = rand(4, 3, 3, 3, seed=1).half()
    net = Net()
    x = net.network.add_cast(net.input("x", trt.float32, (1, 3, 8, 8)), trt.float16).get_output(0)
    net.out(net.network.add_convolution_nd(x, 4, (3, 3), trt.Weights(w.numpy()), trt.Weights()), "y")
    vx = rand(1, 3, 8, 8)
    cpu = net.run(x=vx)["y"]
    gpu = interpret_network(net.network, {"x": vx}, device="cuda")["y"]
    assert gpu.device.type == "cuda"
    close(gpu.cpu(), cpu, tol=2e-3)


@pytest.mark.slow
def test_evaluate_matches_the_pytorch_reference(tmp_path):
    """Our AnchorDETR network (random peaked weights, two padded images of different sizes) through evaluate()."""
    import weights
    from reference.check import padded_batch
    from core.config import AnchorDETRConfig
    from reference.interpret import evaluate
    from reference.torch_model import AnchorDETR
    from weights.naming import to_builder

    cfg = AnchorDETRConfig.from_variant("r50_dc5")
    path = tmp_path / "random.safetensors"
    weights.save(path, cfg, to_builder(weights.random_state_dict(cfg, seed=0), cfg), source="random init")
    images, masks, _ = padded_batch(2, 96, 128, seed=1)
    got = evaluate(path, images, masks, outputs=["encoder.5"])
    model = AnchorDETR.from_builder_tensors(cfg, weights.load(path)[1], "cpu")
    ref = model.intermediates(images, masks)
    # FP32 on both sides; only the summation order differs (measured ~1e-6 relative).
    for name in ("encoder.5", "pred_logits", "pred_boxes"):
        assert got[name].dtype == torch.float32
        err = (got[name] - ref[name]).abs().max() / ref[name].abs().max()
        assert err < 1e-4, (name, err.item())
