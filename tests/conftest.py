import os

# Triton kernels run on CPU tensors through the interpreter; this must be set before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFIGURE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "transfigure"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_rng():
    """Each test starts from the same global RNG state and an empty Dynamo cache: results never depend on order."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
