"""Pillow's pass order per release line (runtime.gpu_preprocess.pass_order / vertical_first), read from its source.

The expected orders come from Pillow's code, not from running it: 10.0-12.1 always resize horizontally first
(ImagingResampleInner); 12.2-12.3 resize an image taller than 100 widths whose height shrinks vertically first
(Image.resize, #9524); 13.0 does so when the height loses more than twice the width's pixels (ImagingResampleInner,
#9549). Against the installed Pillow, the decisive cases (the two orders give different pixels) show the rule it
gets is the one it runs. `python -m benchmarks.pillow_lines` does the same under every line.
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL
import pytest
from PIL import Image

from runtime.gpu_preprocess import _resample, pass_order, pillow_bilinear, vertical_first

TALL = (3000, 10, 1333, 4)  # the GPU test's 3000x10 image (2,523 values one level off on the H200, Pillow 12.3.0)
TALL_EDGE = (1000, 10, 500, 7)  # exactly 100 widths tall: not "taller than 100 widths"
TALLER = (1001, 10, 500, 7)
SHRINK_EQUAL = (30, 20, 10, 10)  # the height loses 20 pixels, exactly twice the width's 10
SHRINK_MORE = (31, 20, 10, 10)  # 21 > 2 * 10
WIDE = (10, 3000, 4, 1333)
UPSCALE = (480, 640, 800, 1066)

# (release, size, vertical pass first), from the source of each release.
EXPECTED = [
    *((v, size, False) for v in ("10.0.0", "10.4.0", "11.3.0", "12.0.0", "12.1.1")
      for size in (TALL, TALLER, SHRINK_MORE, WIDE, UPSCALE)),
    *((v, size, vertical) for v in ("12.2.0", "12.3.0")
      for size, vertical in ((TALL, True), (TALLER, True), (TALL_EDGE, False), ((1001, 10, 1001, 7), False),
                             (SHRINK_MORE, False), (WIDE, False), (UPSCALE, False))),
    *(("13.0.0", size, vertical)
      for size, vertical in ((TALL, True), (TALL_EDGE, True), (SHRINK_MORE, True), (SHRINK_EQUAL, False),
                             ((61, 40, 40, 30), True), ((60, 40, 40, 30), False), (WIDE, False), (UPSCALE, False),
                             ((1001, 10, 1001, 7), False))),
]


@pytest.mark.parametrize("version, size, vertical", EXPECTED, ids=[f"{v}-{'x'.join(map(str, s))}" for v, s, _ in EXPECTED])
def test_pass_order_per_release_from_the_source(version, size, vertical):
    assert vertical_first(*size, pillow=version) is vertical


def test_the_h200_failure_is_fixed_for_12_3():
    # Pillow 12.3.0 on the H200: horizontal first in C, so the probe-gated rule said "horizontal" for 3000x10,
    # but Image.resize itself runs that resize vertically first.
    assert vertical_first(*TALL, pillow="12.3.0") and not vertical_first(*SHRINK_MORE, pillow="12.3.0")


def test_development_and_candidate_versions_use_their_release():
    assert pass_order("13.0.0.dev0") is pass_order("13.0.0")
    assert pass_order("12.2.0rc1") is pass_order("12.3.0") is not pass_order("12.1.1")


def test_a_newer_release_gets_the_newest_rule_with_a_warning():
    pass_order.cache_clear()  # the warning comes once per version per process
    with pytest.warns(RuntimeWarning, match=r"Pillow 14\.1\.0 is newer than 13\.0.*benchmarks\.pillow_lines"):
        rule = pass_order("14.1.0")
    assert rule is pass_order("13.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pass_order("13.0.0")  # a checked release: no warning


def test_an_unreadable_version_is_refused():
    with pytest.raises(ValueError, match="cannot read a Pillow release"):
        pass_order("unknown")


def test_default_is_the_installed_pillow():
    for size in (TALL, TALL_EDGE, SHRINK_MORE, SHRINK_EQUAL, WIDE):
        assert vertical_first(*size) is vertical_first(*size, pillow=PIL.__version__)


@pytest.mark.parametrize("size", [TALL, TALL_EDGE, TALLER, SHRINK_EQUAL, SHRINK_MORE, (60, 40, 40, 30),
                                  (61, 40, 40, 30), WIDE, UPSCALE])
def test_installed_pillow_runs_the_order_its_rule_says(size):
    in_h, in_w, out_h, out_w = size
    rgb = np.random.default_rng(in_h + 7 * in_w).integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(rgb, "RGB").resize((out_w, out_h), Image.Resampling.BILINEAR))
    other = _resample(rgb, out_h, out_w, vertical=not vertical_first(*size))
    assert not np.array_equal(other, pillow), "not decisive: both orders give Pillow's pixels"
    np.testing.assert_array_equal(pillow_bilinear(rgb, out_h, out_w), pillow)


def test_pillow_lines_check_under_the_installed_pillow():
    from benchmarks.pillow_lines import check
    from core.errors import Failed

    result = check(PIL.__version__, 6)
    assert result["equal"] == result["cases"] > 40 and result["values_differ"] == 0 and not result["failures"]
    assert result["decisive"] > 20  # most cases tell the two orders apart
    with pytest.raises(Failed, match="expected Pillow 9.9.9"):
        check("9.9.9", 1)
