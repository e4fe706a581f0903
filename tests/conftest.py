import os

import torch

# The Triton interpreter only where there is no GPU (on a GPU the compiled kernels are what the tests check). Must
# be set before any module defining a @triton.jit kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# One torch thread for everything, module-scoped fixtures included (they run before the per-test fixture below).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run torch single-threaded: their tiny matmuls are several times slower with intra-op threads on a
    small, shared CPU. (Tests that measure threading set their own.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny GQA Llama base model directory (config.json + safetensors + tokenizer)."""
    from support.models import make_random_base
    return make_random_base(tmp_path_factory.mktemp("tiny_base"), "gqa16", seed=0)
