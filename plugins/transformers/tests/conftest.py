from __future__ import annotations

import os

# Nothing may be downloaded: every model and tokenizer here is built in the test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from typing import Any

import pytest
import torch
from streambus_transformers.testing import tiny_model, tiny_tokenizer

# Two shared cores: one intra-op thread avoids oversubscription with the worker thread.
torch.set_num_threads(1)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The producer is backend-neutral: run every test on asyncio and trio."""
    return str(request.param)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model(tokenizer: Any) -> Any:
    return tiny_model(tokenizer)
