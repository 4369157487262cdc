"""`ModelHandle`: one model in memory, as an ONNX ModelProto or a graphsurgeon Graph, loaded once.

Converting between the two forms costs a full copy of the graph, so the handle keeps whichever form was set
last as the authoritative one, converts only when the other is asked for, and counts conversions (a pipeline
run should need at most two). Models over 2 GB (protobuf's limit) are read and written with external data; the
input file is never written, and saving is atomic: temporary files in the target folder, renamed into place
only once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from qdqkit.errors import UserError

# protobuf refuses to serialize a message of 2 GiB or more; stay clear of it
PROTOBUF_LIMIT = 2**31 - 2**24
# tensors at least this large go to the external data file when one is written
EXTERNAL_THRESHOLD = 1024
# below this many bytes of weights, handing onnx the whole model is cheaper than building a data-less copy
LIGHT_WEIGHTS = 64 * 2**20
# a copy handed to ModelOpt keeps its weights in a side file past this size: lower than PROTOBUF_LIMIT on purpose,
# since the same flag decides how ModelOpt saves its output, which grows by the nodes and constants it adds
TOOL_COPY_EXTERNAL_BYTES = 1_800_000_000


class ModelHandle:
    """A model being transformed. Construct with ``ModelHandle.load(path)`` or ``ModelHandle(proto)``.

    ``proto`` and ``graph`` give the model in either form; reading one after the other was set converts once
    (``conversions`` counts it). Passes that change the model hand back the new form with ``set_proto`` /
    ``set_graph``, or mutate ``proto`` in place.
    """

    def __init__(self, proto: onnx.ModelProto | None = None, *, graph: Any = None,
                 source_path: str | os.PathLike | None = None, external_data: bool = False) -> None:
        if (proto is None) == (graph is None):
            raise ValueError("ModelHandle needs exactly one of proto or graph")
        self._proto = proto
        self._graph = graph
        self.conversions = 0
        self.source_path = Path(source_path).resolve() if source_path is not None else None
        self.source_external_data = external_data

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, external_weights: bool = True) -> ModelHandle:
        """Read an ONNX file and its external data. Bad files raise ``UserError`` with one clear line.

        ``external_weights=False`` checks that the external data files exist but leaves the tensors on disk
        (enough for inspecting structure; such a handle cannot be saved elsewhere).
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"model file not found: {path}")
        if path.is_dir():
            raise UserError(f"{path} is a folder, not an ONNX model file")
        if not os.access(path, os.R_OK):
            raise UserError(f"model file {path} is not readable")
        try:
            if path.stat().st_size >= LIGHT_WEIGHTS:
                proto = read_model_streamed(path)
            else:
                proto = onnx.load(str(path), load_external_data=False)
        except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, EOFError) as exc:
            raise UserError(f"{path} is not a readable ONNX model (corrupt or truncated protobuf: {exc})") from None
        if proto.ir_version == 0 or not proto.HasField("graph"):
            raise UserError(f"{path} is not an ONNX model (no IR version or graph); check the file")
        external = has_external_data(proto)
        if external:
            _check_external_files(proto, path.parent, path)
            if not external_weights:
                return cls(proto, source_path=path, external_data=True)
            try:
                onnx.load_external_data_for_model(proto, str(path.parent))
            except (OSError, ValueError, onnx.checker.ValidationError) as exc:
                raise UserError(f"cannot read the external data of {path}: {exc}") from None
        return cls(proto, source_path=path, external_data=external)

    # -- the two forms -------------------------------------------------------------------------------
    @property
    def proto(self) -> onnx.ModelProto:
        """The model as an ``onnx.ModelProto`` (converted from the Graph if that was set last)."""
        if self._proto is None:
            import onnx_graphsurgeon as gs

            self._proto = gs.export_onnx(self._graph, do_type_check=False)
            self._graph = None
            self.conversions += 1
        return self._proto

    @property
    def graph(self) -> Any:
        """The model as an ``onnx_graphsurgeon.Graph`` (converted from the proto if that was set last)."""
        if self._graph is None:
            import onnx_graphsurgeon as gs

            self._graph = gs.import_onnx(self._proto)
            self._proto = None
            self.conversions += 1
        return self._graph

    @property
    def form(self) -> str:
        """Which form is authoritative now: "proto" or "graph"."""
        return "proto" if self._proto is not None else "graph"

    def set_proto(self, proto: onnx.ModelProto) -> None:
        """Replace the model with ``proto`` (now authoritative)."""
        self._proto, self._graph = proto, None

    def set_graph(self, graph: Any) -> None:
        """Replace the model with a graphsurgeon ``graph`` (now authoritative)."""
        self._graph, self._proto = graph, None

    # -- cheap facts -----------------------------------------------------------------------------------
    def node_count(self) -> int:
        """Nodes of the main graph, in whichever form is current (no conversion)."""
        return len(self._proto.graph.node) if self._proto is not None else len(self._graph.nodes)

    def op_histogram(self) -> dict[str, int]:
        """Count of nodes per ``domain::op_type`` (the default domain written without prefix), no conversion."""
        counts: dict[str, int] = {}
        if self._proto is not None:
            items = ((n.domain, n.op_type) for n in self._proto.graph.node)
        else:
            items = ((n.domain or "", n.op) for n in self._graph.nodes)
        for domain, op in items:
            key = op if domain in ("", "ai.onnx") else f"{domain}::{op}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def byte_size(self) -> int:
        """Approximate serialized size, tensors included (safe past 2 GB: summed per part)."""
        return proto_size(self.proto)

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
        """Write the model atomically to ``path``; never onto the input file.

        External data (``<name>.data`` beside the model) is used when asked, when the input had it, or when the
        model is too large for a single protobuf.
        """
        path = Path(path)
        check_output_path(path, self.source_path)
        if external_data is None:
            external_data = self.source_external_data or proto_size(self.proto) >= PROTOBUF_LIMIT
        save_model(self.proto, path, external_data=external_data)
        return path


