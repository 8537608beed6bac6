# megatron_sparkling on NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine and apex
# come with the image). Build:  docker build -t megatron-sparkling .
# Run a stage:  docker run --gpus all --ipc=host -v $PWD:/workspace/run megatron-sparkling \
#     torchrun --nproc_per_node 8 examples/pretrain_moe.py ...
# The image also holds Megatron-LM (core_v0.16.1) with patches/ applied, at /opt/Megatron-LM.
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
RUN pip install --no-cache-dir --no-build-isolation -e ".[wandb]" && \
    python -c "import megatron_sparkling, megatron.core; print('megatron_sparkling', megatron_sparkling.__version__, 'megatron-core', megatron.core.__version__)"

# Megatron-LM's pretrain_gpt.py with the growth-on-load hook (patches/README.md): the checkout of
# the pinned tag, patched. Skip with --build-arg MEGATRON_LM_REF= (empty).
# Run a stage:  cd /opt/Megatron-LM && torchrun ... pretrain_gpt.py ... --sparkling-method sparkling
ARG MEGATRON_LM_REF=core_v0.16.1
RUN if [ -n "${MEGATRON_LM_REF}" ]; then \
        git clone --depth 1 --branch "${MEGATRON_LM_REF}" https://github.com/NVIDIA/Megatron-LM.git /opt/Megatron-LM && \
        cd /opt/Megatron-LM && \
        git apply --check /opt/megatron_sparkling/patches/megatron-lm-core_v0.16.1-sparkling.patch && \
        git apply /opt/megatron_sparkling/patches/megatron-lm-core_v0.16.1-sparkling.patch; \
    fi
ENV MEGATRON_LM_DIR=/opt/Megatron-LM
WORKDIR /opt/megatron_sparkling
