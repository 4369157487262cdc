"""Synthetic but realistic temporal input sequences for BEVFormer calibration and validation.

What is mimicked (from the DL4AGX ``calib_data_prep.py`` flow on nuScenes train frames):

* scenes of consecutive 2 Hz keyframes with plausible ego motion; ``can_bus`` holds the absolute pose, accel,
  rotation rate, velocity and yaw, with the host-side deltas applied (``[0:3]`` and ``[17]`` become the change since
  the previous frame, both zero at a scene start, no +-360 wrap handling, as upstream);
* ``use_prev_bev`` is 0 on the first frame of a scene and 1 afterwards;
* a nuScenes-like 6-camera rig (CAM_FRONT, FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT) whose
  ``lidar2img`` is ``diag(0.5, 0.5, 1, 1) @ K @ lidar2cam`` (the 0.5 resize folded in);
* images normalised with the ImageNet mean/std used upstream, with low-frequency structure (sky, ground, objects,
  texture) that drifts from frame to frame, and padded rows 450..479 exactly zero;
* ``prev_bev`` rolled through the model itself: each frame gets the previous frame's ``bev_embed``; the very first
  frame gets N(0, 1) noise (it is gated out by ``use_prev_bev = 0`` anyway).

Two on-disk layouts: the original ``.npz`` (every input concatenated along axis 0, as ModelOpt's data provider
splits it) and a folder with one ``.npy`` per input in the same layout, which loads memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .model import TINY, BEVFormerConfig

INPUT_NAMES = ("image", "prev_bev", "use_prev_bev", "can_bus", "lidar2img")
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)

# Camera heading in the LiDAR frame (x right, y forward, z up), counter-clockwise from forward, degrees;
# focal length for the 1600x900 raw image; mounting offset (forward, left) in metres.
RIG = (
    ("CAM_FRONT", 0.0, 1266.0, (1.50, 0.00)),
    ("CAM_FRONT_RIGHT", -55.0, 1260.0, (1.30, -0.50)),
    ("CAM_FRONT_LEFT", 55.0, 1272.0, (1.30, 0.50)),
    ("CAM_BACK", 180.0, 809.0, (-0.50, 0.00)),
    ("CAM_BACK_LEFT", 110.0, 1256.0, (0.30, 0.70)),
    ("CAM_BACK_RIGHT", -110.0, 1259.0, (0.30, -0.70)),
)


def camera_rig(cfg: BEVFormerConfig = TINY, seed: int = 0) -> np.ndarray:
    """``lidar2img`` [1, cams, 4, 4] float32 for a nuScenes-like rig, with the 0.5 resize folded in.

    Each camera gets a small seeded pitch/roll/height jitter, as real calibrations differ from car to car.
    """
    rng = np.random.default_rng(seed)
    mats = []
    for i in range(cfg.num_cams):
        _, yaw_deg, focal, (fwd, left) = RIG[i % len(RIG)]
        yaw = math.radians(yaw_deg)
        pitch = math.radians(rng.normal(0.0, 0.8))
        f = np.array([-math.sin(yaw), math.cos(yaw), math.sin(pitch)])
        f /= np.linalg.norm(f)
        right = np.cross(f, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(f, right)
        rot = np.stack([right, down, f])  # rows: camera x (right), y (down), z (forward) in LiDAR coordinates
        centre = np.array([-left, fwd, -0.35 + rng.normal(0.0, 0.03)])
        l2c = np.eye(4)
        l2c[:3, :3] = rot
        l2c[:3, 3] = -rot @ centre
        k = np.eye(4)
        k[0, 0] = k[1, 1] = focal
        k[0, 2] = 800.0 + rng.normal(0.0, 10.0)
        k[1, 2] = 450.0 + rng.normal(0.0, 10.0)
        mats.append(np.diag([0.5, 0.5, 1.0, 1.0]) @ k @ l2c)
    return np.stack(mats)[None].astype(np.float32)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], h: int, w: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid bilinearly upsampled to (h, w)."""
    g = rng.standard_normal(shape)
    ys = np.linspace(0, shape[0] - 1, h)
    xs = np.linspace(0, shape[1] - 1, w)
    y0 = np.floor(ys).astype(int).clip(0, shape[0] - 2)
    x0 = np.floor(xs).astype(int).clip(0, shape[1] - 2)
    ly = (ys - y0)[:, None]
    lx = (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - ly) * (1 - lx) + b * (1 - ly) * lx + c * ly * (1 - lx) + d * ly * lx).astype(np.float32)


