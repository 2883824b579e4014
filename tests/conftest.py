import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=__import__("kdcore").supported_isas())
def every_isa(request):
    """Runs the test once per instruction set of kdcore's kernels that this CPU supports
    (kdcore.set_isa), then puts back the one in use."""
    import kdcore
    before = kdcore.get_isa()
    kdcore.set_isa(request.param)
    yield request.param
    kdcore.set_isa(before)
