"""On a GPU: the pipeline's GPU path with GPU decoding (order, error isolation, bounded memory), and the PyTorch
reference on the GPU path against its CPU path."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import CudaRunner, NumpyDetector, solid

pytestmark = pytest.mark.gpu


@pytest.fixture
def files(tmp_path):
    """Ten images: JPEGs of three colours and sizes, a PNG, a palette GIF and a truncated JPEG among them."""
    paths = []
    for i in range(10):
        suffix = {3: "png", 6: "gif"}.get(i, "jpg")
        path = tmp_path / f"{i}.{suffix}"
        solid(40 + 37 * i, 30 + 23 * (i % 4), i % 3).save(path, **({"quality": 92} if suffix == "jpg" else {}))
        paths.append(path)
    paths[7].write_bytes(paths[8].read_bytes()[:200])
    return paths


def test_gpu_decoding_pipeline_keeps_order_isolates_errors_and_bounds_memory(files):
    pytest.importorskip("nvidia.nvimgcodec")
    from runtime.pipeline import PipelineStats
    from runtime.preprocess import ImageError

    stats = PipelineStats()
    runner = CudaRunner()
    got = runner.detect_files(files, threshold=0.3, batch=2, in_flight=2, gpu_preprocess=True, gpu_decode=True,
                              stats=stats)
    expected = NumpyDetector().detect_files(files, threshold=0.3, batch=2)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if i == 7:
            assert isinstance(g, ImageError) and isinstance(e, ImageError) and str(files[7]) in str(g)
            continue
        assert g["labels"].tolist() == e["labels"].tolist()  # a level here and there moves no label or box
        np.testing.assert_allclose(g["boxes"], e["boxes"], atol=1e-4)
    assert stats.errors == 1 and stats.max_live <= 2 and len(runner.siblings) == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    from core.config import AnchorDETRConfig
    from helpers import save_random_weights
    from runtime.torch_detector import TorchReference

    path = save_random_weights(tmp_path_factory.mktemp("w") / "w.safetensors", AnchorDETRConfig.from_variant("r50_dc5"))
    model = TorchReference(path, "cuda")
    yield model
    model.close()


def test_reference_on_the_gpu_path_gives_the_cpu_paths_detections(reference, files):
    """Pillow decoding on both paths: the kernel's input equals the CPU path's bit for bit, so the only difference
    is the forward's own nondeterminism (cuDNN algorithm choice): scores within 1e-5, boxes within 0.01 px."""
    good = [p for i, p in enumerate(files) if i != 7]
    cpu = reference.detect_files(good, threshold=0.0, batch=2, gpu_preprocess=False)
    gpu = reference.detect_files(good, threshold=0.0, batch=2, gpu_preprocess=True, gpu_decode=False)
    for c, g in zip(cpu, gpu, strict=True):
        assert len(c["scores"]) == len(g["scores"]) == 100
        np.testing.assert_allclose(g["scores"], c["scores"], atol=1e-5)
        same = g["labels"] == c["labels"]
        assert same.mean() > 0.9  # ranks may swap only between near-equal scores
        np.testing.assert_allclose(g["boxes"][same], c["boxes"][same], atol=1e-2)


def test_reference_gpu_path_with_gpu_decoding(reference, files):
    pytest.importorskip("nvidia.nvimgcodec")
    from runtime.preprocess import ImageError

    got = reference.detect_files(files, threshold=0.0, batch=4, gpu_preprocess=True, gpu_decode=True)
    assert isinstance(got[7], ImageError)
    assert all(len(r["scores"]) == 100 for i, r in enumerate(got) if i != 7)
