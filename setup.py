from setuptools import find_packages, setup

setup(
    name="megamobi",
    version="0.1.0",
    description="Megatron-style distributed pretraining for MobiLlama (one FFN shared by all layers)",
    python_requires=">=3.10",
    packages=find_packages(include=["megamobi", "megamobi.*"]),
    # Loose lower bounds for users; CI installs the exact pins in requirements/ci.txt.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "numpy>=1.24",
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "zstandard>=0.22",
        "msgspec>=0.18",  # the Amber line parser's fast path
        "python-hostlist>=2.0",  # SLURM host lists in megamobi.launcher
    ],
    extras_require={
        "convert": ["transformers>=4.45", "gguf>=0.10", "protobuf>=4"],
        "eval": ["lm-eval>=0.4.5,<0.5", "accelerate>=0.26", "transformers>=4.45", "protobuf>=4"],
        "plot": ["matplotlib>=3.7"],
        "logging": ["wandb>=0.17", "tensorboard>=2.15"],
        "test": ["pytest>=8", "transformers>=4.45", "gguf>=0.10", "protobuf>=4", "megatron-core>=0.12",
                 "lm-eval>=0.4.5,<0.5", "accelerate>=0.26", "matplotlib>=3.7", "orjson>=3.9"],
        # The CPU tests also run liger-kernel under Triton's interpreter: requirements/triton-interpreter.txt
        # pins triton + liger-kernel for that (installed --no-deps; not here, since a CUDA torch pins its own triton).
        # GPU-only speed-ups, imported when present: never required.
        "gpu": ["flash-attn>=2.5", "liger-kernel>=0.8"],
    },
)