# ------------------------------------------------------------------------------------------------------------
# helpers shared with passes (no pass imports another pass; they meet here)
# ------------------------------------------------------------------------------------------------------------


def has_external_data(proto: onnx.ModelProto) -> bool:
    """Whether any initializer of the main graph keeps its data in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _external_location(t: onnx.TensorProto) -> str | None:
    for entry in t.external_data:
        if entry.key == "location":
            return entry.value
    return None


def _check_external_files(proto: onnx.ModelProto, base: Path, model_path: Path) -> None:
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = _external_location(t)
        if loc is None:
            raise UserError(f"{model_path}: tensor '{t.name}' is marked external but names no data file")
        data = base / loc
        if not data.is_file():
            raise UserError(
                f"external data file '{loc}' of {model_path} is missing (expected at {data}); "
                "copy it beside the model"
            )


def proto_size(proto: onnx.ModelProto) -> int:
    """Serialized size of a model, computed part by part so that models past 2 GB do not overflow."""
    g = proto.graph
    size = sum(tensor_bytes(t) for t in g.initializer)
    size += sum(n.ByteSize() for n in g.node)
    size += sum(f.ByteSize() for f in proto.functions)
    return size + 4096


def check_output_path(path: Path, source: Path | None) -> None:
    """Refuse an output that is the input, or whose folder is missing or not writable."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name such as {path / 'model.onnx'}")
    if source is not None:
        resolved = path.resolve()
        if resolved == source or (path.exists() and os.path.samefile(path, source)):
            raise UserError(f"output path {path} is the input model; choose another file name (the input is never "
                            "overwritten)")
        if resolved.parent == source.parent and resolved.name + ".data" == source.name:
            raise UserError(f"output path {path} would overwrite an external data file of the input")
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output folder {parent} is not writable")
    # permission bits do not tell the whole story (root, read-only mounts, /proc): probe with a real file
    try:
        fd, probe = tempfile.mkstemp(prefix=".qdqkit-probe-", dir=parent)
    except OSError as exc:
        raise UserError(f"output folder {parent} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False,
               durable: bool = True) -> None:
    """Write ``proto`` to ``path`` atomically, optionally with its large tensors in ``<name>.data``.

    The model in memory is not modified. With external data, the tensors are streamed one by one from the
    proto into the data file and only a data-less skeleton is serialized, so peak memory stays near the
    model's own size (``onnx.save`` with external data would rewrite the proto in place). ``durable`` flushes
    the files to the disk before they take their names; a scratch copy that a crash may lose goes without.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp_files: list[str] = []
    try:
        if external_data:
            location = path.name + ".data"
            fd, tmp_data = tempfile.mkstemp(prefix=f".{location}.", suffix=".tmp", dir=folder)
            tmp_files.append(tmp_data)
            with os.fdopen(fd, "wb") as f:
                skeleton = _write_external(proto, f, location)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            payload = skeleton.SerializeToString()
        elif proto_size(proto) >= PROTOBUF_LIMIT:
            raise UserError("model exceeds protobuf's 2 GB limit; save it with external data")
        elif weight_bytes(proto) < LIGHT_WEIGHTS:
            payload = proto.SerializeToString()
        else:
            payload = None  # streamed below, one tensor at a time
        fd, tmp_model = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        tmp_files.append(tmp_model)
        with os.fdopen(fd, "wb") as f:
            if payload is not None:
                f.write(payload)
            else:
                _write_inline_streamed(proto, f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        del payload
        if external_data:
            os.replace(tmp_data, folder / location)
        os.replace(tmp_model, path)
        tmp_files.clear()
    except PermissionError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}; choose a writable output folder") from None
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.ENOENT, errno.EPERM, errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    finally:
        for leftover in tmp_files:
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def _write_external(proto: onnx.ModelProto, f: Any, location: str) -> onnx.ModelProto:
    """Stream large main-graph initializers into ``f``; return a skeleton that refers to them."""
    skeleton = _shell(proto)
    sg = skeleton.graph
    graph = proto.graph
    offset = 0
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or tensor_bytes(t) < EXTERNAL_THRESHOLD:
            sg.initializer.append(t)
            continue
        data = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
        # 4 KiB alignment lets onnxruntime memory-map the tensors
        pad = (-offset) % 4096
        if pad:
            f.write(b"\0" * pad)
            offset += pad
        f.write(data)
        st = sg.initializer.add()
        st.name = t.name
        st.data_type = t.data_type
        st.dims.extend(t.dims)
        if t.doc_string:
            st.doc_string = t.doc_string
        st.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = st.external_data.add()
            entry.key, entry.value = key, value
        offset += len(data)
        del data
    return skeleton


ELIDED_LOCATION = "qdqkit-elided.bin"


def inferred_structure(proto: onnx.ModelProto, fresh: bool = False, **kwargs: Any) -> onnx.ModelProto:
    """ONNX shape inference of ``proto`` (``kwargs`` as ``onnx.shape_inference.infer_shapes`` takes them), run on a
    copy without the bytes of its large weights where they are heavy: onnx serializes what it is given, which
    fails past 2 GB and costs time before. The result carries the types and shapes (``value_info``, outputs), not
    the weights. ``fresh``: the model's declared ``value_info`` is dropped first, so every intermediate type and
    shape is what the ops derive (onnx otherwise keeps a declared one and merges leniently)."""
    return onnx.shape_inference.infer_shapes(inference_subject(proto, fresh), **kwargs)


def inference_subject(proto: onnx.ModelProto, fresh: bool = False, hints: Any = ()) -> onnx.ModelProto:
    """What onnx's shape inference is handed (``inferred_structure``, and callers that try several inference
    options, which build it once: inference leaves it unchanged): ``proto`` itself, or a copy without its heavy
    weights' bytes; ``fresh`` as in ``inferred_structure``. ``hints``: value_info entries added to the copy under
    names it declares nothing for (types the caller knows and onnx cannot derive, a custom op's outputs, say)."""
    subject = proto if weight_bytes(proto) < LIGHT_WEIGHTS else structure_only(proto)
    if fresh or hints:
        if subject is proto:
            subject = onnx.ModelProto()
            subject.CopyFrom(proto)
        if fresh:
            del subject.graph.value_info[:]
        have = {v.name for v in subject.graph.value_info}
        subject.graph.value_info.extend(h for h in hints if h.name not in have)
    return subject


def adopt_inferred(proto: onnx.ModelProto, inferred: onnx.ModelProto) -> bool:
    """Take over (in place) the value_info and graph-output types that shape inference gave ``inferred``, a copy of
    ``proto`` (possibly without its weights); True if anything differs from before."""
    graph_io = {v.name for v in (*proto.graph.input, *proto.graph.output)} | {t.name for t in proto.graph.initializer}
    new = [v for v in inferred.graph.value_info if v.name not in graph_io]
    old = proto.graph.value_info
    changed = len(new) != len(old) or any(a != b for a, b in zip(old, new))
    if changed:
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(new)
    outputs = {o.name: o for o in inferred.graph.output}
    for out in proto.graph.output:
        fresh = outputs.get(out.name)
        if fresh is not None and fresh.type.HasField("tensor_type") and fresh.type != out.type:
            out.type.CopyFrom(fresh.type)
            changed = True
    return changed


def static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """``{tensor: (dims, elem_type)}`` for every typed tensor of ``graph`` (value_info, inputs, outputs: an
    inferred graph's) whose dimensions are all known numbers, and every initializer."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for vi in (*graph.value_info, *graph.input, *graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type and tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            out[vi.name] = (tuple(int(d.dim_value) for d in tt.shape.dim), tt.elem_type)
    for t in graph.initializer:
        out[t.name] = (tuple(t.dims), t.data_type)
    return out


def elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """``{tensor: elem_type}`` for every tensor ``graph`` types (value_info, inputs, outputs: an inferred graph's),
    every initializer, and the outputs of Constant nodes (typed by their value, also where nothing was inferred)."""
    out = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.value_info, *graph.input, *graph.output)}
    out.update({t.name: t.data_type for t in graph.initializer})
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t.data_type
    return out


def structure_only(proto: onnx.ModelProto, threshold: int = EXTERNAL_THRESHOLD) -> onnx.ModelProto:
    """A copy without the bytes of large initializers (dims and types kept), always under 2 GB.

    Enough for shape inference. The elided tensors are marked as external data in ``ELIDED_LOCATION`` at
    consecutive offsets, so ``run_checker`` can stand a sparse file of that size in for them.
    """
    skeleton = _shell(proto)
    sg = skeleton.graph
    offset = 0
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or tensor_bytes(t) < threshold:
            sg.initializer.append(t)
            continue
        st = sg.initializer.add()
        st.name, st.data_type = t.name, t.data_type
        st.dims.extend(t.dims)
        st.data_location = onnx.TensorProto.EXTERNAL
        length = _nbytes(t)
        for key, value in (("location", ELIDED_LOCATION), ("offset", str(offset)), ("length", str(length))):
            entry = st.external_data.add()
            entry.key, entry.value = key, value
        offset += length
    return skeleton


def _nbytes(t: onnx.TensorProto) -> int:
    count = 1
    for d in t.dims:
        count *= d
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return count * itemsize


_FIXED_WIDTH = {v for v in onnx.TensorProto.DataType.values()
                if v not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Size of a tensor's data from its dims and type; no copy (upb's ByteSize serializes the message)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if t.data_type in _FIXED_WIDTH:
        try:
            return _nbytes(t)
        except (KeyError, TypeError, ValueError):
            pass
    return t.ByteSize()


def weight_bytes(proto: onnx.ModelProto) -> int:
    """Serialized size of the main graph's initializers (no copy made)."""
    return sum(tensor_bytes(t) for t in proto.graph.initializer)


def run_checker(proto: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` without copying the weights (it checks their types, not their bytes).

    A model with more than ``LIGHT_WEIGHTS`` of weights (past 2 GB included) is checked from a data-less copy on
    disk whose external tensors point into a sparse file of the right size, so no weight is copied or written;
    a light model is handed over whole, which is cheaper.
    """
    if weight_bytes(proto) < LIGHT_WEIGHTS:
        onnx.checker.check_model(proto, full_check=full_check)
        return
    skeleton = structure_only(proto)
    end = 0
    for t in skeleton.graph.initializer:
        entries = {e.key: e.value for e in t.external_data}
        if entries.get("location") == ELIDED_LOCATION:
            end = max(end, int(entries["offset"]) + int(entries["length"]))
    with tempfile.TemporaryDirectory(prefix="qdqkit-check-") as folder:
        with open(os.path.join(folder, ELIDED_LOCATION), "wb") as f:
            f.truncate(end)
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(skeleton.SerializeToString())
        onnx.checker.check_model(path, full_check=full_check)


def is_large(proto: onnx.ModelProto) -> bool:
    """Whether the model cannot be serialized as one protobuf."""
    return proto_size(proto) >= PROTOBUF_LIMIT


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _shell(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the main graph's initializers (copied field by field, weights never)."""
    shell = onnx.ModelProto()
    _copy_fields(proto, shell, skip="graph")
    _copy_fields(proto.graph, shell.graph, skip="initializer")
    return shell


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def _write_inline_streamed(proto: onnx.ModelProto, f: Any) -> None:
    """Write ``proto`` as one protobuf without ever holding a serialized copy of all its weights.

    Protobuf merges repeated occurrences of an embedded message field, so the model is written as the
    data-less shell followed by a second ``graph`` field that holds only the initializers, each serialized on
    its own. Readers (onnx, onnxruntime, TensorRT's parser) see the same model.
    """
    shell = _shell(proto)
    f.write(shell.SerializeToString())
    del shell
    inits = proto.graph.initializer
    if not len(inits):
        return
    tag = _varint((_GRAPH_INITIALIZER << 3) | 2)
    sizes = [t.ByteSize() for t in inits]
    body = sum(len(tag) + len(_varint(n)) + n for n in sizes)
    f.write(_varint((_MODEL_GRAPH << 3) | 2))
    f.write(_varint(body))
    for t, n in zip(inits, sizes):
        f.write(tag)
        f.write(_varint(n))
        f.write(t.SerializeToString())


def _read_varint(f: Any) -> int | None:
    """One varint from ``f``; None at a clean end of file."""
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise EOFError("file ends inside a varint")
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _read_field(f: Any, tag: int) -> bytes:
    """The raw bytes of one field's value (after its tag), by wire type."""
    wire = tag & 7
    if wire == 0:
        value = _read_varint(f)
        if value is None:
            raise EOFError("file ends inside a field")
        return _varint(value)
    if wire == 1:
        data = f.read(8)
    elif wire == 5:
        data = f.read(4)
    elif wire == 2:
        n = _read_varint(f)
        if n is None:
            raise EOFError("file ends inside a field")
        data = f.read(n)
        if len(data) != n:
            raise EOFError("file ends inside a field")
        return _varint(n) + data
    else:
        raise ValueError(f"unsupported protobuf wire type {wire}")
    if len(data) != {1: 8, 5: 4}[wire]:
        raise EOFError("file ends inside a field")
    return data


def read_model_streamed(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file holding at most one weight tensor's bytes beside the model being built.

    ``onnx.load`` reads the whole file into memory and then parses it, so a large model briefly needs twice
    its size. Here the top-level fields are scanned on the wire: each main-graph initializer is parsed on its
    own straight into the model, everything else is gathered and parsed with protobuf as usual (protobuf
    merges repeated occurrences of the graph field, which is exactly what this reproduces).
    """
    model = onnx.ModelProto()
    rest = bytearray()
    with open(path, "rb", buffering=1 << 20) as f:
        while True:
            tag = _read_varint(f)
            if tag is None:
                break
            if tag >> 3 == _MODEL_GRAPH and tag & 7 == 2:
                length = _read_varint(f)
                if length is None:
                    raise EOFError("file ends inside the graph")
                graph_rest = bytearray()
                end = f.tell() + length
                while f.tell() < end:
                    inner = _read_varint(f)
                    if inner is None:
                        raise EOFError("file ends inside the graph")
                    if inner >> 3 == _GRAPH_INITIALIZER and inner & 7 == 2:
                        n = _read_varint(f)
                        data = f.read(n) if n is not None else b""
                        if n is None or len(data) != n:
                            raise EOFError("file ends inside an initializer")
                        model.graph.initializer.add().ParseFromString(data)
                        del data
                    else:
                        graph_rest += _varint(inner) + _read_field(f, inner)
                if f.tell() != end:
                    raise ValueError("graph field overruns its length")
                model.graph.MergeFromString(bytes(graph_rest))
            else:
                rest += _varint(tag) + _read_field(f, tag)
    model.MergeFromString(bytes(rest))
    return model
