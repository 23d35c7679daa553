import os

import pytest
import torch

# Deterministic, quiet, and bounded on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A generated SRN-format dataset: 2 chairs x 6 views (+2 held-out views each), 1 unseen chair x 4 views, 16 px."""
    from srn_fast.data import generate

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny") / "chairs"
    out = generate("chairs", instances=2, views=6, size=16, seed=0, out=str(out), test_views=2,
                   unseen_instances=1, unseen_views=4, progress=False)
    torch.set_num_threads(n)
    return out
