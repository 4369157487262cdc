"""A test plugin: a custom op with a spec (schema, shapes) but no CPU implementation."""

from qdqkit.customops import CustomOpSpec, IOSpec, TensorInfo
from qdqkit.hookspecs import hookimpl

NO_KERNEL = CustomOpSpec(
    op_type="NoKernelScaleTRT",
    inputs=(IOSpec("x", ("tensor(float)",)),),
    outputs=(IOSpec("y", ("tensor(float)",)),),
    infer=lambda ins, attrs: [ins[0] if ins[0] is not None else TensorInfo(1, None)],
    doc="y = 2x, implemented only as a TensorRT plugin",
)


@hookimpl
def qdqkit_register_custom_ops(registry):
    registry.add(NO_KERNEL)
