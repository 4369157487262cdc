"""Loading an upstream BEVFormer checkpoint (``bevformer_tiny_epoch_24.pth`` and the like) into our modules.

Our module tree uses the upstream names (``img_backbone`` = mmdet ResNet, ``img_neck`` = mmdet FPN, ``pts_bbox_head``
with mmcv ``BaseTransformerLayer`` children ``attentions`` / ``ffns`` / ``norms``), so the mapping is the identity
after unwrapping: the checkpoint may hold the weights under ``state_dict`` (mmcv's ``save_checkpoint``) or
``model``, and keys may carry a ``module.`` prefix from DataParallel. Keys the inference graph never reads
(optimizer state lives outside ``state_dict``) are reported, not loaded.
"""

from __future__ import annotations

import os

import torch

from qdqkit.errors import UserError


class CheckpointError(UserError):
    """The checkpoint file is missing, unreadable or does not fit the model."""


def _unwrap(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no tensor state_dict: pass an mmcv/PyTorch .pth of BEVFormer")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def map_upstream_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[dict, list[str], list[str]]:
    """Map an upstream state_dict onto ``model``: returns (mapped, missing keys, unused keys).

    Raises :class:`CheckpointError` on a shape mismatch, which means a different configuration (small/base).
    """
    own = model.state_dict()
    mapped, unused = {}, []
    for key, value in state.items():
        if key not in own:
            unused.append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}:"
                " is this a BEVFormer-tiny checkpoint?"
            )
        mapped[key] = value
    missing = [k for k in own if k not in mapped]
    return mapped, missing, unused


def load_upstream_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Load ``path`` into ``model`` in place; returns the checkpoint keys that were not used."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
    mapped, missing, unused = map_upstream_keys(_unwrap(obj), model)
    # BN batch counters are bookkeeping that older checkpoints lack; everything else must be present.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} model tensors ({shown})")
    model.load_state_dict(mapped, strict=False)
    return unused
