"""Test-suite setup shared by every test.

* Without a CUDA device, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``).
  Triton reads this when a kernel is decorated, so it must be set before any ``a1_kernels``
  import: this file is the first thing pytest imports.
* ``@pytest.mark.gpu`` tests are skipped without CUDA; run them with ``pytest -m gpu``.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Multi-rank test bodies live in the test modules and are unpickled by spawned children,
# which therefore need this folder on their path.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chat_template_path() -> str:
    """The byte-exact Qwen3.5 chat template: $QWEN35_CHAT_TEMPLATE, else ../shared/qwen3_5/."""
    path = os.environ.get("QWEN35_CHAT_TEMPLATE") or os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "qwen3_5", "chat_template.jinja"
    )
    if not os.path.exists(path):
        pytest.skip(f"Qwen3.5 chat template not found at {path}; set QWEN35_CHAT_TEMPLATE")
    return os.path.abspath(path)
