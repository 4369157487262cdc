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


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------

import atexit  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

import onnx  # noqa: E402
from onnx import defs as _defs  # noqa: E402
from onnx import helper as _helper  # noqa: E402

from qdqkit.errors import PassContractError, UserError  # noqa: E402

# Domains that may legitimately appear in a model without being "custom": the ONNX standard ones and
# onnxruntime's contrib domain.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training")
ORT_CONTRIB_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental", "com.ms.internal.nhwc")

_ATTR_TYPES = {
    "int": _defs.OpSchema.AttrType.INT,
    "float": _defs.OpSchema.AttrType.FLOAT,
    "string": _defs.OpSchema.AttrType.STRING,
    "ints": _defs.OpSchema.AttrType.INTS,
    "floats": _defs.OpSchema.AttrType.FLOATS,
    "strings": _defs.OpSchema.AttrType.STRINGS,
    "tensor": _defs.OpSchema.AttrType.TENSOR,
}

# onnx keeps schemas in one process-wide table; so do we. Maps (domain, op_type) -> the spec whose inference
# function currently answers for it. The registered Python callback looks the spec up here, so a second
# registry with an equal-shaped spec only swaps the entry instead of re-registering.
_SCHEMA_LOCK = threading.Lock()
_SCHEMA_SPECS: dict[tuple[str, str], CustomOpSpec] = {}
_SCHEMA_SIGNATURES: dict[tuple[str, str], tuple] = {}


def _deregister_all_schemas() -> None:
    # onnx 1.21 crashes at interpreter exit while destroying schemas that hold Python callbacks: drop them first.
    with _SCHEMA_LOCK:
        for domain, op_type in list(_SCHEMA_SPECS):
            with contextlib.suppress(Exception):
                _defs.deregister_schema(op_type, 1, domain)
        _SCHEMA_SPECS.clear()
        _SCHEMA_SIGNATURES.clear()


atexit.register(_deregister_all_schemas)


def _schema_signature(spec: CustomOpSpec) -> tuple:
    return (
        tuple((i.name, i.types, i.optional) for i in spec.inputs),
        tuple((o.name, o.types, o.optional) for o in spec.outputs),
        tuple((a.name, a.type, a.default is None) for a in spec.attributes),
    )


