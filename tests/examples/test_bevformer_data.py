"""Synthetic temporal data: ego motion, camera rig, images, sequence rolling, on-disk layouts, the spec parser."""

import math

import numpy as np
import pytest

from qdqkit.calib import builtin_source
from qdqkit.errors import UserError
from qdqkit.examples.bevformer import calib as C
from qdqkit.examples.bevformer import data as D
from qdqkit.examples.bevformer.model import TINY

INPUTS = {
    "image": (np.dtype(np.float32), (1, 6, 3, 480, 800)),
    "prev_bev": (np.dtype(np.float32), (2500, 1, 256)),
    "use_prev_bev": (np.dtype(np.float32), (1,)),
    "can_bus": (np.dtype(np.float32), (18,)),
    "lidar2img": (np.dtype(np.float32), (1, 6, 4, 4)),
}


def test_can_bus_deltas_and_scene_starts():
    gen = D.SceneGenerator(seed=3, scene_len=10)
    for scene in range(3):
        start = gen.can_bus(scene, 0)
        assert start.dtype == np.float32 and start.shape == (18,)
        assert np.all(start[0:3] == 0) and start[17] == 0
        prev_yaw = None
        for t in range(1, 10):
            cb = gen.can_bus(scene, t)
            step = np.hypot(cb[0], cb[1])
            assert step <= 8.5  # at most 16 m/s over 0.5 s
            assert abs(cb[2]) < 0.2
            assert 0 <= cb[16] < 2 * math.pi
            # quaternion (w, 0, 0, z) of the absolute yaw
            assert np.isclose(2 * math.atan2(cb[6], cb[3]) % (2 * math.pi), cb[16], atol=1e-4)
            assert cb[9] == pytest.approx(9.8)
            if prev_yaw is not None:
                # [17] is the raw difference of absolute yaws in degrees (no wrap handling, as upstream)
                assert cb[17] == pytest.approx(math.degrees(cb[16]) - math.degrees(prev_yaw), abs=1e-3)
            prev_yaw = cb[16]
    # motion is mostly along the heading: the translation angle follows the absolute yaw
    cb = next(gen.can_bus(0, t) for t in range(1, 10) if np.hypot(*gen.can_bus(0, t)[:2]) > 1.0)
    heading = math.atan2(cb[1], cb[0]) % (2 * math.pi)
    assert abs((heading - cb[16] + math.pi) % (2 * math.pi) - math.pi) < 0.2


def test_use_prev_bev_zero_exactly_at_scene_starts():
    gen = D.SceneGenerator(seed=0, scene_len=4)
    flags = [float(gen.inputs(i)["use_prev_bev"][0]) for i in range(9)]
    assert flags == [0, 1, 1, 1, 0, 1, 1, 1, 0]


def test_camera_rig_projects_like_nuscenes():
    l2i = D.camera_rig(TINY, seed=0)
    assert l2i.shape == (1, 6, 4, 4) and l2i.dtype == np.float32

    def project(cam, point):
        p = l2i[0, cam] @ np.array([*point, 1.0])
        return p[0] / p[2], p[1] / p[2], p[2]

    # LiDAR frame: x right, y forward, z up; 20 m ahead at ground level (-1.8 m) is low-centre in CAM_FRONT
    u, v, d = project(0, (0.0, 20.0, -1.8))
    assert d > 0 and 350 < u < 450 and 225 < v < 330  # 0.5-scaled 800x450 image
    u, v, d = project(3, (0.0, -20.0, -1.8))  # behind: CAM_BACK
    assert d > 0 and 300 < u < 500
    u, v, d = project(0, (0.0, -20.0, -1.8))  # behind the front camera: negative depth
    assert d < 0
    # left front point is seen by FRONT_LEFT (index 2), not FRONT_RIGHT (index 1)
    u, v, d = project(2, (-10.0, 10.0, 0.0))
    assert d > 0 and 0 < u < 800 and 0 < v < 450
    assert project(1, (-10.0, 10.0, 0.0))[2] < 0 or not 0 < project(1, (-10.0, 10.0, 0.0))[0] < 800