def _pink(rng: np.random.Generator, h: int, w: int, beta: float = 2.0) -> np.ndarray:
    """Noise with the 1/f^beta power spectrum of natural images (beta about 2), unit standard deviation."""
    spec = np.fft.rfft2(rng.standard_normal((h, w)))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    out = np.fft.irfft2(spec / f ** (beta / 2), s=(h, w))
    out -= out.mean()
    return (out / out.std()).astype(np.float32)


@dataclass
class _Object:
    x: float
    y: float
    w: float
    h: float
    colour: np.ndarray
    vx: float


class SceneGenerator:
    """Deterministic source of scenes: ``frame(scene, t)`` gives every input except ``prev_bev``.

    Content depends only on (seed, scene, t), so any frame can be regenerated without the ones before it.
    """

    def __init__(self, cfg: BEVFormerConfig = TINY, seed: int = 0, scene_len: int = 40, texture: float = 30.0):
        self.cfg = cfg
        self.texture = texture
        self.seed = seed
        self.scene_len = scene_len
        self.lidar2img = camera_rig(cfg, seed)

    # ---- ego motion ---------------------------------------------------------------------------------------------
    def _trajectory(self, scene: int, upto: int) -> list[dict]:
        rng = np.random.default_rng((self.seed, scene, 1))
        pos = np.array([rng.uniform(300, 2000), rng.uniform(300, 2000), 0.0])
        yaw = rng.uniform(0, 2 * math.pi)
        speed = rng.uniform(0.0, 12.0)
        out = []
        dt = 0.5
        for _ in range(upto + 1):
            accel = float(np.clip(rng.normal(0.0, 0.8), -3, 3))
            yaw_rate = float(rng.normal(0.0, 0.05))
            speed = float(np.clip(speed + accel * dt, 0.0, 16.0))
            out.append(dict(pos=pos.copy(), yaw=yaw % (2 * math.pi), speed=speed, accel=accel, yaw_rate=yaw_rate))
            yaw += yaw_rate * dt
            pos = pos + speed * dt * np.array([math.cos(yaw), math.sin(yaw), 0.0])
            pos[2] = rng.normal(0.0, 0.02)
        return out

    def can_bus(self, scene: int, t: int) -> np.ndarray:
        """The 18-vector the host feeds for frame t of a scene (deltas applied)."""
        traj = self._trajectory(scene, t)
        cur = traj[t]
        cb = np.zeros(18, dtype=np.float64)
        cb[0:3] = cur["pos"]
        half = cur["yaw"] / 2
        cb[3:7] = [math.cos(half), 0.0, 0.0, math.sin(half)]
        cb[7:10] = [cur["accel"], np.random.default_rng((self.seed, scene, t, 7)).normal(0, 0.3), 9.80]
        cb[10:13] = [0.0, 0.0, cur["yaw_rate"]]
        cb[13:16] = [cur["speed"], 0.0, 0.0]
        cb[16] = cur["yaw"]
        cb[17] = math.degrees(cur["yaw"])
        if t == 0:
            cb[0:3] = 0.0
            cb[17] = 0.0
        else:
            prev = traj[t - 1]
            cb[0:3] -= prev["pos"]
            cb[17] -= math.degrees(prev["yaw"])  # no wrap handling, as upstream
        return cb.astype(np.float32)

    # ---- images -------------------------------------------------------------------------------------------------
    def frame_images(self, scene: int, t: int) -> np.ndarray:
        """Normalised images [1, cams, 3, H, W]: structured content drifting with t, padded rows zero."""
        cfg = self.cfg
        h_img = min(cfg.img_h, int(round(cfg.img_w * 450 / 800)))
        out = np.zeros((cfg.num_cams, 3, cfg.img_h, cfg.img_w), dtype=np.float32)
        for cam in range(cfg.num_cams):
            out[cam, :, :h_img] = self._camera_image(scene, t, cam, h_img, cfg.img_w)
        return out[None]

    def _camera_image(self, scene: int, t: int, cam: int, h: int, w: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, scene, cam, 2))
        horizon = int(h * rng.uniform(0.40, 0.55))
        sky_top = rng.uniform([90, 130, 180], [160, 190, 245])
        sky_bot = rng.uniform([170, 180, 190], [230, 230, 240])
        ground = rng.uniform([60, 60, 60], [130, 125, 115])
        rows = np.linspace(0, 1, horizon)[:, None]
        img = np.empty((h, w, 3), dtype=np.float32)
        img[:horizon] = (sky_top * (1 - rows) + sky_bot * rows)[:, None, :]
        depth = np.linspace(0.2, 1.0, h - horizon)[:, None, None]
        img[horizon:] = ground * (0.7 + 0.3 * depth)
        # Buildings and vehicles: boxes that slide sideways as the ego moves.
        objs = [
            _Object(rng.uniform(0, w), horizon - rng.uniform(10, 0.35 * h), rng.uniform(40, 220),
                    rng.uniform(30, 0.35 * h), rng.uniform(20, 235, 3), rng.normal(0, 6))
            for _ in range(rng.integers(6, 14))
        ]
        objs += [
            _Object(rng.uniform(0, w), horizon + rng.uniform(0, 0.3 * h), rng.uniform(30, 160),
                    rng.uniform(20, 80), rng.uniform(10, 250, 3), rng.normal(0, 12))
            for _ in range(rng.integers(2, 8))
        ]
        for o in objs:
            x0 = int((o.x + o.vx * t) % (w + 200)) - 100
            y0 = int(o.y)
            x1, y1 = max(x0, 0), max(y0, 0)
            x2, y2 = min(x0 + int(o.w), w), min(y0 + int(o.h), h)
            if x2 > x1 and y2 > y1:
                shade = np.linspace(1.0, 0.75, y2 - y1)[:, None, None]
                img[y1:y2, x1:x2] = o.colour * shade
        # Lane markings on the ground.
        for k in range(rng.integers(1, 4)):
            slope = rng.uniform(-2.5, 2.5)
            x_base = rng.uniform(0.2, 0.8) * w
            ys = np.arange(horizon, h)
            xs = (x_base + slope * (ys - horizon) + 3 * t * slope).astype(int)
            ok = (xs >= 2) & (xs < w - 2)
            for dx in range(-2, 3):
                img[ys[ok], xs[ok] + dx] = 230.0
        # Lighting and texture: low-frequency illumination, mid-frequency texture, a little sensor noise.
        # Natural images carry texture at every scale (a 1/f^2 power spectrum); flat synthetic regions would make
        # the backbone's activations far more heavy-tailed than real ones, and calibration figures unrealistic.
        # The texture is mostly static in the scene and drifts a little from frame to frame.
        frng = np.random.default_rng((self.seed, scene, cam, t, 3))
        light = 1.0 + 0.15 * _smooth(rng, (4, 6), h, w)[..., None]
        lum = _pink(np.random.default_rng((self.seed, scene, cam, 4)), h, w)
        lum = np.roll(lum, 2 * t, axis=1) + 0.3 * _pink(frng, h, w)
        chroma = _pink(np.random.default_rng((self.seed, scene, cam, 5)), h, w)
        texture = self.texture * (lum[..., None] + 0.25 * chroma[..., None] * np.array([1.0, -0.5, -0.5]))
        img = img * light + texture + frng.normal(0, 3.0, (h, w, 1)).astype(np.float32)
        img = np.clip(img, 0, 255)
        img = (img - MEAN) / STD
        return img.transpose(2, 0, 1)

    # ---- sequences ----------------------------------------------------------------------------------------------
    def frame_index(self, i: int) -> tuple[int, int]:
        """Sample i of the stream -> (scene, t)."""
        return divmod(i, self.scene_len)

    def inputs(self, i: int) -> dict[str, np.ndarray]:
        """Inputs of sample i except ``prev_bev``."""
        scene, t = self.frame_index(i)
        return {
            "image": self.frame_images(scene, t),
            "use_prev_bev": np.array([0.0 if t == 0 else 1.0], dtype=np.float32),
            "can_bus": self.can_bus(scene, t),
            "lidar2img": self.lidar2img.copy(),
        }


