# megatron_sparkling on NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine and apex
# come with the image). Build:  docker build -t megatron-sparkling .
# Run a stage:  docker run --gpus all --ipc=host -v $PWD:/workspace/run megatron-sparkling \
#     torchrun --nproc_per_node 8 examples/pretrain_moe.py ...
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/megatron_sparkling
# megatron-core 0.16.1 (cp312 wheel), its undeclared run-time needs, and the plugin; the image's
# own torch build is kept (setup.py leaves torch unpinned).
RUN pip install --no-cache-dir "megatron-core==0.16.1" einops psutil tqdm wandb matplotlib
COPY setup.py README.md ./
COPY megatron_sparkling ./megatron_sparkling
COPY examples ./examples
COPY patches ./patches
COPY bench ./bench
RUN pip install --no-cache-dir --no-build-isolation -e . && \
    python -c "import megatron_sparkling, megatron.core; print('megatron_sparkling', megatron_sparkling.__version__, 'megatron-core', megatron.core.__version__)"
WORKDIR /opt/megatron_sparkling
