import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from util.smoothing import GaussianSmoothing


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
@pytest.mark.parametrize("shape", [(2, 56, 56), (1, 20, 31)])  # 20x31 is narrower than the sigma-4 kernel
def test_matches_scipy_gaussian_filter(sigma, shape):
    maps = np.random.default_rng(0).random(shape, dtype=np.float32) * 10
    ours = GaussianSmoothing(sigma)(torch.from_numpy(maps)).numpy()
    for i in range(shape[0]):
        expected = gaussian_filter(maps[i].astype(np.float64), sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(ours[i], expected, atol=1e-5, rtol=0)


def test_sigma_zero_is_the_identity():
    maps = torch.rand(2, 8, 8)
    assert torch.equal(GaussianSmoothing(0)(maps), maps)


def test_negative_sigma_is_rejected():
    with pytest.raises(ValueError, match="sigma"):
        GaussianSmoothing(-1)


def test_kernel_is_a_non_persistent_buffer():
    smoothing = GaussianSmoothing(4)
    assert "kernel" not in smoothing.state_dict()
    assert smoothing.kernel.shape == (33,)  # radius int(4 * 4 + 0.5) = 16
