"""Calibration sources: the .npz layout, the memory-mapped .npy folder, plugin sources, and their errors."""

from __future__ import annotations

import numpy as np
import pytest

from qdqkit.calib import (ArraySource, CalibrationSource, SampleReader, builtin_source, file_name_for, require,
                          resolve_source)
from qdqkit.errors import UserError

INPUTS = {"image": (np.dtype(np.float32), (1, 3, 4, 4)), "ids": (np.dtype(np.int64), (1, 5))}


def _arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"image": rng.standard_normal((n, 3, 4, 4)).astype(np.float32), "ids": np.arange(n * 5).reshape(n, 5)}


def test_npz_samples_are_slices_along_axis_0(tmp_path):
    a = _arrays(6)
    np.savez(tmp_path / "c.npz", **a)
    src = resolve_source(str(tmp_path / "c.npz"), INPUTS)
    assert len(src) == 6 and src.names == ["image", "ids"]
    s = src.sample(4)
    assert s["image"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(s["image"][0], a["image"][4])
    np.testing.assert_array_equal(s["ids"], a["ids"][4:5])


def test_folder_is_memory_mapped_and_names_are_sanitised(tmp_path):
    inputs = {"img:0": INPUTS["image"]}
    a = _arrays(5)["image"]
    np.save(tmp_path / file_name_for("img:0"), a)
    assert file_name_for("img:0") == "img_0.npy"
    src = builtin_source(str(tmp_path), inputs)
    assert isinstance(src._arrays["img:0"], np.memmap)
    np.testing.assert_array_equal(src.sample(2)["img:0"][0], a[2])
    assert not isinstance(src.sample(2)["img:0"], np.memmap)


def test_batch_larger_than_one_is_grouped(tmp_path):
    inputs = {"x": (np.dtype(np.float32), (2, 3))}
    np.save(tmp_path / "x.npy", np.arange(24, dtype=np.float32).reshape(8, 3))
    src = builtin_source(str(tmp_path / "x.npy"), inputs)
    assert len(src) == 4
    np.testing.assert_array_equal(src.sample(1)["x"], np.arange(6, 12, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("mutate, words", [
    (lambda a: a.pop("ids"), ["no data for model input 'ids'"]),
    (lambda a: a.__setitem__("image", a["image"][:, :, :2]), ["'image'", "shape", "[1,3,4,4]"]),
    (lambda a: a.__setitem__("image", a["image"].astype(np.float64)), ["'image'", "float64", "float32"]),
    (lambda a: a.__setitem__("ids", a["ids"][:3]), ["different numbers of samples"]),
    (lambda a: a.__setitem__("extra", a["ids"]), ["not model inputs: extra"]),
])
def test_npz_errors_name_the_problem(tmp_path, mutate, words):
    a = _arrays(4)
    mutate(a)
    np.savez(tmp_path / "c.npz", **a)
    with pytest.raises(UserError) as e:
        resolve_source(str(tmp_path / "c.npz"), INPUTS)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_file_and_too_few_samples(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_source(str(tmp_path / "nope.npz"), INPUTS)
    with pytest.raises(UserError, match="needs calibration data"):
        resolve_source(None, INPUTS)
    np.savez(tmp_path / "c.npz", **_arrays(4))
    src = resolve_source(str(tmp_path / "c.npz"), INPUTS)
    require(src, 0, 4, "calibration")
    with pytest.raises(UserError, match=r"validation needs 2 samples after the first 3 .* has only 4"):
        require(src, 3, 2, "validation")


def test_folder_missing_file(tmp_path):
    np.save(tmp_path / "image.npy", _arrays(2)["image"])
    with pytest.raises(UserError, match="no ids.npy for model input 'ids'"):
        builtin_source(str(tmp_path), INPUTS)


class _Plugin(CalibrationSource):
    names = ["image", "ids"]

    def __init__(self, bad: bool) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 3

    def sample(self, i):
        a = _arrays(3)
        s = {k: v[i:i + 1] for k, v in a.items()}
        if self.bad:
            s["image"] = s["image"].astype(np.float16)
        return s


class _Hook:
    def __init__(self, bad: bool) -> None:
        self.bad = bad
        self.calls = []

    def qdqkit_calibration_source(self, spec, inputs):
        self.calls.append(spec)
        return _Plugin(self.bad) if spec.startswith("toy:") else None


def test_plugin_source_wins_and_is_checked():
    hook = _Hook(bad=False)
    src = resolve_source("toy:3", INPUTS, hook)
    assert len(src) == 3 and src.sample(1)["ids"].shape == (1, 5)
    with pytest.raises(UserError, match=r"sample 0\).*'image' has dtype float16"):
        resolve_source("toy:3", INPUTS, _Hook(bad=True)).sample(0)


def test_reader_yields_the_range_and_rewinds():
    src = ArraySource(_arrays(6), INPUTS, "mem")
    r = SampleReader(src, 2, 3)
    got = [s["ids"][0, 0] for s in r]
    assert got == [10, 15, 20]
    assert r.get_next() is None
    r.rewind()
    assert r.get_next()["ids"][0, 0] == 10
    assert r.get_first()["ids"][0, 0] == 10
