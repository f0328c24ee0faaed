import os

# Without a GPU, Triton kernels run in its interpreter.  The variable must be set before anything
# imports triton.language (transformers and Inductor do), or its standard library is compiled for a
# GPU and cannot be called from interpreted kernels.
if os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "" or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
