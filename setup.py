"""nca_kernels: fused LM-head log-probs and InfoNCA/NCA/DPO losses.

The CUDA extension (csrc/) is built only when a CUDA build of torch and nvcc are present;
otherwise the package installs without it and ``backend="cuda"`` explains how to build it.
"""

import glob
import os

from setuptools import find_packages, setup

#: GPU architectures of the prebuilt kernels (Ampere, Ada, Hopper; PTX for newer ones) unless
#: TORCH_CUDA_ARCH_LIST says otherwise.
CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def cuda_extension():
    """``(ext_modules, cmdclass)`` for nca_kernels._C, or empty ones without a CUDA torch and nvcc."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:  # isolated build environment or no torch yet
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
    ext = CUDAExtension(
        "nca_kernels._C",
        sources=sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = cuda_extension()

EXTRAS = {
    "triton": ["triton>=3.0"],
    "train": ["transformers>=5.0", "datasets>=2.19", "accelerate>=1.0", "matplotlib>=3.7"],
    "bench": ["matplotlib>=3.7", "pytest-benchmark>=4.0", "liger-kernel>=0.5", "cut-cross-entropy>=25.1", "trl>=1.16"],
    "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "peft>=0.13"],
}
EXTRAS["dev"] = sorted({r for k in ("triton", "train", "test") for r in EXTRAS[k]})

setup(
    name="nca_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA/PyTorch kernels for InfoNCA, NCA and DPO preference alignment",
    packages=find_packages(include=["nca_kernels", "nca_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    entry_points={"console_scripts": ["nca-train=nca_kernels.train:main"]},
)
