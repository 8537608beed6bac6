"""megatron_sparkling: grow a Mixture-of-Experts model between Megatron-LM pre-training stages."""
from setuptools import find_packages, setup

MEGATRON_LM = ["pybind11", "triton", "six", "regex"]

setup(
    name="megatron-sparkling",
    version="0.1.0",
    description="Mid-training width and depth growth of megatron-core MoE models "
                "(SPARKLING and baselines), as a Megatron-LM plugin",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_sparkling", "megatron_sparkling.*"]),
    install_requires=[
        # torch is left unpinned so the GPU image's own build is kept; requirements.txt pins
        # torch==2.13.0 for the CPU machines this project is developed and tested on.
        "torch>=2.4",
        "megatron-core==0.16.1",
        # megatron-core imports these at run time but does not declare them
        "einops",
        "psutil",  # without it the dist_checkpointing writer dies and save() hangs
        "numpy",
        "tqdm",
    ],
    extras_require={
        # Imported only when present; apex is built from NVIDIA's source (NGC images ship it).
        "gpu": ["transformer_engine[pytorch]"],
        "wandb": ["wandb"],
        "bench": ["matplotlib"],
        # What Megatron-LM's own pretrain_gpt.py needs beyond megatron-core on a plain machine
        # (megatron.training imports triton, six, regex; pybind11 builds its dataset helpers).
        "megatron-lm": MEGATRON_LM,
        "dev": ["pytest", "matplotlib", "wandb", *MEGATRON_LM],
    },
    entry_points={"console_scripts": ["megatron-sparkling=megatron_sparkling.cli:main"]},
)