def test_images_normalised_structured_and_padded():
    gen = D.SceneGenerator(seed=1)
    img = gen.frame_images(0, 2)
    assert img.shape == (1, 6, 3, 480, 800) and img.dtype == np.float32
    assert np.all(img[..., 450:, :] == 0)
    body = img[..., :450, :]
    assert -1.5 < body.mean() < 1.5 and 0.3 < body.std() < 2.0
    # natural-image-like: neighbouring pixels are strongly correlated (white noise would give ~0)
    a, b = body[..., :, :-1].ravel(), body[..., :, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8
    # consecutive frames of a scene are similar, different scenes are not
    same = np.corrcoef(body.ravel(), gen.frame_images(0, 3)[..., :450, :].ravel())[0, 1]
    other = np.corrcoef(body.ravel(), gen.frame_images(1, 2)[..., :450, :].ravel())[0, 1]
    assert same > 0.6 and same > other + 0.2


def test_sequence_rolls_prev_bev_through_the_model_function():
    seen = []

    def bev_fn(sample):
        seen.append(sample)
        # any deterministic function of the frame stands in for the network here; the real network is used in
        # test_bevformer_recipe.py
        return np.full((2500, 1, 256), sample["can_bus"][0] + 10 * sample["use_prev_bev"][0], np.float32)

    arrays = D.generate_sequence(5, bev_fn, TINY, seed=0, scene_len=3)
    assert arrays["image"].shape == (5, 6, 3, 480, 800)
    assert arrays["prev_bev"].shape == (5 * 2500, 1, 256)
    assert arrays["can_bus"].shape == (5 * 18,)
    assert arrays["use_prev_bev"].tolist() == [0, 1, 1, 0, 1]
    assert arrays["lidar2img"].shape == (5, 6, 4, 4)
    first = arrays["prev_bev"][:2500]
    assert abs(first.mean()) < 0.05 and 0.9 < first.std() < 1.1  # N(0,1) for the very first frame
    for i in range(1, 5):
        expected = bev_fn(seen[i - 1])
        assert np.array_equal(arrays["prev_bev"][i * 2500:(i + 1) * 2500], expected)


def test_npz_and_folder_layouts_read_by_the_core(tmp_path):
    arrays = D.generate_sequence(2, lambda s: np.ones((2500, 1, 256), np.float32), TINY, seed=0, scene_len=2)
    npz = D.save_npz(arrays, tmp_path / "calib.npz")
    folder = D.save_folder(arrays, tmp_path / "calib")
    for src in (builtin_source(str(npz), INPUTS), builtin_source(str(folder), INPUTS)):
        assert len(src) == 2
        s1 = src.sample(1)
        assert s1["can_bus"].shape == (18,) and s1["image"].shape == (1, 6, 3, 480, 800)
        assert np.array_equal(s1["can_bus"], arrays["can_bus"][18:])
        assert np.array_equal(s1["prev_bev"], np.ones((2500, 1, 256), np.float32))
    mm = D.load_folder(folder)
    assert isinstance(mm["image"], np.memmap)
    ours = C.BEVFormerSource(folder, "test")
    assert np.array_equal(ours.sample(0)["image"], arrays["image"][:1])


def test_spec_parsing_and_errors():
    opts = C.parse_spec("bevformer:frames=4,seed=2")
    assert opts["frames"] == 4 and opts["seed"] == 2 and opts["scene_len"] == 40
    with pytest.raises(UserError, match="frames="):
        C.parse_spec("bevformer:frame=4")
    with pytest.raises(UserError, match="integer"):
        C.parse_spec("bevformer:frames=many")
    with pytest.raises(UserError, match="at least 1"):
        C.parse_spec("bevformer:frames=0")
    with pytest.raises(UserError, match="BEVFormer-tiny interface"):
        C.check_interface({"x": (np.dtype(np.float32), (1, 3, 224, 224))})
    C.check_interface(INPUTS)


def test_dir_spec_rejects_a_foreign_folder(tmp_path):
    (tmp_path / "image.npy").write_bytes(b"")
    with pytest.raises(UserError, match="lacks"):
        C.source_from_spec(f"bevformer:dir={tmp_path}", INPUTS)
