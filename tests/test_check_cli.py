"""reference.check: the padded batch, the parity rows, the CLI's exit codes, and the whole check on a shallow
AnchorDETR (1 encoder and 1 decoder layer, random weights) including a network that diverges on purpose."""

from __future__ import annotations

import json
import math

import pytest
import torch

import reference.check as check
from core.backend import BackendError, get_backend
from reference.check import compare, main, padded_batch
from helpers import run_cli, save_random_weights


def test_padded_batch_has_different_sizes_and_a_matching_mask():
    images, masks, sizes = padded_batch(3, 96, 128, seed=1)
    assert images.shape == (3, 3, 96, 128) and masks.shape == (3, 96, 128) and masks.dtype == torch.bool
    assert sizes[0] == (96, 128) and len(set(sizes)) == 3
    for i, (h, w) in enumerate(sizes):
        assert not masks[i, :h, :w].any() and masks[i].sum() == 96 * 128 - h * w
        assert (images[i, :, h:, :] == 0).all() and (images[i, :, :, w:] == 0).all()
        assert images[i, :, :h, :w].std() > 0.5  # real content up to the edge
    assert any(h % 16 or w % 16 for h, w in sizes)  # sizes off the stride exercise the mask downsampling
    again, _, _ = padded_batch(3, 96, 128, seed=1)
    assert torch.equal(images, again)


def test_compare_rows():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    ok = compare("encoder.0", ref + 1e-4, ref, tol=1e-3)
    assert ok["passed"] and ok["problem"] is None and ok["shape"] == [2, 2]
    assert math.isclose(ok["max_abs_err"], 1e-4, rel_tol=1e-3)
    assert math.isclose(ok["max_rel_err"], 1e-4 / 4, rel_tol=1e-3)  # relative to the block's largest |value|

    bad = compare("encoder.0", ref * 1.01, ref, tol=1e-3)
    assert not bad["passed"] and math.isclose(bad["max_abs_err"], 0.04, rel_tol=1e-3)

    nan = compare("decoder.0", torch.full_like(ref, math.nan), ref, tol=1.0)
    assert not nan["passed"] and nan["problem"] == "non-finite values"

    shape = compare("backbone", ref[:1], ref, tol=1.0)
    assert not shape["passed"] and "network shape [1, 2] != reference [2, 2]" in shape["problem"]

    missing = compare("posemb_row", None, ref, tol=1.0)
    assert not missing["passed"] and missing["problem"] == "not in the network"

    mask = torch.tensor([[True, False], [False, False]])
    assert compare("mask", mask.clone(), mask, tol=0)["passed"]
    assert not compare("mask", ~mask, mask, tol=0.5)["passed"]


def run_main(argv, capsys):
    return run_cli(main, argv, capsys)


def test_cli_input_errors(tmp_path, capsys):
    code, out, err = run_main(["--weights", tmp_path / "none.safetensors"], capsys)
    assert code == 2 and "python -m weights.extract --random-init r50_dc5" in err and err.count("\n") == 1
    assert err.startswith("python -m reference.check: error: ")  # argparse's form, as every CLI of ours
    code, out, err = run_main(["--weights", tmp_path / "none.safetensors", "--size", "16x64"], capsys)
    assert code == 2 and "--size 16x64 is below 32x32" in err
    with pytest.raises(SystemExit) as exc:
        main(["--batch", "0"])
    assert exc.value.code == 2 and "argument --batch: expected a positive integer, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("tol", ["-1", "0", "nan", "inf", "tiny"])
