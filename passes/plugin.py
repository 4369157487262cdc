"""The built-in passes and recipes, registered through the entry-point group like any third-party plugin."""

from __future__ import annotations

from qdqkit.hookspecs import hookimpl
from qdqkit.pipeline import Recipe, Step

from .check import CheckPass
from .detect_custom_ops import DetectCustomOpsPass
from .fp16 import Fp16Pass
from .infer_shapes import InferShapesPass
from .simplify import SimplifyPass
from .trt_plugin_domain import TrtPluginDomainPass
from .qdq import QdqPass
from .validate import ValidatePass


@hookimpl
def qdqkit_register_passes(registry):
    for pass_cls in (DetectCustomOpsPass, TrtPluginDomainPass, InferShapesPass, SimplifyPass, CheckPass,
                     QdqPass, Fp16Pass, ValidatePass):
        registry.add(pass_cls)


@hookimpl
def qdqkit_register_recipes(registry):
    registry.add(Recipe(
        "default",
        "custom ops found and moved to trt.plugins, every tensor shaped; with --calib also Q/DQ and validation",
        [Step("detect-custom-ops"), Step("trt-plugin-domain"), Step("infer-shapes"),
         Step("qdq", when="calib"), Step("validate", when="calib")],
    ))
    registry.add(Recipe(
        "structural",
        "detect custom ops, move them to trt.plugins, simplify, infer shapes, check",
        [Step("detect-custom-ops"), Step("trt-plugin-domain"), Step("simplify"), Step("infer-shapes"),
         Step("check")],
    ))


@hookimpl
def qdqkit_register_rules(registry):
    registry.add_builtins()  # "mha" and "layernorm", see qdqkit.patterns


@hookimpl
def qdqkit_register_quant_backends(registry):
    registry.add_builtins()  # "modelopt" (default) and "ort", see qdqkit.quant_backends
