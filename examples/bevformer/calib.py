"""The ``bevformer:`` calibration source: synthetic temporal sequences, generated once and cached on disk.

Spec grammar (comma-separated ``key=value`` after ``bevformer:``, all optional)::

    bevformer:frames=16,seed=0,scene_len=40,weights_seed=0
    bevformer:frames=16,checkpoint=/path/bevformer_tiny_epoch_24.pth
    bevformer:dir=/path/to/folder          (a folder written by ``python -m qdqkit.examples.bevformer calib``)

``frames`` is the number of samples (calibration and validation take consecutive ranges of them), ``seed`` seeds
the scenes and the camera rig, ``scene_len`` is the number of frames per scene (``use_prev_bev`` is 0 on each
scene's first frame), and ``prev_bev`` is rolled through BEVFormer built with ``weights_seed`` (the seed of the
exported model) or ``checkpoint``, so it matches the exported model of the same seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from qdqkit.calib import CalibrationSource
from qdqkit.errors import UserError

from . import data as D
from .model import TINY, BEVFormerConfig

PREFIX = "bevformer:"
_KEYS = {"frames": int, "seed": int, "scene_len": int, "weights_seed": int, "checkpoint": str, "dir": str}


def parse_spec(spec: str) -> dict:
    """``bevformer:k=v,...`` -> dict with defaults filled in; UserError on a malformed spec."""
    body = spec[len(PREFIX):].strip()
    out: dict = {"frames": 16, "seed": 0, "scene_len": 40, "weights_seed": 0, "checkpoint": None, "dir": None}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise UserError(
                f"bad calibration spec '{spec}': '{part}' is not one of {', '.join(k + '=' for k in _KEYS)}"
                " (example: bevformer:frames=16,seed=0)"
            )
        try:
            out[key] = _KEYS[key](value.strip())
        except ValueError:
            raise UserError(f"bad calibration spec '{spec}': {key} must be an integer, got '{value}'") from None
    if out["frames"] < 1 or out["scene_len"] < 1:
        raise UserError(f"bad calibration spec '{spec}': frames and scene_len must be at least 1")
    return out


def check_interface(inputs: dict, cfg: BEVFormerConfig = TINY) -> None:
    """UserError unless the model has BEVFormer's five inputs with the expected shapes."""
    expected = {
        "image": (1, cfg.num_cams, 3, cfg.img_h, cfg.img_w),
        "prev_bev": (cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims),
        "use_prev_bev": (1,),
        "can_bus": (18,),
        "lidar2img": (1, cfg.num_cams, 4, 4),
    }
    got = {k: tuple(v[1]) for k, v in inputs.items()}
    if set(got) != set(expected) or any(
        len(got[k]) != len(s) or any(a not in (b, -1) for a, b in zip(got[k], s)) for k, s in expected.items()
    ):
        raise UserError(
            "the bevformer: calibration source fits only the BEVFormer-tiny interface "
            f"({', '.join(f'{k}{list(s)}' for k, s in expected.items())}); this model has "
            f"{', '.join(f'{k}{list(s)}' for k, s in got.items()) or 'no inputs'}"
        )


def data_folder(opts: dict, cfg: BEVFormerConfig = TINY) -> Path:
    """Cache folder for the data a spec describes."""
    from .export import cache_root, export_key

    key = {k: opts[k] for k in ("frames", "seed", "scene_len")}
    key["model"] = export_key(cfg, opts["weights_seed"], 2, opts["checkpoint"])
    key["data_version"] = 1
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / "calib" / f"frames{opts['frames']}-seed{opts['seed']}-{digest}"


def generate(opts: dict, folder: Path | None = None, npz: Path | None = None, log=print,
             cfg: BEVFormerConfig = TINY) -> Path:
    """Generate the sequence a spec describes (unless cached), write the folder (and optionally an npz)."""
    folder = folder or data_folder(opts, cfg)
    if (folder / "meta.json").exists() and all((folder / f"{k}.npy").exists() for k in D.INPUT_NAMES):
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("frames") == opts["frames"] and meta.get("spec") == _spec_meta(opts):
            if npz is not None:
                D.save_npz(D.load_folder(folder), npz)
            return folder
    from .export import export

    exported = export(cfg, seed=opts["weights_seed"], checkpoint=opts["checkpoint"], log=log)
    bev_fn = D.onnx_bev_fn(exported.onnx_path)
    t0 = time.perf_counter()
    log(f"generating {opts['frames']} synthetic frames (seed {opts['seed']}), rolling prev_bev through the model")

    def progress(i):
        if (i + 1) % 4 == 0 or i + 1 == opts["frames"]:
            log(f"  frame {i + 1}/{opts['frames']}  ({time.perf_counter() - t0:.0f} s)")

    arrays = D.generate_sequence(opts["frames"], bev_fn, cfg, seed=opts["seed"],
                                 scene_len=opts["scene_len"], progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    D.save_folder(arrays, folder, meta={"spec": _spec_meta(opts), "seconds": round(time.perf_counter() - t0, 1)})
    if npz is not None:
        D.save_npz(arrays, npz)
    return folder


def _spec_meta(opts: dict) -> dict:
    return {k: opts[k] for k in ("frames", "seed", "scene_len", "weights_seed", "checkpoint")}


class BEVFormerSource(CalibrationSource):
    """Samples of a generated (or given) folder, memory-mapped; each sample is one frame of the sequence."""

    def __init__(self, folder: Path, description: str):
        self.folder = folder
        self.arrays = D.load_folder(folder)
        self.frames = int(self.arrays["image"].shape[0])
        self.names = list(D.INPUT_NAMES)
        self.description = description

    def __len__(self) -> int:
        return self.frames

    def sample(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.frames:
            raise IndexError(i)
        return D.split_sample(self.arrays, i, self.frames)

    def describe(self) -> str:
        return f"{self.description} ({self.frames} frames, {self.folder})"


def source_from_spec(spec: str, inputs: dict) -> BEVFormerSource:
    """Build the source a ``bevformer:`` spec names (generating and caching the data on first use)."""
    opts = parse_spec(spec)
    check_interface(inputs)
    if opts["dir"] is not None:
        folder = Path(opts["dir"])
        missing = [k for k in D.INPUT_NAMES if not (folder / f"{k}.npy").exists()]
        if missing:
            raise UserError(f"{folder} is not a bevformer data folder: it lacks {', '.join(m + '.npy' for m in missing)}")
        return BEVFormerSource(folder, "bevformer synthetic sequence")
    return BEVFormerSource(generate(opts), f"bevformer synthetic sequence, seed {opts['seed']}")
