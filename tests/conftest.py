import os
from pathlib import Path

import pytest

# Triton reads these when a kernel is decorated: set before any tsfast.kernels import.
# With no GPU, kernels run in Triton's CPU interpreter (slow; fp32/fp16 only).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (600 stories, ~75k tokens), prepared once per session (per
    worker under pytest-xdist)."""
    from tsfast.data.prepare import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("data"), num_stories=600, workers=1, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny matmuls on a shared 2-core machine run ~20x faster on one thread than on two
    (measured: 5.6 ms vs 107 ms a forward under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Fixtures of the helper modules, shared by every test module that names them.
from hf_helpers import gpt2_dir  # noqa: E402, F401
from trained_checkpoint import trained_ckpt  # noqa: E402, F401
