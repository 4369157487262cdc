"""Calibration and validation data: where samples come from and how they are checked.

A `CalibrationSource` is a sequence of batch-1 samples (one array per model input, shaped exactly as that input).
Calibration uses samples ``[0, calib_samples)``; validation the ones after them, so the two never overlap.

Built-in forms of ``--calib SPEC``:
  1. ``data.npz``: one array per model input, keyed by the input name, each the samples concatenated along
     axis 0 (the layout of the original BEVFormer INT8 recipe and of ModelOpt's ``--calibration_data_path``).
  2. ``folder/``: one ``<input>.npy`` per model input in the same layout, opened memory-mapped, so memory stays
     bounded by one sample whatever the size of the data. Characters of an input name outside
     ``[A-Za-z0-9_.-]`` are written ``_`` in the file name.
  3. ``data.npy``: one array, for a model with a single input.
Plugins add their own forms through the ``qdqkit_calibration_source`` hook (first non-None result wins); every
sample a plugin returns is checked the same way as the built-in ones.
"""

from __future__ import annotations

import mmap as mmap_module
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qdqkit.errors import UserError

InputSpec = dict[str, tuple[np.dtype, tuple[int, ...]]]

_ONNX_TO_NUMPY = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}


class CalibrationSource:
    """A sequence of samples for the model inputs ``names``; ``sample(i)`` returns one batch-1 sample."""

    names: list[str] = []

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, i: int) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """A short human description for reports."""
        return type(self).__name__

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self.sample(i)


def model_inputs(model: Any) -> InputSpec:
    """The graph inputs of an ONNX model that are not initializers, with numpy dtype and shape.

    A dimension that is not a fixed positive integer is written -1 (it then matches any size).
    """
    inits = {t.name for t in model.graph.initializer}
    out: InputSpec = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(_ONNX_TO_NUMPY.get(tt.elem_type, np.float32))
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
        out[vi.name] = (dtype, dims)
    return out


