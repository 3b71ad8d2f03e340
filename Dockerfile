# GPU image for megatron_a1 on clusters (A100/H100/B200).
#
# Base: an NGC PyTorch image. It ships Python 3.12, CUDA, PyTorch, Triton, Transformer Engine
# and apex; pip must never replace its torch or Triton, so this package is installed without
# the `cpu` extra (which pins the PyPI torch used on CPU machines) and megatron-core with
# --no-deps. Pick a release whose Python is 3.12 (megatron-core 0.19 requires it); the build
# prints the torch / Triton / TE versions it found, which the kernel report
# (tools/kernel_report.py) also records. CPU CI uses pip's triton 3.7.1.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN python -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version"

# megatron-core without its dependencies (torch comes from the image).
RUN pip install --no-deps megatron-core==0.19.2

# GPU kernels used by megatron-core's Gated DeltaNet (packed THD, context parallelism).
RUN pip install --no-deps flash-linear-attention==0.6.0 \
 && pip install --no-build-isolation causal-conv1d

WORKDIR /workspace/megatron_a1
COPY . .
# The image's torch/Triton/TE are frozen as constraints so no requirement can replace them.
RUN pip list --format=freeze | grep -iE '^(torch|triton|transformer[-_]engine.*|apex)==' > /tmp/image-constraints.txt \
 && pip install -c /tmp/image-constraints.txt -e '.[dev]' \
 && python -c "import torch, triton, megatron.core, megatron_a1, a1_kernels; \
print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', megatron.core.__version__)"

CMD ["bash"]
