"""Custom-op descriptions (`CustomOpSpec`) and the registry that makes them usable without TensorRT.

A spec says everything qdqkit needs to know about an op that no standard ONNX schema describes: its inputs,
outputs and attributes, a type/shape function, a numpy reference, a CPU implementation onnxruntime can run, and
the TensorRT plugin that implements it at deployment. The registry holds no op itself; plugins add them through
the ``qdqkit_register_custom_ops`` hook.

With the specs registered, the registry:
  1. registers ONNX schemas (domain "" as the upstream exporters write these ops, ``trt.plugins``, and any
     aliases) with a Python shape-inference function, so the stock checker, onnx shape inference, onnxsim and
     ModelOpt's own shape passes accept the op;
  2. gives an execution copy of a model in which every custom op is backed by a model-local ONNX function
     (``spec.function``), which onnxruntime inlines in any session, ModelOpt's included; the function is
     stripped before a model is written for TensorRT;
  3. installs, for the duration of a ``with`` block, a hook on ``onnxruntime.InferenceSession`` so that every
     session created inside it (also by libraries that build their own, as ModelOpt does) gets those functions,
     or, for an op whose maths cannot be written with standard ops, its Python kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRT_PLUGIN_DOMAIN = "trt.plugins"
DEFAULT_DOMAINS = ("", "ai.onnx")


def canonical_domain(domain: str) -> str:
    """"" and "ai.onnx" name the same (default) domain."""
    return "" if domain in DEFAULT_DOMAINS else domain


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a custom op. ``types`` are ONNX type strings, e.g. ``"tensor(float)"``."""

    name: str
    types: tuple[str, ...]
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class AttrSpec:
    """One attribute. ``type`` is "int", "float", "string", "ints" or "floats"; ``default`` None means required."""

    name: str
    type: str
    default: Any = None
    doc: str = ""


@dataclass(frozen=True)
class TensorInfo:
    """What a shape function sees and returns: an ONNX element type and a shape.

    ``shape`` is None when even the rank is unknown; an entry is an int, a symbolic name (str) or None.
    """

    elem_type: int
    shape: tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class TrtPlugin:
    """The TensorRT plugin that runs the op, and the precisions it accepts per input/output name.

    Precisions are "fp32", "fp16", "int8", "int32", "int64". The ONNX parser finds the plugin by (name, version,
    namespace); DerryHub-style C++ plugins use version "1" and namespace "".
    """

    name: str
    version: str = "1"
    namespace: str = ""
    formats: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomOpSpec:
    """Everything qdqkit knows about one custom op.

    ``infer(inputs, attrs) -> outputs``: ``inputs`` is a list of TensorInfo (None where unknown), ``attrs`` the
    node's attributes merged over the defaults; returns one TensorInfo per output.

    ``reference(*arrays, **attrs)``: the numpy reference (float64 accumulation), returning an array or a tuple.

    ``function(opset) -> onnx.FunctionProto``: the op's maths as standard ONNX ops valid at default-domain
    ``opset``; attributes are read through attribute references. The registry fills in the function's domain
    and name to match the nodes it backs.

    ``python_kernel(*arrays, **attrs)``: a CPU fallback for maths that standard ops cannot express; installed
    into onnxruntime sessions through onnxruntime-extensions (slower: every output is marshalled in Python).
    """

    op_type: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    infer: Callable[[list[TensorInfo | None], dict[str, Any]], list[TensorInfo]]
    domain: str = ""
    aliases: tuple[tuple[str, str], ...] = ()
    attributes: tuple[AttrSpec, ...] = ()
    reference: Callable[..., Any] | None = None
    function: Callable[[int], Any] | None = None
    python_kernel: Callable[..., Any] | None = None
    trt: TrtPlugin | None = None
    doc: str = ""

    @property
    def keys(self) -> tuple[tuple[str, str], ...]:
        """Every (domain, op_type) that resolves to this spec: its own, ``trt.plugins``, and the aliases."""
        own = (canonical_domain(self.domain), self.op_type)
        keys = [own, (TRT_PLUGIN_DOMAIN, self.op_type)]
        keys += [(canonical_domain(d), t) for d, t in self.aliases]
        for d, t in self.aliases:
            keys.append((TRT_PLUGIN_DOMAIN, t))
        return tuple(dict.fromkeys(keys))

    def attrs_with_defaults(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        merged = {a.name: a.default for a in self.attributes}
        merged.update(attrs)
        return merged

    def run_reference(self, *arrays: np.ndarray, **attrs: Any) -> tuple[np.ndarray, ...]:
        if self.reference is None:
            raise NotImplementedError(f"custom op {self.op_type} has no numpy reference")
        out = self.reference(*arrays, **self.attrs_with_defaults(attrs))
        return out if isinstance(out, tuple) else (out,)
