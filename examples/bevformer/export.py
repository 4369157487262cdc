"""Export BEVFormer to ONNX with the upstream TensorRT-plugin interface, cached on disk.

The graph matches ``tools/pth2onnx.py ... --opset=13 --flag=cp2_op13`` as exported in the DL4AGX flow: opset 13,
static shapes, constant folding on, initializers not listed as inputs, autograd inlining off; inputs ``image``, ``prev_bev``,
``use_prev_bev``, ``can_bus``, ``lidar2img``; outputs ``bev_embed``, ``outputs_classes``, ``outputs_coords``;
12 ``MultiScaleDeformableAttnTRT2`` and 1 ``RotateTRT2`` in the default domain (``variant=1`` gives the ``cp`` names
without the "2").

A second export with the same configuration, seed, variant and checkpoint reuses the cached file. The cache lives
in ``$QDQKIT_CACHE/bevformer`` (default ``~/.cache/qdqkit/bevformer``) unless an output folder is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qdqkit.errors import UserError

from .model import TINY, BEVFormer, BEVFormerConfig, build_model

OPSET = 13
# Bump when the model code changes in a way that changes the exported graph, so stale caches are not reused.
GRAPH_VERSION = 5
# Bump when the seeded initialisation changes.
WEIGHTS_VERSION = 3


def cache_root() -> Path:
    """Folder that holds cached exports and calibration data."""
    base = os.environ.get("QDQKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qdqkit")
    return Path(base) / "bevformer"


def _checkpoint_id(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint not found: {checkpoint}")
    st = os.stat(checkpoint)
    return f"{os.path.abspath(checkpoint)}:{st.st_size}:{int(st.st_mtime)}"


def export_key(cfg: BEVFormerConfig, seed: int, variant: int, checkpoint: str | None) -> dict:
    """Everything that determines the exported file."""
    return {
        "config": cfg.as_dict(),
        "seed": None if checkpoint else seed,
        "variant": variant,
        "checkpoint": _checkpoint_id(checkpoint),
        "opset": OPSET,
        "graph_version": GRAPH_VERSION,
        "weights_version": None if checkpoint else WEIGHTS_VERSION,
        "torch": torch.__version__.split("+")[0],
    }


def file_stem(cfg: BEVFormerConfig, variant: int) -> str:
    """Upstream file naming: ``bevformer_tiny_cp2_op13`` / ``bevformer_tiny_cp_op13``."""
    return f"bevformer_{cfg.name}_cp{'2' if variant == 2 else ''}_op{OPSET}"


@dataclass
class Exported:
    """Where an export lives and how it was obtained."""

    onnx_path: Path
    weights_path: Path
    folder: Path
    cached: bool
    seconds: float
    key: dict

    def load_model(self) -> BEVFormer:
        """The PyTorch model the file was exported from (weights from the cache, eval mode)."""
        cfg = BEVFormerConfig(**{**self.key["config"], "pc_range": tuple(self.key["config"]["pc_range"]),
                                 "rotate_center": tuple(self.key["config"]["rotate_center"])})
        model = BEVFormer(cfg)
        model.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        model.set_variant(self.key["variant"])
        return model.eval()


def export(cfg: BEVFormerConfig = TINY, seed: int = 0, variant: int = 2, checkpoint: str | None = None,
           out_dir: str | os.PathLike | None = None, force: bool = False, log=print) -> Exported:
    """Export (or reuse the cached export of) BEVFormer; returns where the ONNX file and the weights are."""
    if variant not in (1, 2):
        raise UserError(f"--variant must be 1 (cp: *TRT ops) or 2 (cp2: *TRT2 ops), got {variant}")
    key = json.loads(json.dumps(export_key(cfg, seed, variant, checkpoint)))  # tuples -> lists, as stored
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(out_dir) if out_dir is not None else cache_root() / f"{file_stem(cfg, variant)}-{digest}"
    onnx_path = folder / f"{file_stem(cfg, variant)}.onnx"
    weights_path = folder / "weights.pt"
    meta_path = folder / "export.json"
    if not force and onnx_path.exists() and weights_path.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                return Exported(onnx_path, weights_path, folder, True, 0.0, key)
        except (OSError, json.JSONDecodeError):
            pass
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    log(f"building BEVFormer-{cfg.name} ({'checkpoint ' + checkpoint if checkpoint else f'seeded weights, seed {seed}'})")
    model = build_model(cfg, seed=seed, checkpoint=checkpoint)
    model.set_variant(variant)
    log(f"exporting ONNX opset {OPSET} to {onnx_path}")
    _export_onnx(model, onnx_path)
    _atomic_torch_save(model.state_dict(), weights_path)
    seconds = time.perf_counter() - t0
    meta_path.write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}, indent=1))
    return Exported(onnx_path, weights_path, folder, False, seconds, key)


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _export_onnx(model: BEVFormer, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about every traced shape expression; none of them matters here
            # because all shapes are static.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                model.example_inputs(),
                tmp,
                input_names=list(model.input_names),
                output_names=list(model.output_names),
                opset_version=OPSET,
                do_constant_folding=True,
                keep_initializers_as_inputs=False,
                # As the DL4AGX export does: with inlining on, the exporter traces into the custom ops' Python
                # forward and its peephole pass fails on it; off, each op stays one node from its symbolic.
                autograd_inlining=False,
                dynamo=False,
            )
        _set_output_shapes(tmp, model)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _set_output_shapes(path: str, model: BEVFormer) -> None:
    """Give the graph outputs their static shapes: the exporter cannot see through the custom ops."""
    import onnx

    cfg = model.cfg
    shapes = {
        "bev_embed": [cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims],
        "outputs_classes": [cfg.dec_layers, 1, cfg.num_query, cfg.num_classes],
        "outputs_coords": [cfg.dec_layers, 1, cfg.num_query, cfg.code_size],
    }
    m = onnx.load(path)
    for out in m.graph.output:
        tt = out.type.tensor_type
        tt.elem_type = onnx.TensorProto.FLOAT
        tt.ClearField("shape")
        for d in shapes[out.name]:
            tt.shape.dim.add().dim_value = d
    onnx.save(m, path)
