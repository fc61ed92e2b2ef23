"""Plugin kernels on a GPU against their PyTorch references, over the shapes of the build profile
(images 320x512 .. 800x800 .. 1344x1344 -> stride-16 feature maps), batch 1 and 4, fp32 and fp16, padded masks
with fully padded rows; and, with full TensorRT, the AOT plugin layers inside real engines."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from netdef.build import _creation_flags
from core.backend import backend_of
from plugins import add_bias_transpose, layer_norm, mask2pos, masked_softmax
from reference import plugins as ref

pytestmark = pytest.mark.gpu

# (h, w) of the feature maps: profile min, opt, max, and an odd size in between.
FEATURES = [(20, 32), (50, 50), (84, 84), (38, 67)]
DTYPES = [torch.float32, torch.float16]
HEADS, CHANNELS = 8, 256


def feature_mask(batch: int, h: int, w: int) -> torch.Tensor:
    """Padding like a batch of images of different sizes: image i keeps a shrinking top-left valid region, so
    the bottom rows and right columns of the later images are fully padded."""
    mask = torch.ones(batch, h, w, dtype=torch.bool, device="cuda")
    for i in range(batch):
        mask[i, : max(1, h - 7 * i), : max(1, w - 11 * i)] = False
    return mask


def tolerance(dtype):
    return {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float16 else {"atol": 2e-6, "rtol": 1e-5}


def cases():
    for h, w in FEATURES:
        for batch in (1, 4):
            for dtype in DTYPES:
                yield pytest.param(h, w, batch, dtype, id=f"{h}x{w}-b{batch}-{str(dtype)[6:]}")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("h,w,batch,dtype", list(cases()))
@pytest.mark.parametrize("axis", ["row", "col"])
def test_masked_softmax_matches_reference(h, w, batch, dtype, axis):
    mask = feature_mask(batch, h, w)
    key_mask = mask[:, 0, :] if axis == "row" else mask[:, :, 0]
    if batch > 1:
        key_mask = key_mask.clone()
        key_mask[-1] = True  # a fully padded key row: zeros, not NaN
    logits = (torch.randn(batch, HEADS, h * w, key_mask.shape[1], device="cuda") * 8).to(dtype)
    probs = ref.run_masked_softmax(logits, key_mask)
    torch.testing.assert_close(probs, ref.masked_softmax(logits, key_mask), **tolerance(dtype))
    assert not probs.isnan().any()
    if batch > 1:
        assert (probs[-1] == 0).all()


@pytest.mark.parametrize("h,w,batch,dtype", list(cases()))
def test_layer_norm_matches_reference(h, w, batch, dtype):
    x = (torch.randn(batch, h * w, CHANNELS, device="cuda") * 4 + 2).to(dtype)
    gamma, beta = torch.randn(CHANNELS, device="cuda"), torch.randn(CHANNELS, device="cuda")
    out = ref.run_layer_norm(x, gamma, beta, 1e-5)
    tol = {"atol": 5e-3, "rtol": 2e-3} if dtype == torch.float16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, ref.layer_norm(x, gamma, beta, 1e-5), **tol)


@pytest.mark.parametrize("h,w,batch,dtype", list(cases()))
def test_add_bias_transpose_matches_reference(h, w, batch, dtype):
    x = torch.randn(batch, h * w, CHANNELS, device="cuda").to(dtype)
    bias = torch.randn(CHANNELS, device="cuda")
    scale = (CHANNELS // HEADS) ** -0.5
    out = ref.run_add_bias_transpose(x, bias, HEADS, scale)
    torch.testing.assert_close(out, ref.add_bias_transpose(x, bias, HEADS, scale), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("h,w,batch,dtype", list(cases()))
def test_mask2pos_matches_reference(h, w, batch, dtype):
    mask = feature_mask(batch, h, w)
    fp16 = dtype == torch.float16
    emb_col, emb_row = ref.run_mask2pos(mask, 256, fp16=fp16)
    ref_col, ref_row = ref.mask2pos(mask, 256, fp16=fp16)
    tol = {"atol": 1e-3, "rtol": 1e-3} if fp16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(emb_col, ref_col, **tol)
    torch.testing.assert_close(emb_row, ref_row, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_masked_softmax_rows_longer_than_the_register_chunk(dtype):
    """Rows of more than 32 * KEYS_PER_LANE keys take the re-reading path."""
    keys = 32 * masked_softmax.KEYS_PER_LANE * 2 + 45
    key_mask = torch.rand(3, keys, device="cuda") < 0.3
    key_mask[1] = True
    key_mask[2, : 32 * masked_softmax.KEYS_PER_LANE] = True  # the first chunk has no valid key
    logits = (torch.randn(3, 2, 40, keys, device="cuda") * 8).to(dtype)
    probs = ref.run_masked_softmax(logits, key_mask)
    torch.testing.assert_close(probs, ref.masked_softmax(logits, key_mask), **tolerance(dtype))
    assert (probs[1] == 0).all()


@pytest.mark.parametrize("keys", [20, 32, 33, 50, 64, 65, 84, 128, 130])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
def test_masked_softmax_packs_short_rows(keys, dtype):
    """Row lengths on both sides of each packing threshold (8 lanes a row up to 32 keys, 16 up to 64, a warp up to
    128, re-read beyond). 3 heads x 7 queries per image: packed warps straddle two images and the last warp is
    partly empty; the output buffer is longer than the output, and nothing past the last row may be written."""
    batch, heads, queries = 3, 3, 7
    rows = batch * heads * queries
    key_mask = torch.rand(batch, keys, device="cuda") < 0.3
    key_mask[1] = True  # a fully padded image: zeros, not NaN
    logits = (torch.randn(batch, heads, queries, keys, device="cuda") * 8).to(dtype)
    buffer = torch.full(((rows + 64) * keys,), 7.0, dtype=dtype, device="cuda")
    masked_softmax.launch(logits.data_ptr(), key_mask.data_ptr(), buffer.data_ptr(), logits.shape,
                          str(dtype).removeprefix("torch."), stream=torch.cuda.current_stream().cuda_stream)
    probs = buffer[: rows * keys].view(logits.shape)
    torch.testing.assert_close(probs, ref.masked_softmax(logits, key_mask), **tolerance(dtype))
    assert (probs[1] == 0).all()
    assert (buffer[rows * keys:] == 7).all()


def test_decoder_shapes():
    """900 queries against 50 keys (cross-attention) and LayerNorm over (B, 900, 256)."""
    key_mask = feature_mask(4, 50, 50)[:, 0, :]
    logits = torch.randn(4, HEADS, 900, 50, device="cuda") * 8
    torch.testing.assert_close(ref.run_masked_softmax(logits, key_mask), ref.masked_softmax(logits, key_mask),
                               **tolerance(torch.float32))
    x = torch.randn(4, 900, CHANNELS, device="cuda", dtype=torch.float16)
    gamma, beta = torch.rand(CHANNELS, device="cuda"), torch.rand(CHANNELS, device="cuda")
    torch.testing.assert_close(ref.run_layer_norm(x, gamma, beta), ref.layer_norm(x, gamma, beta, 1e-5),
                               atol=5e-3, rtol=2e-3)


def test_pointer_launchers_on_a_stream():
    """The pointer-level launchers (what a runtime without torch would call) on a non-default stream."""
    stream = torch.cuda.Stream()
    mask = feature_mask(2, 38, 67)
    key_mask = mask[:, 0, :].contiguous()
    logits = torch.randn(2, HEADS, 10, 67, device="cuda")
    x = torch.randn(2, 10, CHANNELS, device="cuda", dtype=torch.float16)
    gamma, beta, bias = (torch.randn(CHANNELS, device="cuda") for _ in range(3))
    probs, normed = torch.empty_like(logits), torch.empty_like(x)
    heads_out = torch.empty(2, HEADS, 10, CHANNELS // HEADS, device="cuda", dtype=torch.float16)
    emb_col, emb_row = torch.empty(2, 38, 256, device="cuda"), torch.empty(2, 67, 256, device="cuda")
    torch.cuda.synchronize()
    s = stream.cuda_stream
    masked_softmax.launch(logits.data_ptr(), key_mask.data_ptr(), probs.data_ptr(), logits.shape, "float32", stream=s)
    layer_norm.launch(x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), normed.data_ptr(), x.shape, "float16",
                      eps=1e-5, stream=s)
    add_bias_transpose.launch(x.data_ptr(), bias.data_ptr(), heads_out.data_ptr(), x.shape, "float16", HEADS, 0.5,
                              stream=s)
    mask2pos.launch(mask.data_ptr(), emb_col.data_ptr(), emb_row.data_ptr(), mask.shape, 256, stream=s)
    stream.synchronize()
    torch.testing.assert_close(probs, ref.masked_softmax(logits, key_mask), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(normed, ref.layer_norm(x, gamma, beta, 1e-5), atol=5e-3, rtol=2e-3)
    torch.testing.assert_close(heads_out, ref.add_bias_transpose(x, bias, HEADS, 0.5), atol=1e-6, rtol=1e-6)
    ref_col, ref_row = ref.mask2pos(mask, 256)
    torch.testing.assert_close(emb_col, ref_col, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_row, ref_row, atol=1e-5, rtol=1e-5)


def test_ptx_images_load_and_agree_with_cubins():
    """The PTX that TensorRT would embed, JIT-compiled by this driver, gives the cubin's results."""
    from core import cuda

    try:
        ref.run_masked_softmax(torch.zeros(1, 1, 1, 4, device="cuda"), torch.zeros(1, 4, dtype=torch.bool,
                                                                                  device="cuda"), image="ptx")
    except cuda.CudaError as exc:
        if "newer than this driver" in str(exc):
            pytest.skip(str(exc))
        raise
    mask = feature_mask(4, 50, 50)
    logits = torch.randn(4, HEADS, 2500, 50, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 2500, CHANNELS, device="cuda")
    gamma, beta = torch.randn(CHANNELS, device="cuda"), torch.randn(CHANNELS, device="cuda")
    pairs = [
        lambda image: [ref.run_masked_softmax(logits, mask[:, 0, :], image=image)],
        lambda image: [ref.run_layer_norm(x, gamma, beta, image=image)],
        lambda image: [ref.run_add_bias_transpose(x, beta, HEADS, 0.125, image=image)],
        lambda image: list(ref.run_mask2pos(mask, 256, image=image)),
    ]
    for run in pairs:
        for a, b in zip(run("ptx"), run("cubin")):
            torch.testing.assert_close(a, b, **tolerance(a.dtype))


