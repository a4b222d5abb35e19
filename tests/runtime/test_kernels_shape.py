"""Shape kernels against onnxruntime (or onnx's reference evaluator).

Each KCase runs one node on onnxgrad's numpy kernels and on a reference and compares
dtype, shape and values. The reference is onnxruntime by default, or
`onnx.reference.ReferenceEvaluator` where onnxruntime lacks the op form (ref="onnx").
The helpers here are shared with test_kernels_index.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxgrad.runtime.session import Session


@dataclass
class KCase:
    """One forward kernel check.

    Attributes:
        op: the ONNX op type.
        inputs: per input, an array (a graph input) or None (absent).
        attrs: node attributes.
        id: a short label.
        outputs: how many outputs the node has.
        opset: the default-domain opset.
        ref: "ort" (onnxruntime) or "onnx" (the reference evaluator).
        view: the first output must share memory with the first input.
    """

    op: str
    inputs: Sequence[Any]
    attrs: dict = field(default_factory=dict)
    id: str = ""
    outputs: int = 1
    opset: int = 18
    ref: str = "ort"
    view: bool = False


def kparams(cases: Sequence[KCase]) -> list:
    """The cases as pytest params with unique readable ids."""
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        label = f"{case.op}-{case.id}" if case.id else case.op
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}-{seen[label]}"
        out.append(pytest.param(case, id=label))
    return out


def model_of(case: KCase) -> tuple[onnx.ModelProto, dict, list[str]]:
    """The one-node model of a case, its feeds and its output names."""
    names, inputs, inits, feeds = [], [], [], {}
    for i, value in enumerate(case.inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        value = np.asarray(value)
        names.append(name)
        if i > 0 and value.dtype == np.int64:  # shapes, axes, indices: constants, as in models
            inits.append(numpy_helper.from_array(value, name))
            continue
        feeds[name] = value
        dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
        inputs.append(helper.make_tensor_value_info(name, dtype, list(value.shape)))
    outs = [f"y{k}" for k in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, name="node", **case.attrs)
    graph = helper.make_graph([node], "kernel", inputs, [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type for vi in inferred.graph.value_info}
    for name in outs:
        vi = model.graph.output.add()
        vi.name = name
        if name in types:
            vi.type.CopyFrom(types[name])
        else:  # unknown to shape inference: the type of the first input
            vi.type.tensor_type.elem_type = inputs[0].type.tensor_type.elem_type
    return model, feeds, outs


def check_kernel(case: KCase) -> None:
    """Our outputs equal the reference's: same dtype, shape and values."""
    model, feeds, outs = model_of(case)
    ours = Session(model).run(outs, feeds)
    if case.ref == "ort":
        import onnxruntime

        sess = onnxruntime.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        theirs = sess.run(outs, feeds)
    else:
        theirs = ReferenceEvaluator(model).run(outs, feeds)
    for name, a, b in zip(outs, ours, theirs):
        b = np.asarray(b)
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} vs {b.shape}"
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
    if case.view:
        first = next(v for v in case.inputs if v is not None)
        assert np.shares_memory(ours[0], feeds["in0"]) or first.size == 0, "expected a view"


