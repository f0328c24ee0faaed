import os

import pytest
import torch

# Tests run on the CPU with a fixed thread count: results must not depend on the machine's cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _fresh_kvpass_state():
    """Each test starts with no kvpass stores and no compiled graphs."""
    import kvpass

    torch._dynamo.reset()
    kvpass.reset()
    yield
    torch._dynamo.reset()
    kvpass.reset()
