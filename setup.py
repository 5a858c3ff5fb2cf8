"""flare-kernels: fused NF4 + LoRA + FLARE fusion kernels and the FLARE method on Hugging Face models.

Install against the torch already in the environment (``pip install -e . --no-build-isolation``):
an unpinned torch in a fresh build environment would pull the several-GB CUDA build.
"""

from setuptools import find_packages, setup

TRAIN = [
    "transformers>=4.46",
    "peft>=0.13",
    "accelerate>=1.0",
    "datasets>=3.0",
    "bitsandbytes>=0.45",
    "safetensors>=0.4",
    "tqdm>=4.60",
]
TEST = ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"]
BENCH = ["matplotlib>=3.7", "pandas>=2.0"]

setup(
    name="flare-kernels",
    version="0.1.0",
    description="Fused Triton kernels for FLARE cross-lingual LoRA fusion over 4-bit NF4 weights",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flare_kernels", "flare_kernels.*", "flare", "flare.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
    ],
    extras_require={"train": TRAIN, "test": TEST + TRAIN, "bench": BENCH + TRAIN, "all": TEST + TRAIN + BENCH},
    entry_points={"console_scripts": ["flare=flare.cli:main"]},
    license="Apache-2.0",
)
