"""BEVFormer's TensorRT plugin ops for qdqkit, registered as the ``bevformer-ops`` plugin.

MultiScaleDeformableAttnTRT(2), RotateTRT(2), ModulatedDeformableConv2dTRT(2) and GridSampler2DTRT(2):

- ``specs``: the ``CustomOpSpec`` of each (inputs, attributes, shape function, TensorRT plugin and formats);
- ``reference``: numpy references written for clarity (float64);
- ``functions``: the maths as ONNX functions of standard ops, the CPU implementation onnxruntime runs;
- ``torch_ops``: autograd Functions that compute the ops in plain PyTorch and export the upstream nodes;
- ``cuda``: CUDA kernels used by ``torch_ops`` for CUDA tensors;
- ``plugin``: the ``qdqkit_register_custom_ops`` hook.

Importing the package imports nothing heavy; torch is needed by ``torch_ops`` only.
"""