BevFn = Callable[[dict[str, np.ndarray]], np.ndarray]


def generate_sequence(frames: int, bev_fn: BevFn, cfg: BEVFormerConfig = TINY, seed: int = 0,
                      scene_len: int = 40, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Roll ``frames`` samples through ``bev_fn`` (inputs -> bev_embed) and return the concatenated arrays."""
    gen = SceneGenerator(cfg, seed=seed, scene_len=scene_len)
    rng = np.random.default_rng((seed, 99))
    prev = rng.standard_normal((cfg.bev_h * cfg.bev_w, 1, cfg.embed_dims)).astype(np.float32)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in INPUT_NAMES}
    for i in range(frames):
        sample = gen.inputs(i)
        sample["prev_bev"] = prev
        for k in INPUT_NAMES:
            cols[k].append(sample[k])
        prev = np.asarray(bev_fn(sample), dtype=np.float32).reshape(prev.shape)
        if progress is not None:
            progress(i)
    return {k: np.concatenate(v, 0) for k, v in cols.items()}


def onnx_bev_fn(onnx_path: str | os.PathLike) -> BevFn:
    """``bev_fn`` running the exported FP32 ONNX model in onnxruntime on the CPU, with the custom ops' registered
    CPU kernels (what DL4AGX does with its FP32 engine; faster than the PyTorch forward here)."""
    import onnx

    from qdqkit.plugins import Session

    session = Session.start().custom_ops.session(onnx.load(str(onnx_path)))

    def run(sample):
        return session.run(["bev_embed"], {k: np.ascontiguousarray(sample[k]) for k in INPUT_NAMES})[0]

    return run


def torch_bev_fn(model) -> BevFn:
    """``bev_fn`` running the PyTorch model (FP32)."""
    import torch

    def run(sample):
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(sample[k])) for k in INPUT_NAMES]
            return model(*args)[0].numpy()

    return run


# ---- on-disk layouts --------------------------------------------------------------------------------------------


def save_npz(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write the original layout (one npz, inputs concatenated along axis 0), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in INPUT_NAMES})
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_folder(arrays: dict[str, np.ndarray], folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write one ``<input>.npy`` per input (same concatenated layout) plus ``meta.json``; loads memory-mapped."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None, prefix=folder.name + "."))
    try:
        for k in INPUT_NAMES:
            np.save(tmp / f"{k}.npy", arrays[k])
        frames = int(arrays["image"].shape[0])
        (tmp / "meta.json").write_text(json.dumps({"frames": frames, **(meta or {})}, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
    return folder


def load_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Open a folder written by :func:`save_folder`, memory-mapped."""
    folder = Path(folder)
    return {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in INPUT_NAMES}


def split_sample(arrays: dict[str, np.ndarray], i: int, frames: int) -> dict[str, np.ndarray]:
    """Sample i of a concatenated layout: every array is cut into ``frames`` equal chunks along axis 0."""
    out = {}
    for k, a in arrays.items():
        n = a.shape[0] // frames
        out[k] = np.ascontiguousarray(a[i * n:(i + 1) * n])
    return out
