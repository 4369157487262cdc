"""ModelHandle: loading once, lazy conversions, external data, atomic saves, bad files."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import toymodels

from qdqkit.errors import UserError
from qdqkit.model import ModelHandle, save_model, structure_only


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(toymodels.plugin_model(), path)
    return path


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_conversions_are_lazy_and_counted(model_file):
    handle = ModelHandle.load(model_file)
    assert handle.conversions == 0 and handle.form == "proto"
    handle.proto.graph.node[0].name = "renamed"  # in-place edits of the current form cost nothing
    assert handle.conversions == 0
    graph = handle.graph
    assert handle.conversions == 1 and handle.form == "graph"
    assert graph.nodes[0].name == "renamed"
    assert handle.graph is graph and handle.conversions == 1
    assert handle.node_count() == len(graph.nodes)
    handle.proto
    assert handle.conversions == 2 and handle.form == "proto"
    handle.set_graph(handle.graph)
    assert handle.conversions == 3


def test_save_is_atomic_and_leaves_no_temp_files(model_file, tmp_path):
    handle = ModelHandle.load(model_file)
    out = tmp_path / "out.onnx"
    handle.save(out)
    assert _listing(tmp_path) == ["in.onnx", "out.onnx"]
    assert onnx.load(out).SerializeToString() == handle.proto.SerializeToString()


@pytest.mark.parametrize("external", [False, True])
def test_only_a_durable_save_waits_for_the_disk(model_file, tmp_path, monkeypatch, external):
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    proto = onnx.load(str(model_file))
    save_model(proto, tmp_path / "scratch.onnx", external_data=external, durable=False)
    assert synced == []
    save_model(proto, tmp_path / "kept.onnx", external_data=external)
    assert len(synced) == (2 if external else 1)  # the data file and the model file
    for name in ("scratch.onnx", "kept.onnx"):
        back = onnx.load(str(tmp_path / name))
        assert back.graph.node == proto.graph.node
        for got, want in zip(back.graph.initializer, proto.graph.initializer, strict=True):
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(got), onnx.numpy_helper.to_array(want))


def test_failed_save_keeps_old_output_and_removes_temps(model_file, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    handle = ModelHandle.load(model_file)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        handle.save(out)
    assert out.read_bytes() == b"previous"
    assert _listing(tmp_path) == ["in.onnx", "out.onnx"]


def test_output_equal_to_input_is_refused(model_file):
    before = model_file.read_bytes()
    with pytest.raises(UserError, match="is the input model"):
        ModelHandle.load(model_file).save(model_file)
    with pytest.raises(UserError, match="is the input model"):
        ModelHandle.load(model_file).save(model_file.parent / "." / model_file.name)
    assert model_file.read_bytes() == before


def test_output_folder_missing_or_readonly(model_file, tmp_path):
    handle = ModelHandle.load(model_file)
    with pytest.raises(UserError, match="does not exist"):
        handle.save(tmp_path / "nope" / "out.onnx")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):
            with pytest.raises(UserError, match="not writable"):
                handle.save(ro / "out.onnx")
    finally:
        ro.chmod(0o700)
    # root passes the permission check: a folder the kernel refuses to write still gives one clear error
    with pytest.raises(UserError, match="cannot write|not writable"):
        handle.save("/proc/qdqkit-out.onnx")


def test_external_data_round_trip(tmp_path):
    model = toymodels.big_model(total_bytes=3 * 256 * 256 * 4, width=256)
    src = tmp_path / "ext.onnx"
    save_model(model, src, external_data=True)
    assert _listing(tmp_path) == ["ext.onnx", "ext.onnx.data"]
    assert src.stat().st_size < 20_000  # the weights went to the data file
    handle = ModelHandle.load(src)
    assert handle.source_external_data
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    handle.save(out_dir / "copy.onnx")  # external in, external out
    assert _listing(out_dir) == ["copy.onnx", "copy.onnx.data"]
    back = onnx.load(out_dir / "copy.onnx")
    for a, b in zip(model.graph.initializer, back.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    # in-memory model untouched by the streaming save
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in handle.proto.graph.initializer)


def test_structure_only_keeps_types_drops_bytes():
    model = toymodels.big_model(total_bytes=2 * 128 * 128 * 4, width=128)
    skel = structure_only(model)
    assert skel.ByteSize() < model.ByteSize() / 10
    assert [list(t.dims) for t in skel.graph.initializer] == [list(t.dims) for t in model.graph.initializer]


@pytest.mark.parametrize("content, message", [
    (b"this is not a protobuf at all \xff\xfe", "not a readable ONNX model|not an ONNX model"),
    (b"", "not an ONNX model"),
])
def test_bad_files(tmp_path, content, message):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message):
        ModelHandle.load(bad)


def test_truncated_file(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated|not an ONNX model"):
        ModelHandle.load(model_file)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ModelHandle.load(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="is a folder"):
        ModelHandle.load(tmp_path)


def test_missing_external_data_file(tmp_path):
    src = tmp_path / "ext.onnx"
    save_model(toymodels.big_model(total_bytes=256 * 256 * 4, width=256), src, external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(UserError, match="external data file 'ext.onnx.data'.*missing"):
        ModelHandle.load(src)


def test_streamed_inline_save_reads_back_identical(tmp_path, monkeypatch, toy_session):
    import qdqkit.model as qm

    model = toymodels.big_model(total_bytes=3 * 128 * 128 * 4, width=128)
    model.graph.initializer.insert(0, onnx.numpy_helper.from_array(np.arange(3, dtype=np.int64), "small_first"))
    monkeypatch.setattr(qm, "LIGHT_WEIGHTS", 1000)  # stream even this small model, tensor by tensor
    streamed = []
    real = qm._write_inline_streamed
    monkeypatch.setattr(qm, "_write_inline_streamed", lambda proto, f: streamed.append(1) or real(proto, f))
    save_model(model, tmp_path / "s.onnx")
    assert streamed == [1]  # the streamed writer, not one SerializeToString, wrote this file
    back = onnx.load(tmp_path / "s.onnx")
    assert back == model
    assert [t.name for t in back.graph.initializer] == [t.name for t in model.graph.initializer]
    onnx.checker.check_model(str(tmp_path / "s.onnx"))


def test_streamed_load_matches_onnx_load(tmp_path, monkeypatch):
    import qdqkit.model as qm

    model = toymodels.plugin_model(seed=4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(qm, "LIGHT_WEIGHTS", 100)  # every file takes the streamed reader
    read = []
    real = qm.read_model_streamed
    monkeypatch.setattr(qm, "read_model_streamed", lambda p: read.append(p) or real(p))
    assert ModelHandle.load(path).proto == onnx.load(path)
    save_model(model, tmp_path / "streamed.onnx")  # written tensor by tensor: two graph fields
    assert ModelHandle.load(tmp_path / "streamed.onnx").proto == model
    assert len(read) == 2  # both loads went through the streamed reader, not onnx.load


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.999])
def test_streamed_load_rejects_truncated_files(tmp_path, monkeypatch, cut):
    import qdqkit.model as qm

    path = tmp_path / "m.onnx"
    onnx.save(toymodels.plugin_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    monkeypatch.setattr(qm, "LIGHT_WEIGHTS", 100)
    with pytest.raises(UserError, match="corrupt or truncated|not an ONNX model"):
        ModelHandle.load(path)
    path.write_text("plain text, certainly not a model\n" * 10)
    with pytest.raises(UserError, match="corrupt or truncated|not an ONNX model"):
        ModelHandle.load(path)
