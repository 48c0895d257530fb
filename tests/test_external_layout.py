"""A model whose weights its file keeps in an external-data file is written in the same layout
(io/layout.py): permute then undo gives the source's bytes (all but the data file's name in the
model; the data file byte for byte; both files when the names agree), eager and lazy; resync -o and
audit -o keep the suspect's layout; a layout that cannot be kept is written as before and said so."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_resync import api, cli, io
from onnx_resync.io import layout, load as load_module


def _mlp(seed: int = 0, hidden: int = 24) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], name="head", transB=1),
    ]
    inits = [w("W1", 8, hidden), w("b1", hidden), w("W2", hidden, hidden), w("b2", hidden), w("W3", 4, hidden),
             w("b3", 4)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])


def _onnx_layout(folder: Path, name: str = "m.onnx") -> Path:
    """onnx.save's own external layout: every tensor in one file, back to back."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(_mlp(), folder / name, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=0)
    return folder / name


def _torch_layout(folder: Path, name: str = "m.onnx", align: int = 256, gap_byte: int = 0,
                  second_file: bool = False) -> Path:
    """A torch-like layout: tensors aligned (zero padding), written in another order than the
    initializers', the file padded at its end, one small tensor inline."""
    folder.mkdir(parents=True, exist_ok=True)
    model = _mlp()
    data = bytearray()
    for t in reversed(model.graph.initializer):
        if t.name == "b3":
            continue  # stays inline
        data += bytes([gap_byte]) * (-len(data) % align)
        offset, raw = len(data), t.raw_data
        data += raw
        location = name + (".extra" if second_file and t.name == "W1" else ".data")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            t.external_data.add(key=k, value=v)
    data += bytes(-len(data) % 4096)
    (folder / (name + ".data")).write_bytes(bytes(data))
    if second_file:
        (folder / (name + ".extra")).write_bytes(bytes(data))
    (folder / name).write_bytes(model.SerializeToString())
    return folder / name


def _locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}


def _same_but_location(out: Path, src: Path) -> bool:
    """out's model bytes are src's with src's data-file name for out's, and out's data file is src's."""
    (location,) = _locations(src)
    (written,) = _locations(out)
    m = onnx.load(str(out), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    return m.SerializeToString() == src.read_bytes() and \
        filecmp.cmp(out.parent / written, src.parent / location, shallow=False)


def _round_trip(src: Path, work: Path) -> tuple[Path, Path, Path]:
    work.mkdir()
    _, result = api.permute(src, work / "p.onnx", seed=3, record_path=work / "p.json")
    assert result.neurons_moved and not result.notes, result.notes
    api.permute(work / "p.onnx", work / "u.onnx", undo=work / "p.json")
    (work / "same").mkdir()
    api.permute(work / "p.onnx", work / "same" / src.name, undo=work / "p.json")
    return work / "p.onnx", work / "u.onnx", work / "same" / src.name


def _identical(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False) and filecmp.cmp(str(a) + ".data", str(b) + ".data", shallow=False)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("make", [_onnx_layout, _torch_layout], ids=["onnx_save", "torch_like"])
def test_permute_then_undo_keeps_the_layout(make, lazy, tmp_path, monkeypatch):
    if lazy:  # the huge-model path: big tensors mapped and streamed, small ones read in
        monkeypatch.setattr(load_module, "LAZY_EXTERNAL_BYTES", 0)
        monkeypatch.setattr(load_module, "LAZY_MIN_TENSOR_BYTES", 512)
    src = make(tmp_path / "src")
    assert io.is_lazy_model(io.load_model(src)) == lazy
    permuted, undone, same_name = _round_trip(src, tmp_path / "work")
    # the permuted file: the source's layout, other bytes (so the comparisons below can fail)
    assert _locations(permuted) == {"p.onnx.data"}
    assert os.path.getsize(str(permuted) + ".data") == os.path.getsize(str(src) + ".data")
    assert not _same_but_location(permuted, src)
    assert _same_but_location(undone, src)
    assert _identical(same_name, src)


def test_a_layout_that_cannot_be_kept_is_written_as_before_and_said(tmp_path):
    src = _torch_layout(tmp_path / "src", gap_byte=7)  # other bytes between the tensors: not ours to keep
    work = tmp_path / "work"
    work.mkdir()
    _, result = api.permute(src, work / "p.onnx", seed=3, record_path=work / "p.json")
    assert any("not in the input's layout" in n and "between the tensors" in n for n in result.notes)
    assert "between the tensors" in json.loads((work / "p.json").read_text())["notes"]["external_data"]
    assert not (work / "p.onnx.data").exists()  # a small model: inline, as before
    _, undo = api.permute(work / "p.onnx", work / "u.onnx", undo=work / "p.json")
    assert not undo.notes  # the permuted file had no external data
    store_src, store_u = io.WeightStore(io.load_model(src)), io.WeightStore(io.load_model(work / "u.onnx"))
    assert all(np.array_equal(store_src.get(n), store_u.get(n)) for n in store_src.names())
    src2 = _torch_layout(tmp_path / "src2", second_file=True)
    (tmp_path / "work2").mkdir()
    _, result = api.permute(src2, tmp_path / "work2" / "p.onnx", seed=3)
    assert any("2 data files" in n for n in result.notes)
    # a tensor that grew (say, a reduced model's): its file's layout no longer fits, the save says why
    model = io.load_model(_onnx_layout(tmp_path / "src3"))
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    assert layout.problem(model) is None
    w1.dims[1] += 1
    w1.raw_data = w1.raw_data + bytes(4 * w1.dims[0])
    assert "'W1' has" in layout.problem(model)
    io.save_model(model, tmp_path / "grown.onnx")
    assert not (tmp_path / "grown.onnx.data").exists()


@pytest.mark.parametrize("command", ["resync", "audit"])
def test_restored_outputs_keep_the_suspects_layout(command, tmp_path, capsys):
    src = _torch_layout(tmp_path / "src")
    reference = tmp_path / "reference.onnx"
    onnx.save(onnx.load(str(src)), reference)  # the same weights, inline
    work = tmp_path / "work"
    work.mkdir()
    api.permute(src, work / "suspect.onnx", seed=3)
    out = work / "out" / "m.onnx"
    out.parent.mkdir()
    assert cli.main([command, str(work / "suspect.onnx"), "--reference", str(reference), "-o", str(out),
                     "--device", "cpu"]) == 0, capsys.readouterr()
    assert _identical(out, src)  # the reference's neuron order in the suspect's layout
