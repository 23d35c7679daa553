import os

import pytest
import torch

# Deterministic, quiet, and bounded on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