# ---------------------------------------------------------------- full TensorRT (skipped without it)


def build_and_run(trt, add, inputs: dict, profile: dict, out_names):
    """Build an engine whose inputs are `inputs` (dynamic dims where the profile varies), add the plugin with
    `add(network, tensors)`, run it at the inputs' shapes; returns (outputs, serialized plan)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_creation_flags(backend_of(trt)))
    dtypes = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bool: trt.bool}
    tensors = {}
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    for name, value in inputs.items():
        lo, hi = profile[name]
        dims = tuple(-1 if a != b else a for a, b in zip(lo, hi))
        tensors[name] = network.add_input(name, dtypes[value.dtype], dims)
        opt.set_shape(name, lo, tuple(value.shape), hi)
    config.add_optimization_profile(opt)
    layer = add(network, tensors)
    for i, name in enumerate(out_names):
        out = layer.get_output(i)
        out.name = name
        network.mark_output(out)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "engine build failed"
    return run_plan(trt, bytes(plan), inputs, out_names), bytes(plan)


def run_plan(trt, plan: bytes, inputs: dict, out_names):
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    ctx = engine.create_execution_context()
    for name, value in inputs.items():
        ctx.set_input_shape(name, tuple(value.shape))
        ctx.set_tensor_address(name, value.data_ptr())
    torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    outs = []
    for name in out_names:
        out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch_dtypes[engine.get_tensor_dtype(name)],
                          device="cuda")
        ctx.set_tensor_address(name, out.data_ptr())
        outs.append(out)
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return outs


@pytest.mark.trt
def test_aot_plugin_layers_in_engines_match_references(tmp_path):
    import tensorrt as trt

    mask = feature_mask(2, 38, 67)
    key_mask = mask[:, 0, :].contiguous()
    logits = torch.randn(2, HEADS, 38 * 67, 67, device="cuda", dtype=torch.float16) * 8
    x = torch.randn(2, 900, CHANNELS, device="cuda")
    gamma, beta = np.random.randn(CHANNELS).astype(np.float32), np.random.randn(CHANNELS).astype(np.float32)
    profiles = {
        "logits": ((1, HEADS, 1, 1), (4, HEADS, 7056, 84)),
        "key_mask": ((1, 1), (4, 84)),
        "x": ((1, 1, CHANNELS), (4, 7056, CHANNELS)),
        "mask": ((1, 1, 1), (4, 84, 84)),
    }
    (probs,), plan = build_and_run(
        trt, lambda net, t: masked_softmax.add_layer(trt, net, t["logits"], t["key_mask"]),
        {"logits": logits, "key_mask": key_mask}, profiles, ["probs"])
    torch.testing.assert_close(probs, ref.masked_softmax(logits, key_mask), atol=1e-3, rtol=1e-3)
    (normed,), _ = build_and_run(
        trt, lambda net, t: layer_norm.add_layer(trt, net, t["x"], gamma, beta, 1e-5), {"x": x}, profiles, ["out"])
    g, b = torch.from_numpy(gamma).cuda(), torch.from_numpy(beta).cuda()
    torch.testing.assert_close(normed, ref.layer_norm(x, g, b, 1e-5), atol=1e-5, rtol=1e-5)
    (heads,), _ = build_and_run(
        trt, lambda net, t: add_bias_transpose.add_layer(trt, net, t["x"], beta, HEADS, 32**-0.5), {"x": x},
        profiles, ["out"])
    torch.testing.assert_close(heads, ref.add_bias_transpose(x, b, HEADS, 32**-0.5), atol=1e-6, rtol=1e-6)
    (emb_col, emb_row), _ = build_and_run(
        trt, lambda net, t: mask2pos.add_layer(trt, net, t["mask"], 256), {"mask": mask}, profiles,
        ["emb_col", "emb_row"])
    ref_col, ref_row = ref.mask2pos(mask, 256)
    torch.testing.assert_close(emb_col, ref_col, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_row, ref_row, atol=1e-5, rtol=1e-5)

    # The engine runs without our Python: a fresh process that imports only tensorrt and torch.
    (tmp_path / "softmax.plan").write_bytes(plan)
    torch.save({"logits": logits.cpu(), "key_mask": key_mask.cpu()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch, tensorrt as trt
        inputs = {{k: v.cuda() for k, v in torch.load({str(tmp_path / 'inputs.pt')!r}).items()}}
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            open({str(tmp_path / 'softmax.plan')!r}, 'rb').read())
        ctx = engine.create_execution_context()
        for name, value in inputs.items():
            ctx.set_input_shape(name, tuple(value.shape))
            ctx.set_tensor_address(name, value.data_ptr())
        out = torch.empty(tuple(ctx.get_tensor_shape('probs')), dtype=torch.float16, device='cuda')
        ctx.set_tensor_address('probs', out.data_ptr())
        assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert 'plugins' not in sys.modules
        torch.save(out.cpu(), {str(tmp_path / 'probs.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "probs.pt"), probs.cpu())
