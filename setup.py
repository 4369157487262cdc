"""Packaging for qdqkit.

The repository keeps the core (qdqkit/), the built-in passes (passes/), BEVFormer's custom ops (custom_ops/)
and the bundled example (examples/) side by side; they install as one namespace so that nothing generic
(`passes`, `custom_ops`) lands at the top level of site-packages.
"""

from setuptools import Extension, setup

PACKAGE_DIR = {
    "qdqkit": "qdqkit",
    "qdqkit.passes": "passes",
    "qdqkit.custom_ops": "custom_ops",
    "qdqkit.custom_ops.cuda": "custom_ops/cuda",
    "qdqkit.examples": "examples",
    "qdqkit.examples.bevformer": "examples/bevformer",
}

setup(
    name="qdqkit",
    version="0.1.0",
    description="Plugin-based ONNX graph passes for shipping plugin-laden models to TensorRT with INT8 Q/DQ",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    # patch 6's compiled histogram passes (qdqkit/modelopt_compat.py); optional: without a C compiler the
    # install goes on and the patch runs its numpy code. IEEE arithmetic as numpy's: no FMA contraction.
    ext_modules=[Extension("qdqkit._histogram", ["qdqkit/_histogram.c"], optional=True,
                           extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"])],
    package_data={"qdqkit.custom_ops": ["cuda/*.cu", "cuda/*.cuh", "cuda/*.h"]},
    install_requires=[
        "numpy",
        "onnx",
        "onnx-graphsurgeon",
        "onnxsim",
        "pluggy>=1.3",
        "networkx",
        "onnxruntime-extensions",  # runs custom ops that have only a Python kernel
        "nvidia-modelopt[onnx]",
        'tomli; python_version < "3.11"',  # pipeline TOML files (tomllib is in the standard library from 3.11)
        # onnxruntime itself arrives with nvidia-modelopt[onnx] (the onnxruntime-gpu build, which also runs on the CPU).
    ],
    extras_require={
        "example": ["torch"],
        "test": ["pytest", "torch"],
        "trt": ["tensorrt"],
    },
    entry_points={
        "console_scripts": ["qdqkit = qdqkit.cli:main"],
        "qdqkit": [
            "builtin-passes = qdqkit.passes.plugin",
            "bevformer-ops = qdqkit.custom_ops.plugin",
            "bevformer-example = qdqkit.examples.bevformer.plugin",
        ],
    },
)
