import os

import pytest
import torch

# Tiny-model tests are dominated by per-op overhead; one thread avoids oversubscribing small CI machines.
torch.set_num_threads(int(os.environ.get("FLASHMEMORY_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


SMALL_LSA = dict(chunk_size=8, page_chunks=2, interval=16, recent=16, sink=4)