def test_tolerance_must_be_positive_and_finite(tol, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--tol", tol])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --tol: " in err, err
    assert f"expected a positive finite number, e.g. 1e-3, got '{tol}'" in err
    # A good tolerance passes argument parsing: the next check (the weights file) answers.
    code, _, err = run_main(["--tol", "2e-4", "--weights", tmp_path / "none.safetensors"], capsys)
    assert code == 2 and "none.safetensors" in err


@pytest.mark.parametrize("backend", [None, "tensorrt", "tensorrt-rtx"])
def test_no_backend_that_can_build_is_exit_3(backend, tmp_path, capsys, monkeypatch):
    """Full TensorRT without a usable GPU cannot create a Builder: one line, exit 3, not a traceback."""
    import core.backend

    monkeypatch.setattr(core.backend, "_builder_problem",
                        lambda name: f"{name} 0.0 cannot create a builder on this machine (no usable GPU?)")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # never read: the backend is chosen first
    code, out, err = run_main(["--weights", weights] + (["--backend", backend] if backend else []), capsys)
    assert code == 3 and out == "" and err.count("\n") == 1, err
    assert err.startswith("python -m reference.check: error: no TensorRT backend can build here: ")
    assert all(f"{name} 0.0 cannot create a builder" in err for name in ([backend] if backend else ["tensorrt", "tensorrt-rtx"]))


def test_the_lean_runtime_is_no_backend_choice(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--backend", "tensorrt-lean"])  # it has no Builder, so it cannot define the network
    assert exc.value.code == 2 and "argument --backend: invalid choice: 'tensorrt-lean'" in capsys.readouterr().err


def test_cuda_without_a_device_is_exit_3(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code, out, err = run_main(["--weights", weights, "--device", "cuda"], capsys)
    assert code == 3 and "--device cpu" in err


# ---------------------------------------------------------------- the whole check on a shallow model


@pytest.fixture(scope="module")
def shallow_weights(tmp_path_factory):
    try:
        get_backend()
    except BackendError as e:
        pytest.skip(str(e))
    from core.config import AnchorDETRConfig

    cfg = AnchorDETRConfig(enc_layers=1, dec_layers=1)
    return save_random_weights(tmp_path_factory.mktemp("check") / "shallow.safetensors", cfg)


def test_sizes_too_large_are_refused_before_anything_is_allocated(shallow_weights, capsys, monkeypatch):
    monkeypatch.setattr(check, "padded_batch", lambda *a, **k: pytest.fail("allocated the batch"))
    code, out, err = run_main(["--weights", shallow_weights, "--size", "100000x100000"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--size 100000x100000 with --batch 2 makes the " in err and "above the 2,147,483,647" in err
    assert "lower --size or --batch" in err
    monkeypatch.setattr(check.os, "sysconf", lambda name: 1 << 10 if name == "SC_PHYS_PAGES" else 4096)  # 4 MiB
    code, out, err = run_main(["--weights", shallow_weights], capsys)
    assert code == 2 and "more than this machine's 4.0 MiB: lower --size or --batch" in err, err


BLOCKS = ["backbone", "mask", "input_proj", "posemb_row", "posemb_col", "encoder.0", "decoder.0",
          "pred_logits", "pred_boxes"]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_shallow_network_matches_the_reference(shallow_weights, precision, capsys):
    argv = ["--weights", shallow_weights, "--size", "96x128", "--batch", "2", "--json"]
    code, out, err = run_main(argv + (["--fp16"] if precision == "fp16" else []), capsys)
    report = json.loads(out)
    assert [r["block"] for r in report["blocks"]] == BLOCKS
    failing = [(r["block"], r["max_rel_err"], r["problem"]) for r in report["blocks"] if not r["passed"]]
    assert code == 0 and report["passed"], failing
    assert report["precision"] == precision and report["tolerance"] == check.TOLERANCE[precision]
    assert report["batch"][0] == [96, 128] and report["batch"][1] != [96, 128]


def test_a_diverging_network_is_found_at_its_block(shallow_weights, capsys, monkeypatch):
    # Perturb one decoder weight on the network side only: every block before decoder.0 still matches, and
    # the table names decoder.0 as the first difference.
    original = check.create_network

    def perturbed(backend, cfg, tensors, **kw):
        tensors = dict(tensors)
        key = "transformer.decoder_layers.0.ffn.linear2.bias"
        tensors[key] = tensors[key].copy()
        tensors[key][0] += 1.0  # one channel: a uniform shift would vanish in the following LayerNorm
        return original(backend, cfg, tensors, **kw)

    monkeypatch.setattr(check, "create_network", perturbed)
    code, out, err = run_main(["--weights", shallow_weights, "--size", "64x96", "--batch", "1"], capsys)
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines()[3:] if line.strip() and not line.startswith(("1 ", "all"))}
    assert all(rows[b].endswith("pass") for b in BLOCKS[:6])
    assert all("FAIL" in rows[b] for b in BLOCKS[6:])  # decoder.0 and the heads that read it
    assert "the first is decoder.0" in out
