"""Shared fixtures: a tiny synthetic category (raw layout) and its prepared copy."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests import util.* and scripts.* from the repository root


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "slow: slower tests (seconds to a minute); still run in make test")


@pytest.fixture(scope="session")
def synthetic_category(tmp_path_factory) -> Path:
    """A small capsule-like category in the raw MVTec layout (64 px; 8 train, 4 good, 2 per defect)."""
    from scripts.make_synthetic_mvtec import make_category

    root = tmp_path_factory.mktemp("synthetic") / "capsule_synth"
    make_category(root, seed=0, size=64, n_train=8, n_test_good=4, n_per_defect=2)
    return root


@pytest.fixture(scope="session")
def prepared_category(synthetic_category, tmp_path_factory) -> Path:
    """`synthetic_category` restructured by scripts/prepare_mvtec.py (prepared layout)."""
    from scripts.prepare_mvtec import prepare

    dst = tmp_path_factory.mktemp("prepared") / "capsule_synth"
    prepare(synthetic_category, dst, log=lambda msg: None)
    return dst


@pytest.fixture
def one_thread():
    """One intra-op thread for in-process training and scoring: the test machine's 2 cores are
    shared, and OpenMP threads that spin while waiting for a busy core make tiny steps 10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
