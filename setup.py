"""megatron-ratplus: RAT+ (recurrence-augmented attention) pretraining on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-ratplus",
    version="0.1.0",
    description="Train dense, infer sparse: RAT+ recurrence-augmented attention on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ratplus_kernels/. kernels/ itself has no __init__.py, so
    # it is never a regular package named "kernels" and cannot shadow the PyPI package of that
    # name (which transformers imports), whatever the current directory.
    packages=find_packages(include=["megatron_ratplus", "megatron_ratplus.*"])
    + find_packages("kernels", include=["ratplus_kernels", "ratplus_kernels.*"]),
    package_dir={"ratplus_kernels": "kernels/ratplus_kernels"},
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.16.1,<0.17",
        "triton>=3.6",  # the oldest the kernels target (the GPU image's); tested with the pinned one
        "tensorboard>=2.14",
        "numpy>=1.24",
        "psutil>=5.9",  # dist_checkpointing's writer needs it
        "pyyaml>=6.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],  # the range megatron-core 0.16.1 accepts
        "dali": ["nvidia-dali-cuda120>=1.40"],
        # rouge: LongBench's Rouge-L; wonderwords: RULER's word lists; fuzzywuzzy (dev only): the
        # reference LongBench's edit similarity is tested against
        "eval": ["lm-eval>=0.4,<0.5", "matplotlib>=3.7", "tokenizers>=0.15", "rouge==1.0.1",
                 "wonderwords==3.0.1"],
        "data": ["pyarrow>=14", "zstandard>=0.22", "sentencepiece>=0.2", "tokenizers>=0.15"],
        "hf": ["transformers>=4.57,<6", "safetensors>=0.4", "tokenizers>=0.15",
               "accelerate>=1.0"],  # lm-eval's `--model hf` imports accelerate
        "serve": ["fastapi>=0.163", "uvicorn>=0.54"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "matplotlib>=3.7", "tokenizers>=0.15",
                "pyarrow>=14", "zstandard>=0.22", "sentencepiece>=0.2", "transformers>=4.57,<6", "safetensors>=0.4",
                "accelerate>=1.0", "lm-eval>=0.4,<0.5", "fastapi>=0.163", "uvicorn>=0.54", "openai>=3.51",
                "rouge==1.0.1", "fuzzywuzzy==0.18.0", "wonderwords==3.0.1"],
    },
    entry_points={"console_scripts": [
        "ratplus-pretrain=megatron_ratplus.cli.pretrain:main",
        "ratplus-eval=megatron_ratplus.cli.eval:main",
        "ratplus-convert=megatron_ratplus.cli.convert:main",
        "ratplus-generate=megatron_ratplus.cli.generate:main",
        "ratplus-lm-eval=megatron_ratplus.cli.lm_eval_cli:main",
        "ratplus-serve=megatron_ratplus.cli.serve:main",
    ]},
)
