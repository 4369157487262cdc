"""BEVFormer-tiny example: the model (``model``), seeded weights (``weights``), upstream checkpoints
(``checkpoint``), the ONNX export (``export``), synthetic temporal data (``data``, ``calib``) and the qdqkit plugin
with the two recipes (``plugin``). Command line: ``python -m qdqkit.examples.bevformer {export,calib,demo}``.
"""