def _type_to_info(tp: onnx.TypeProto | None) -> TensorInfo | None:
    if tp is None or not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    if tt.elem_type == 0 and not tt.HasField("shape"):
        return None
    if not tt.HasField("shape"):
        return TensorInfo(tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(tt.elem_type, tuple(dims))


def _info_to_type(info: TensorInfo) -> onnx.TypeProto:
    shape = None if info.shape is None else list(info.shape)
    return _helper.make_tensor_type_proto(info.elem_type, shape)


def _node_attrs(spec: CustomOpSpec, get: Callable[[str], Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for a in spec.attributes:
        proto = get(a.name)
        if proto is not None:
            value = _helper.get_attribute_value(proto)
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode() for v in value]
            attrs[a.name] = value
    return spec.attrs_with_defaults(attrs)


class _LazyAttrs(Mapping):
    """The node's attributes over the spec's defaults, each read from onnx only when a shape function asks
    (most shape functions read none; reading every attribute of every node is most of the Python cost)."""

    def __init__(self, spec: CustomOpSpec, get: Callable[[str], Any]) -> None:
        self._spec, self._get = spec, get
        self._names = [a.name for a in spec.attributes]
        self._cache: dict[str, Any] | None = None

    def _all(self) -> dict[str, Any]:
        if self._cache is None:
            self._cache = _node_attrs(self._spec, self._get)
        return self._cache

    def __getitem__(self, key: str) -> Any:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


def node_attributes(spec: CustomOpSpec, node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values, merged over the spec's defaults (what ``infer`` and kernels get)."""
    by_name = {a.name: a for a in node.attribute}
    return _node_attrs(spec, by_name.get)


def _make_inference(key: tuple[str, str]) -> Callable[[Any], None]:
    def infer(ctx: Any) -> None:
        spec = _SCHEMA_SPECS.get(key)
        if spec is None:  # deregistered while a model was being checked
            return
        inputs = [_type_to_info(ctx.get_input_type(i)) if ctx.has_input(i) else None
                  for i in range(ctx.get_num_inputs())]
        outputs = spec.infer(inputs, _LazyAttrs(spec, ctx.get_attribute) if spec.attributes else {})
        for i, info in enumerate(outputs[: ctx.get_num_outputs()]):
            if info is not None:
                ctx.set_output_type(i, _info_to_type(info))

    return infer


_TRT_NODE_ATTRIBUTES = ("plugin_namespace", "plugin_version")
_PRECISION_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)", "int8": "tensor(int8)",
                    "int32": "tensor(int32)", "int64": "tensor(int64)"}


def _schema_types(spec: CustomOpSpec, io: IOSpec) -> list[str]:
    """The I/O's types, plus what its TensorRT plugin accepts there: a Q/DQ model that feeds the plugin INT8
    (Q -> plugin -> DQ) must still pass the checker."""
    formats = spec.trt.formats.get(io.name, ()) if spec.trt is not None else ()
    extra = [_PRECISION_TYPES[p] for p in formats if p in _PRECISION_TYPES]
    return list(dict.fromkeys([*io.types, *extra]))


def _build_schema(spec: CustomOpSpec, domain: str, op_type: str) -> _defs.OpSchema:
    option = _defs.OpSchema.FormalParameterOption
    constraints: list[tuple[str, list[str], str]] = []

    def formal(ios: tuple[IOSpec, ...], prefix: str) -> list[Any]:
        # one type variable per input/output: each takes its own types (the plugin's formats decide, not ONNX)
        params = []
        for i, io in enumerate(ios):
            tname = f"{prefix}{i}"
            constraints.append((tname, _schema_types(spec, io), io.doc))
            params.append(_defs.OpSchema.FormalParameter(
                io.name, tname, io.doc, param_option=option.Optional if io.optional else option.Single))
        return params

    inputs, outputs = formal(spec.inputs, "TI"), formal(spec.outputs, "TO")
    attributes = []
    for a in spec.attributes:
        if a.type not in _ATTR_TYPES:
            raise PassContractError(f"custom op {op_type}: attribute {a.name} has unknown type {a.type!r}")
        attributes.append(_defs.OpSchema.Attribute(a.name, _ATTR_TYPES[a.type], a.doc, required=a.default is None))
    # TensorRT's ONNX parser reads these on any plugin node; the op's own maths never does
    for name in _TRT_NODE_ATTRIBUTES:
        if all(a.name != name for a in spec.attributes):
            attributes.append(_defs.OpSchema.Attribute(name, _ATTR_TYPES["string"], "TensorRT plugin lookup",
                                                       required=False))
    schema = _defs.OpSchema(op_type, domain, 1, spec.doc or f"custom op {op_type} (qdqkit spec)",
                            inputs=inputs, outputs=outputs, type_constraints=constraints, attributes=attributes)
    schema.set_type_and_shape_inference_function(_make_inference((domain, op_type)))
    return schema


def _is_default(domain: str) -> bool:
    return domain in DEFAULT_DOMAINS


class CustomOpRegistry:
    """Custom-op specs by (domain, op_type), filled by plugins through ``qdqkit_register_custom_ops``.

    ``""`` and ``"ai.onnx"`` are the same domain, and every spec also answers in ``trt.plugins``.
    """

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], CustomOpSpec] = {}
        self._specs: list[CustomOpSpec] = []
        self._origin: dict[int, str] = {}
        self.current_plugin = "?"

    # -- filling and lookup ------------------------------------------------------------------------------
    def add(self, spec: CustomOpSpec) -> None:
        """Add a spec; a key already held by a different spec is a contract error naming both."""
        if not isinstance(spec, CustomOpSpec):
            raise PassContractError(f"plugin '{self.current_plugin}' registered {spec!r}, not a CustomOpSpec")
        if any(s is spec for s in self._specs):
            return
        for key in spec.keys:
            other = self._by_key.get(key)
            if other is not None and other is not spec:
                raise PassContractError(
                    f"custom op {key[0] or '(default domain)'}::{key[1]} registered twice: as "
                    f"{other.domain or '(default)'}::{other.op_type} by plugin '{self._origin[id(other)]}' and as "
                    f"{spec.domain or '(default)'}::{spec.op_type} by plugin '{self.current_plugin}'"
                )
        for key in spec.keys:
            self._by_key[key] = spec
        self._specs.append(spec)
        self._origin[id(spec)] = self.current_plugin

    def lookup(self, domain: str, op_type: str) -> CustomOpSpec | None:
        """The spec that answers for a node of this domain and op type, or None."""
        return self._by_key.get((canonical_domain(domain), op_type))

    def origin(self, spec: CustomOpSpec) -> str:
        """Name of the plugin that registered ``spec``."""
        return self._origin.get(id(spec), "?")

    def drop_plugin(self, plugin: str) -> None:
        """Forget every spec the named plugin registered (it failed part-way through registering)."""
        gone = {id(s) for s in self._specs if self._origin.get(id(s)) == plugin}
        self._specs = [s for s in self._specs if id(s) not in gone]
        self._by_key = {k: v for k, v in self._by_key.items() if id(v) not in gone}
        for key in gone:
            del self._origin[key]

    def __iter__(self) -> Iterator[CustomOpSpec]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and len(key) == 2 and self.lookup(*key) is not None

    def custom_nodes(self, model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, CustomOpSpec]]:
        """Every node of the model (subgraphs included) that a spec answers for."""
        for node in iter_nodes(model.graph):
            spec = self.lookup(node.domain, node.op_type)
            if spec is not None and not _is_standard_node(node):
                yield node, spec

    # -- onnx schemas ------------------------------------------------------------------------------------
    def register_onnx_schemas(self) -> None:
        """Register an ONNX schema (since_version 1) for every key of every spec. Idempotent.

        A default-domain op type that names a standard ONNX op is refused: the standard schema must win.
        """
        # onnx.reference builds a by-name table of all schemas once, at import, and refuses one op name in two
        # domains (ours are in "" and trt.plugins); onnxruntime.quantization and ModelOpt import it, so it must
        # be imported before our schemas exist.
        import onnx.reference  # noqa: F401

        with _SCHEMA_LOCK:
            for spec in self._specs:
                for domain, op_type in spec.keys:
                    key = (domain, op_type)
                    sig = _schema_signature(spec)
                    if key in _SCHEMA_SPECS:
                        if _SCHEMA_SIGNATURES[key] == sig:
                            _SCHEMA_SPECS[key] = spec
                            continue
                        _defs.deregister_schema(op_type, 1, domain)
                        del _SCHEMA_SPECS[key]
                    elif _defs.has(op_type, domain):
                        raise PassContractError(
                            f"custom op {domain or '(default domain)'}::{op_type} (plugin "
                            f"'{self.origin(spec)}') clashes with an existing ONNX schema of that name"
                        )
                    _defs.register_schema(_build_schema(spec, domain, op_type))
                    _SCHEMA_SPECS[key] = spec
                    _SCHEMA_SIGNATURES[key] = sig

    # -- execution -----------------------------------------------------------------------------------------
    def execution_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` that onnxruntime can run on the CPU.

        Every custom node with a ``function`` gets a model-local FunctionProto built at the model's
        default-domain opset. onnxruntime does not resolve model-local functions in the default domain, so
        default-domain custom nodes move to ``trt.plugins`` in the copy (where TensorRT wants them anyway).
        Nodes whose spec has only a ``python_kernel`` keep their node and are served by the kernel that
        ``session`` / ``installed_in_onnxruntime`` register. The input model is not modified.
        """
        out = onnx.ModelProto()
        out.CopyFrom(model)
        self._attach_functions(out)
        return out

    def needs_execution_support(self, model: onnx.ModelProto) -> bool:
        """Whether ``model`` holds any node a spec answers for (i.e. onnxruntime would need our help)."""
        return next(self.custom_nodes(model), None) is not None

    def _attach_functions(self, model: onnx.ModelProto) -> list[CustomOpSpec]:
        opset = default_opset(model)
        wanted: dict[tuple[str, str], CustomOpSpec] = {}
        kernels: dict[int, CustomOpSpec] = {}  # specs hold dicts, so they are not hashable
        missing: list[str] = []
        for node, spec in list(self.custom_nodes(model)):
            if _is_default(node.domain):
                node.domain = TRT_PLUGIN_DOMAIN
            if spec.function is not None:
                wanted[(node.domain, node.op_type)] = spec
            elif spec.python_kernel is not None:
                kernels[id(spec)] = spec
            else:
                missing.append(node.op_type)
        if missing:
            raise UserError(
                f"custom op(s) {', '.join(sorted(set(missing)))} have no CPU implementation (neither `function` "
                "nor `python_kernel` in their CustomOpSpec); add one to run the model in onnxruntime"
            )
        keep = [f for f in model.functions if (f.domain, f.name) not in wanted]
        del model.functions[:]
        model.functions.extend(keep)
        for (domain, op_type), spec in sorted(wanted.items()):
            fn = spec.function(opset)
            fn.domain = domain
            fn.name = op_type
            model.functions.append(fn)
        domains = {o.domain for o in model.opset_import}
        for domain in sorted({d for d, _ in wanted} | {(s.domain if not _is_default(s.domain) else
                                                         TRT_PLUGIN_DOMAIN) for s in kernels.values()}):
            if domain not in domains:
                model.opset_import.append(_helper.make_opsetid(domain, 1))
        return list(kernels.values())

    def strip_functions(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Remove (in place) the model-local functions that back registered custom ops; returns ``model``."""
        keep = [f for f in model.functions if self.lookup(f.domain, f.name) is None]
        if len(keep) != len(model.functions):
            del model.functions[:]
            model.functions.extend(keep)
        return model

    def session(self, model_or_path: Any, providers: list[str] | None = None,
                sess_options: Any = None) -> Any:
        """An ``onnxruntime.InferenceSession`` for a model (proto, bytes or path) with the CPU kernels attached."""
        import onnxruntime as ort

        with self.installed_in_onnxruntime():
            return ort.InferenceSession(
                model_or_path if not isinstance(model_or_path, onnx.ModelProto) else _as_session_input(model_or_path),
                sess_options=sess_options,
                providers=providers or ["CPUExecutionProvider"],
            )

    @contextlib.contextmanager
    def installed_in_onnxruntime(self) -> Iterator[None]:
        """Within the block, every ``onnxruntime.InferenceSession`` gets the custom-op CPU implementations.

        Sessions may be created from a path, from serialized bytes, or from a model that lost the functions
        (ModelOpt does all three, and upgrades the opset first): each model is rewritten at open time into its
        execution form, built at the opset of the model being opened. The original ``__init__`` is restored on
        exit, also when the block raises. Nesting is allowed.
        """
        import onnxruntime as ort

        cls = ort.InferenceSession
        original = cls.__init__
        registry = self
        scratch = tempfile.TemporaryDirectory(prefix="qdqkit-ort-")

        def patched(self_: Any, path_or_bytes: Any, sess_options: Any = None, providers: Any = None,
                    provider_options: Any = None, **kwargs: Any) -> None:
            model_input, sess_options, transient = registry._prepare_session(
                path_or_bytes, sess_options, scratch.name)
            try:
                original(self_, model_input, sess_options, providers, provider_options, **kwargs)
            finally:
                if transient:
                    with contextlib.suppress(OSError):
                        os.unlink(transient)

        cls.__init__ = patched
        try:
            yield
        finally:
            cls.__init__ = original
            scratch.cleanup()

    def _prepare_session(self, path_or_bytes: Any, sess_options: Any, scratch: str) -> tuple[Any, Any, str | None]:
        """(what to hand onnxruntime, session options, a file to delete once the session exists)."""
        base_dir = None
        if isinstance(path_or_bytes, (str, os.PathLike)):
            path = os.fspath(path_or_bytes)
            model = onnx.load(path, load_external_data=False)
            base_dir = os.path.dirname(os.path.abspath(path))
        elif isinstance(path_or_bytes, (bytes, bytearray)):
            model = onnx.ModelProto.FromString(bytes(path_or_bytes))
        else:
            return path_or_bytes, sess_options, None
        if not self.needs_execution_support(model):
            return path_or_bytes, sess_options, None
        kernels = self._attach_functions(model)
        if kernels:
            sess_options = _with_python_kernels(kernels, sess_options)
        if base_dir is not None and _has_external_data(model):
            # external tensors are resolved relative to the model file: put the rewritten copy beside them
            fd, out = tempfile.mkstemp(prefix=".qdqkit-exec-", suffix=".onnx", dir=base_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            return out, sess_options, out
        return _as_session_input(model, scratch), sess_options, None


_KERNEL_LOCK = threading.Lock()
_REGISTERED_KERNELS: set[tuple[str, str]] = set()

_ORT_EXT_TYPES = {
    "tensor(float)": "dt_float",
    "tensor(double)": "dt_double",
    "tensor(int64)": "dt_int64",
    "tensor(int32)": "dt_int32",
    "tensor(bool)": "dt_bool",
    "tensor(uint8)": "dt_uint8",
    "tensor(int8)": "dt_int8",
    "tensor(float16)": "dt_float16",
    "tensor(string)": "dt_string",
}
_ORT_EXT_ATTRS = {"int": "dt_int64", "float": "dt_float", "string": "dt_string"}


def _with_python_kernels(specs: list[CustomOpSpec], sess_options: Any) -> Any:
    try:
        import onnxruntime_extensions as ortx
    except ImportError:
        raise UserError(
            "custom op(s) " + ", ".join(sorted(s.op_type for s in specs)) + " run only through a Python kernel, "
            "which needs onnxruntime-extensions: pip install onnxruntime-extensions"
        ) from None
    import onnxruntime as ort

    with _KERNEL_LOCK:
        for spec in specs:
            domain = TRT_PLUGIN_DOMAIN if _is_default(spec.domain) else spec.domain
            if (domain, spec.op_type) in _REGISTERED_KERNELS:
                continue
            kernel = spec.python_kernel
            names = [a.name for a in spec.attributes]
            defaults = spec.attrs_with_defaults({})

            def run(*arrays: Any, _k: Any = kernel, _d: dict = defaults, **attrs: Any) -> Any:
                merged = dict(_d)
                merged.update({k: v for k, v in attrs.items() if k in _d})
                return _k(*arrays, **merged)

            ortx.onnx_op(
                op_type=f"{domain}::{spec.op_type}",
                inputs=[getattr(ortx.PyCustomOpDef, _ORT_EXT_TYPES.get(i.types[0], "dt_float")) for i in spec.inputs],
                outputs=[getattr(ortx.PyCustomOpDef, _ORT_EXT_TYPES.get(o.types[0], "dt_float"))
                         for o in spec.outputs],
                attrs={a.name: getattr(ortx.PyCustomOpDef, _ORT_EXT_ATTRS.get(a.type, "dt_string"))
                       for a in spec.attributes if a.name in names},
            )(run)
            _REGISTERED_KERNELS.add((domain, spec.op_type))
    opts = sess_options or ort.SessionOptions()
    opts.register_custom_ops_library(ortx.get_library_path())
    return opts


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _as_session_input(model: onnx.ModelProto, scratch: str | None = None) -> Any:
    """Serialized bytes, or (for models past protobuf's 2 GB limit) a path to a copy with external data."""
    from qdqkit.model import proto_size, save_model

    if proto_size(model) < _PROTOBUF_LIMIT:
        return model.SerializeToString()

    folder = scratch or tempfile.mkdtemp(prefix="qdqkit-ort-")
    path = os.path.join(folder, "execution.onnx")
    save_model(model, path, external_data=True, durable=False)  # onnxruntime's scratch copy
    return path


_PROTOBUF_LIMIT = 2**31 - 2**20


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version."""
    for o in model.opset_import:
        if _is_default(o.domain):
            return int(o.version)
    return 1


_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def bodies(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The body graphs of ``node`` (If/Loop/Scan, and rarely a custom-domain op)."""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in STANDARD_DOMAINS:
        return  # only control flow carries subgraphs among standard ops: skip the attribute scan elsewhere
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every body graph of its nodes, depth first."""
    yield graph
    for node in graph.node:
        for body in bodies(node):
            yield from iter_graphs(body)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """All nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        yield node
        for body in bodies(node):
            yield from iter_nodes(body)


def _is_standard_node(node: onnx.NodeProto) -> bool:
    """A node that a built-in ONNX schema (not one of ours) describes."""
    if node.domain not in STANDARD_DOMAINS:
        return False
    domain = canonical_domain(node.domain)
    if (domain, node.op_type) in _SCHEMA_SPECS:
        return False
    return _defs.has(node.op_type, domain)


NODE_STANDARD = "standard"
NODE_CONTRIB = "contrib"
NODE_KNOWN = "known-custom"
NODE_UNKNOWN = "unknown-custom"


def classify_nodes(proto: onnx.ModelProto, registry: CustomOpRegistry) -> dict[str, Any]:
    """The custom-op census of a model: each node standard, onnxruntime contrib, known or unknown custom op.

    Returns ``{"nodes": {key: {"class", "domain", "op_type", "spec"}}, "counts": {class: n}, "known": [...],
    "unknown": [...]}``; a node's key is its name, or ``#<index>`` (depth-first over subgraphs) when unnamed.
    """
    nodes: dict[str, dict[str, Any]] = {}
    counts = {NODE_STANDARD: 0, NODE_CONTRIB: 0, NODE_KNOWN: 0, NODE_UNKNOWN: 0}
    known: set[str] = set()
    unknown: set[str] = set()
    classes: dict[tuple[str, str], tuple[str, str | None]] = {}  # (class, spec key) per (domain, op type)
    for index, node in enumerate(iter_nodes(proto.graph)):
        domain = canonical_domain(node.domain)
        label = f"{domain}::{node.op_type}" if domain else node.op_type
        key = (node.domain, node.op_type)
        if key not in classes:
            cls = op_class(node, registry)
            spec = registry.lookup(domain, node.op_type) if cls == NODE_KNOWN else None
            classes[key] = cls, spec and f"{canonical_domain(spec.domain) or 'ai.onnx'}::{spec.op_type}"
        cls, spec_key = classes[key]
        if cls == NODE_KNOWN:
            known.add(label)
        elif cls == NODE_UNKNOWN:
            unknown.add(label)
        counts[cls] += 1
        name = node.name or f"#{index}"
        if name in nodes:
            name = f"{name}#{index}"
        nodes[name] = {"class": cls, "domain": node.domain, "op_type": node.op_type, "spec": spec_key}
    return {"nodes": nodes, "counts": counts, "known": sorted(known), "unknown": sorted(unknown)}


def op_class(node: onnx.NodeProto, registry: CustomOpRegistry) -> str:
    """The class of one node: NODE_STANDARD, NODE_CONTRIB, NODE_KNOWN or NODE_UNKNOWN."""
    spec = registry.lookup(node.domain, node.op_type)
    if spec is None and _is_standard_node(node):
        return NODE_STANDARD
    if spec is not None:
        return NODE_KNOWN
    if canonical_domain(node.domain) in ORT_CONTRIB_DOMAINS:
        return NODE_CONTRIB
    return NODE_UNKNOWN


def node_classes(graph: onnx.GraphProto, registry: CustomOpRegistry) -> list[str]:
    """The class of each node of ``graph`` (not its subgraphs), in order; cheap: one lookup per op type."""
    cache: dict[tuple[str, str], str] = {}
    out = []
    for node in graph.node:
        key = (node.domain, node.op_type)
        cls = cache.get(key)
        if cls is None:
            cls = cache[key] = op_class(node, registry)
        out.append(cls)
    return out
