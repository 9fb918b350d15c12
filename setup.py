"""Packaging for tidpo.

The Triton kernels live in ``csrc_triton/`` in the repository and are installed as the
``tidpo.kernels`` sub-package (``package_dir`` mapping), so both an editable install and a built
wheel expose them as ``import tidpo.kernels`` (``tests/test_packaging.py`` proves the wheel case).
"""

from pathlib import Path

from setuptools import find_packages, setup

_PACKAGES = find_packages(include=["tidpo", "tidpo.*"])
_DEMO = ["gguf>=0.10", "matplotlib>=3.7", "pyyaml>=6"]
_DATA = ["datasets>=2.19"]

setup(
    name="tidpo",
    version="0.1.0",
    description="Token-weighted preference optimisation (TIS-DPO, TI-DPO, TDPO, DPO) with fused kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=_PACKAGES + ["tidpo.kernels"],
    package_dir={"tidpo.kernels": "csrc_triton"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.1",
        "transformers>=4.46",
        "peft>=0.13",
    ],
    extras_require={
        # The embedded default (SmolLM2 GGUF -> HF conversion, plots of the training run).
        "demo": _DEMO,
        # Datasets / Parquet input to the trainer (plain JSON/JSONL need nothing extra).
        "data": _DATA,
        # Benchmarks: plots (Liger-Kernel is an optional provider, installed by hand on CUDA machines).
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],
        # The peers the fused-head benchmarks compare against (each recorded as skipped when absent); neither
        # replaces torch.
        "peers": ["trl==1.16.0", "liger-kernel>=0.8"],
        # setuptools + wheel: tests/test_packaging.py builds the wheel without network build isolation.
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6", "hypothesis>=6", "setuptools>=70.1", "wheel",
                *_DEMO, *_DATA],
    },
    entry_points={"console_scripts": ["tidpo=tidpo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