def file_name_for(input_name: str) -> str:
    """The .npy file name that holds ``input_name`` in a calibration folder."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", input_name) + ".npy"


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join("?" if d < 0 else str(d) for d in shape) + "]"


def check_sample(sample: Mapping[str, np.ndarray], inputs: InputSpec, where: str) -> None:
    """Raise a UserError naming the input if ``sample`` lacks an input or has a wrong shape or dtype."""
    for name, (dtype, shape) in inputs.items():
        if name not in sample:
            raise UserError(
                f"{where} has no data for model input '{name}' (it has: {', '.join(sorted(sample)) or 'nothing'}); "
                f"add an array named '{name}'"
            )
        arr = np.asarray(sample[name])
        if arr.dtype != dtype:
            raise UserError(
                f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}; convert the data "
                f"(e.g. arr.astype(np.{dtype}))"
            )
        if len(arr.shape) != len(shape) or any(s >= 0 and s != a for s, a in zip(shape, arr.shape)):
            raise UserError(
                f"{where}: input '{name}' has a sample of shape {_shape_str(arr.shape)}, the model expects "
                f"{_shape_str(shape)}"
            )


class ArraySource(CalibrationSource):
    """Samples held as arrays (each input's samples concatenated along axis 0); arrays may be memory-mapped."""

    def __init__(self, arrays: Mapping[str, np.ndarray], inputs: InputSpec, where: str) -> None:
        self.where = where
        self.inputs = dict(inputs)
        self.names = list(inputs)
        counts = {}
        for name, (dtype, shape) in self.inputs.items():
            if name not in arrays:
                raise UserError(
                    f"{where} has no data for model input '{name}' (it has: {', '.join(sorted(arrays)) or 'nothing'});"
                    f" add an array named '{name}'"
                )
            arr = arrays[name]
            if arr.dtype != dtype:
                raise UserError(
                    f"{where}: input '{name}' has dtype {arr.dtype}, the model expects {dtype}; convert the data "
                    f"(e.g. arr.astype(np.{dtype}))"
                )
            batch = shape[0] if shape and shape[0] > 0 else 1
            tail = shape[1:]
            bad_tail = len(arr.shape) != len(shape) or any(
                s >= 0 and s != a for s, a in zip(tail, arr.shape[1:])
            )
            if bad_tail or arr.shape[0] % batch:
                raise UserError(
                    f"{where}: input '{name}' has shape {_shape_str(arr.shape)}, expected samples of "
                    f"{_shape_str(shape)} concatenated along axis 0, i.e. [N*{batch}{''.join(',' + _shape_str((d,))[1:-1] for d in tail)}]"
                )
            counts[name] = arr.shape[0] // batch
        extra = sorted(set(arrays) - set(inputs))
        if extra:
            raise UserError(
                f"{where} has arrays that are not model inputs: {', '.join(extra)}; the model inputs are "
                f"{', '.join(self.names)}"
            )
        if len(set(counts.values())) > 1:
            raise UserError(
                f"{where}: inputs hold different numbers of samples ({', '.join(f'{k}: {v}' for k, v in counts.items())});"
                " give every input the same number"
            )
        self._arrays = {n: arrays[n] for n in self.names}
        self._batch = {n: (s[0] if s and s[0] > 0 else 1) for n, (_, s) in self.inputs.items()}
        self._n = next(iter(counts.values()), 0)

    def __len__(self) -> int:
        return self._n

    def sample(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        # Copy one slice only: with memory-mapped arrays this is what keeps memory bounded by a sample.
        out = {n: np.array(a[i * self._batch[n] : (i + 1) * self._batch[n]]) for n, a in self._arrays.items()}
        for a in self._arrays.values():
            _release_pages(a)
        return out

    def describe(self) -> str:
        return f"{self.where} ({self._n} samples)"


class CheckedSource(CalibrationSource):
    """Wraps a plugin's source so that every sample it returns is checked against the model inputs."""

    def __init__(self, inner: CalibrationSource, inputs: InputSpec, where: str) -> None:
        self.inner = inner
        self.inputs = dict(inputs)
        self.names = list(inputs)
        self.where = where

    def __len__(self) -> int:
        return len(self.inner)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        s = self.inner.sample(i)
        check_sample(s, self.inputs, f"{self.where} (sample {i})")
        return {n: s[n] for n in self.names}

    def describe(self) -> str:
        return self.inner.describe()


def builtin_source(spec: str, inputs: InputSpec) -> CalibrationSource | None:
    """The built-in reader: an .npz file, a .npy file, or a folder of .npy files; None if ``spec`` is none of them."""
    path = Path(spec)
    if path.is_dir():
        arrays = {}
        for name in inputs:
            f = path / file_name_for(name)
            if not f.exists():
                present = ", ".join(sorted(p.name for p in path.glob("*.npy"))) or "no .npy files"
                raise UserError(
                    f"calibration folder {spec} has no {f.name} for model input '{name}' (it has: {present})"
                )
            arrays[name] = _load_npy(f, mmap=True)
        extra = sorted({p.name for p in path.glob("*.npy")} - {file_name_for(n) for n in inputs})
        if extra:
            raise UserError(
                f"calibration folder {spec} has files for no model input: {', '.join(extra)}; model inputs: "
                f"{', '.join(inputs)}"
            )
        return ArraySource(arrays, inputs, f"calibration folder {spec}")
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # a corrupt archive is the user's file, not a bug
            raise UserError(f"cannot read calibration file {spec}: {e}") from None
        return ArraySource(arrays, inputs, f"calibration file {spec}")
    if path.is_file() and path.suffix == ".npy":
        if len(inputs) != 1:
            raise UserError(
                f"calibration file {spec} is a single array but the model has {len(inputs)} inputs "
                f"({', '.join(inputs)}); use an .npz or a folder of .npy files"
            )
        return ArraySource({next(iter(inputs)): _load_npy(path, mmap=True)}, inputs, f"calibration file {spec}")
    return None


def _release_pages(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set (they stay in the page cache).

    Without it every page read stays mapped, and the resident size grows with the data read so far.
    """
    mm = getattr(a, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap_module, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap_module.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:
        raise UserError(f"cannot read calibration array {path}: {e}") from None


def resolve_source(spec: str | None, inputs: InputSpec, hook: Any = None) -> CalibrationSource:
    """Turn a ``--calib`` spec into a checked source: plugins first (through ``hook``), then the built-in reader."""
    if not spec:
        raise UserError("this pipeline needs calibration data: pass --calib DATA (an .npz, a .npy folder, or a plugin form)")
    if hook is not None:
        found = hook.qdqkit_calibration_source(spec=spec, inputs=inputs)
        if found is not None:
            return CheckedSource(found, inputs, f"calibration source '{spec}'")
    found = builtin_source(spec, inputs)
    if found is None:
        raise UserError(
            f"calibration data '{spec}' not found: give an existing .npz or .npy file, a folder of .npy files, or a "
            "form a plugin recognises (see the plugin's documentation)"
        )
    return found


def require(source: CalibrationSource, start: int, count: int, purpose: str) -> None:
    """Raise a UserError if ``source`` does not hold samples ``[start, start + count)``."""
    if count < 1:
        raise UserError(f"{purpose} needs at least one sample, {count} asked for")
    if len(source) < start + count:
        held_out = f" after the first {start} (used for calibration)" if start else ""
        raise UserError(
            f"{purpose} needs {count} samples{held_out} but {source.describe()} has only {len(source)} in all; "
            f"supply more data or lower the sample count"
        )


class SampleReader:
    """An onnxruntime ``CalibrationDataReader`` over samples ``[start, start + count)`` of a source.

    It yields one sample at a time and keeps none, so calibrating on a memory-mapped folder stays bounded.
    """

    def __init__(self, source: CalibrationSource, start: int, count: int) -> None:
        self.source, self.start, self.count = source, start, count
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self.count:
            return None
        s = self.source.sample(self.start + self._i)
        self._i += 1
        return s

    def get_first(self) -> dict[str, np.ndarray]:
        return self.source.sample(self.start)

    def rewind(self) -> None:
        self._i = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i = start_index

    def __iter__(self) -> SampleReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        s = self.get_next()
        if s is None:
            raise StopIteration
        return s

    def __len__(self) -> int:
        return self.count
