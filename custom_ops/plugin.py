"""The ``bevformer-ops`` qdqkit plugin: registers BEVFormer's TensorRT plugin ops, the same way a third party would."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qdqkit.hookspecs import hookimpl

if TYPE_CHECKING:
    from qdqkit.customops import CustomOpRegistry


@hookimpl
def qdqkit_register_custom_ops(registry: CustomOpRegistry) -> None:
    """Add the specs of MultiScaleDeformableAttnTRT(2), RotateTRT(2), ModulatedDeformableConv2dTRT(2) and
    GridSampler2DTRT(2)."""
    from .specs import SPECS

    for spec in SPECS:
        registry.add(spec)
