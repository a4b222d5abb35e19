"""The emitter: names, shared constants, element types of what it emits."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from onnxgrad.autodiff.emitter import Emitter, GraphInfo


def emitter(**dtypes: int) -> Emitter:
    return Emitter(GraphInfo(dtypes=dict(dtypes)), opset=18).scoped("n_grad/")


def test_element_types_follow_the_data_not_the_condition():
    b = emitter(c=TensorProto.BOOL, x=TensorProto.DOUBLE)
    picked = b.Where("c", "x", b.const(0.0, like="x"))
    assert b.dtype(picked) == TensorProto.DOUBLE
    # A constant typed like the result is of the data's type, not bool.
    assert b.const(0.0, like=picked) == b.const(0.0, like="x")
    assert b.dtype(b.Greater("x", "x")) == TensorProto.BOOL
    assert b.dtype(b.Shape("x")) == TensorProto.INT64
    assert b.dtype(b.Cast("x", to=TensorProto.FLOAT16)) == TensorProto.FLOAT16


def test_outputs_after_the_first_are_typed_only_when_known():
    b = emitter(x=TensorProto.FLOAT, k=TensorProto.INT64)
    values, indices = b.op("TopK", "x", "k", outputs=2)
    assert b.dtype(values) == TensorProto.FLOAT
    assert b.info.dtypes[indices] == TensorProto.INT64
    parts = b.op("Split", "x", outputs=2, axis=0, num_outputs=2)
    assert [b.info.dtypes[p] for p in parts] == [TensorProto.FLOAT] * 2


def test_names_are_scoped_and_constants_shared():
    b = emitter(x=TensorProto.FLOAT)
    first = b.Neg("x")
    second = b.Neg("x")
    assert first.startswith("n_grad/Neg") and first != second
    other = b.scoped("m_grad/")
    assert other.const(2.0, like="x") == b.const(2.0, like="x")
    assert all(isinstance(n, onnx.NodeProto) for n in b.nodes)
