import pytest


@pytest.fixture
def poisoned_attention_outputs(monkeypatch):
    """Every buffer the attention kernels write starts as NaN, so an element left unwritten
    fails (`pytestmark = pytest.mark.usefixtures("poisoned_attention_outputs")`)."""
    import torch

    from tsfast.kernels import rope_attention as kernel_module
    from tsfast.testing import poison_

    monkeypatch.setattr(kernel_module, "_alloc_output", lambda *a, **kw: poison_(torch.empty(*a, **kw)))
