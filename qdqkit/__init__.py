"""qdqkit: plugin-based ONNX graph passes that take plugin-laden models to TensorRT-ready INT8 Q/DQ form.

The core (this package) knows no specific op or model: passes, custom ops, recipes, exclusion patterns and
quantization back ends all arrive through the ``qdqkit`` entry-point group (see ``qdqkit.hookspecs``).
"""

__version__ = "0.1.0"