def _x(*shape, dtype=np.float32):
    n = int(np.prod(shape)) if shape else 1
    return (np.arange(n) - n // 3).reshape(shape).astype(dtype)


def _i(*values):
    return np.array(values, dtype=np.int64)


X = _x(2, 3, 4)
XI = _x(2, 3, 4, dtype=np.int32)
BIG = np.iinfo(np.int64).max

CASES = [
    # Reshape: 0 copies a dimension unless allowzero, -1 infers one.
    KCase("Reshape", [X, _i(4, -1)], view=True),
    KCase("Reshape", [X, _i(0, 12)], id="zero_copies", view=True),
    KCase("Reshape", [_x(0, 3), _i(3, 0)], attrs={"allowzero": 1}, id="allowzero"),
    KCase("Reshape", [XI, _i(-1)], id="int32"),
    KCase("Flatten", [X], view=True),
    KCase("Flatten", [X], attrs={"axis": 0}, id="axis0"),
    KCase("Flatten", [X], attrs={"axis": -1}, id="neg_axis"),
    KCase("Flatten", [X], attrs={"axis": 3}, id="axis_rank"),
    KCase("Transpose", [X], id="reverse", view=True),
    KCase("Transpose", [X], attrs={"perm": [1, 2, 0]}, id="perm"),
    KCase("Squeeze", [_x(1, 3, 1), _i(-1)], view=True),
    KCase("Squeeze", [_x(1, 3, 1)], id="all"),
    KCase("Squeeze", [_x(1, 3, 1)], attrs={"axes": [0]}, opset=11, id="attr"),
    KCase("Unsqueeze", [X, _i(0, -1)], view=True),
    KCase("Unsqueeze", [X, _i(1, 3)], id="middle"),
    KCase("Unsqueeze", [X], attrs={"axes": [-1]}, opset=11, id="attr"),
    KCase("Concat", [X, XI.astype(np.float32)[:, :1]], attrs={"axis": 1}),
    KCase("Concat", [XI, XI], attrs={"axis": -1}, id="neg_axis_int"),
    # Split: sizes as an input, an attribute, num_outputs (uneven last chunk), equal parts.
    KCase("Split", [X, _i(1, 3)], attrs={"axis": -1}, outputs=2, id="input", view=True),
    KCase("Split", [X], attrs={"axis": 2, "split": [3, 1]}, outputs=2, opset=11, id="attr"),
    KCase("Split", [_x(7, 2)], attrs={"num_outputs": 3}, outputs=3, id="uneven"),
    KCase("Split", [_x(6, 2)], outputs=3, opset=13, id="equal"),
    # Slice: negative starts and steps, clamping, omitted axes and steps.
    KCase("Slice", [X, _i(1), _i(3), _i(1)], view=True),
    KCase("Slice", [X, _i(-1, 0), _i(-BIG, 4), _i(2, 1), _i(-1, 1)], id="neg_step"),
    KCase("Slice", [X, _i(10), _i(-10), _i(-1), _i(-2)], id="clamp_neg_step"),
    KCase("Slice", [X, _i(-2, 0), _i(BIG, 100), None, _i(1, 2)], id="clamp_no_axes"),
    KCase("Slice", [X, _i(0, 1), _i(2, 3)], id="no_axes_steps"),
    KCase("Slice", [XI, _i(3), _i(0), _i(-1), _i(-3)], id="int_neg_step_stop"),
    KCase("Slice", [X], attrs={"starts": [1], "ends": [1000], "axes": [1]}, opset=9, id="attr"),
    KCase("Expand", [_x(3, 1), _i(2, 1, 4)]),
    KCase("Expand", [XI, _i(1, 1)], id="smaller_shape"),
    KCase("Tile", [X, _i(2, 1, 3)]),
    KCase("Tile", [XI, _i(1, 2, 1)], id="int"),
    # Pad: every mode, negative pads, the axes input of opset 18, opset 11 inputs.
    KCase("Pad", [X, _i(0, 1, 2, 1, 0, 3), np.array(1.5, np.float32)]),
    KCase("Pad", [X, _i(0, -1, 2, 0, 1, -1)], id="negative"),
    KCase("Pad", [X, _i(0, 2, 1, 0, 1, 2)], attrs={"mode": "reflect"}, id="reflect", opset=11),
    KCase("Pad", [X, _i(1, 3, 2, 1, 0, 3)], attrs={"mode": "edge"}, id="edge"),
    KCase(
        "Pad",
        [X, _i(1, 3, 3, 2), None, _i(-1, 1)],
        attrs={"mode": "wrap"},
        opset=19,
        id="wrap_axes",
    ),
    KCase("Pad", [X, _i(2, -1), np.array(7.0, np.float32), _i(-2)], id="axes_negative"),
    KCase("Pad", [XI, _i(0, 0, 1, 0, 0, 1), np.array(3, np.int32)], id="int"),
    KCase(
        "Pad", [X], attrs={"pads": [0, 1, 0, 0, 1, 0], "value": 2.0}, opset=2, id="attr", ref="onnx"
    ),
    KCase("DepthToSpace", [_x(1, 8, 2, 3)], attrs={"blocksize": 2}),
    KCase("DepthToSpace", [_x(2, 8, 2, 1)], attrs={"blocksize": 2, "mode": "CRD"}, id="crd"),
    KCase("SpaceToDepth", [_x(2, 2, 4, 6)], attrs={"blocksize": 2}),
    KCase("NonZero", [XI]),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)
