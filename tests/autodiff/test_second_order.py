"""Gradients of gradients: a gradient model is itself an ONNX model that can be differentiated.

For each case: the one-node op-table model M with loss L; its gradient model G (outputs
dL/dxₖ); a scalar S = Σₖ sum(rₖ · dL/dxₖ) appended to G with fixed random weights rₖ; then the
gradient of S (the Hessian of L applied to r) from gradient_model(G) is compared in float64
with central differences of S, that is, with finite differences of the first derivatives.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.gradcheck import check_gradients
from tests.optable import Case, away_from, build, distinct, params, positive, uniform


def _stats(c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(c)
    return rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 1.5, c)


SECOND = [
    Case("Add", [(3, 4), (4,)]),
    Case("Sub", [(3, 4), (3, 1)]),
    Case("Mul", [(3, 4), (4,)]),
    Case("Div", [(3, 4), (3, 4)], sampler=[uniform(), away_from([0.0], 0.5)]),
    Case("Pow", [(3, 4), (3, 4)], sampler=[positive(0.5, 2.0), uniform(-1.5, 1.5)]),
    Case("Exp", [(3, 4)]),
    Case("Log", [(3, 4)], sampler=positive()),
    Case("Sqrt", [(3, 4)], sampler=positive()),
    Case("Reciprocal", [(3, 4)], sampler=away_from([0.0], 0.4)),
    Case("Erf", [(3, 4)]),
    Case("Sin", [(3, 4)]),
    Case("Tanh", [(3, 4)]),
    Case("Sigmoid", [(3, 4)]),
    Case("Softplus", [(3, 4)]),
    Case("Gelu", [(3, 4)], opset=20),
    Case("Gelu", [(3, 4)], attrs={"approximate": "tanh"}, id="tanh", opset=20),
    Case("Swish", [(3, 4)], opset=24),
    Case("Relu", [(3, 4)], sampler=away_from([0.0])),
    Case("Softmax", [(2, 3, 4)], attrs={"axis": 1}),
    Case("LogSoftmax", [(3, 4)]),
    Case("MatMul", [(2, 3, 4), (4, 2)]),
    Case("Gemm", [(3, 4), (2, 4), (2,)], attrs={"transB": 1, "alpha": 0.7}),
    Case("Einsum", [(3, 4), (4, 2)], attrs={"equation": "ij,jk->ik"}),
    Case("Conv", [(1, 2, 4, 4), (3, 2, 3, 3), (3,)], attrs={"pads": [1, 1, 1, 1]}),
    Case(
        "Conv",
        [(1, 2, 5, 5), (2, 1, 2, 2)],
        attrs={"strides": [2, 2], "group": 2},
        id="strided_group",
    ),
    Case("AveragePool", [(1, 2, 4, 4)], attrs={"kernel_shape": [2, 2]}),
    Case("MaxPool", [(1, 2, 4, 4)], attrs={"kernel_shape": [2, 2]}, sampler=distinct()),
    Case("ReduceMean", [(2, 3, 4), np.array([1])]),
    Case("ReduceSum", [(2, 3, 4), np.array([0, 2])], attrs={"keepdims": 0}),
    Case("ReduceMax", [(2, 3, 4), np.array([1])], sampler=distinct()),
    Case("ReduceLogSumExp", [(2, 3, 4), np.array([-1])]),
    Case("ReduceL2", [(2, 3, 4), np.array([1])]),
    Case("LayerNormalization", [(2, 3, 4), (4,), (4,)]),
    Case("BatchNormalization", [(2, 3, 2, 2), (3,), (3,), *_stats(3)]),
    Case("InstanceNormalization", [(2, 3, 4), (3,), (3,)]),
    Case("Max", [(3, 4), (4,)], sampler=[distinct(), uniform(-0.3, 0.3)]),
    Case("Min", [(3, 4), (3, 4)], sampler=[distinct(), uniform(-0.3, 0.3)]),
    Case("Mod", [(3, 4), (3, 4)], attrs={"fmod": 1}, sampler=[uniform(-5, 5), positive(0.7, 2)]),
    Case("Compress", [(3, 4), np.array([True, False, True])], attrs={"axis": 0}),
    Case("CumProd", [(3, 4), np.array(1)], opset=26, sampler=away_from([0.0], 0.3)),
    Case("SwiGLU", [(3, 4), (3, 4)], opset=28),
    Case("Where", [np.array([[True, False, True, False]]), (3, 4), (3, 4)]),
    Case("Transpose", [(2, 3, 4)], attrs={"perm": [2, 0, 1]}),
    Case("Reshape", [(2, 3, 4), np.array([6, -1])]),
    Case("Concat", [(2, 3), (2, 2)], attrs={"axis": 1}),
    Case("Slice", [(4, 5), np.array([1]), np.array([4]), np.array([1])]),
    Case("Gather", [(5, 3), np.array([0, 2, 0, -1])]),
    Case("Pad", [(3, 4), np.array([1, 0, 0, 2])], attrs={"mode": "reflect"}),
    Case("Expand", [(3, 1), np.array([2, 3, 4])]),
    Case("Det", [(3, 3)]),
    Case("CumSum", [(3, 4), np.array(1)]),
    Case("Tan", [(3, 4)], sampler=uniform(-1.0, 1.0)),
    Case("Asin", [(3, 4)], sampler=uniform(-0.7, 0.7)),
    Case("Atanh", [(3, 4)], sampler=uniform(-0.7, 0.7)),
    Case("Cosh", [(3, 4)]),
    Case("Abs", [(3, 4)], sampler=away_from([0.0])),
    Case("Elu", [(3, 4)], sampler=away_from([0.0])),
    Case("Selu", [(3, 4)], sampler=away_from([0.0])),
    # onnx types Celu for float32 only, and MeanVarianceNormalization's function body holds
    # float32 constants: onnx's full check rejects both in a float64 model.
    Case("Celu", [(3, 4)], sampler=away_from([0.0]), full_check=False),
    Case("Softsign", [(3, 4)], sampler=away_from([0.0])),
    Case("Mish", [(3, 4)]),
    Case("LeakyRelu", [(3, 4)], sampler=away_from([0.0])),
    Case("HardSigmoid", [(3, 4)], sampler=away_from([-2.5, 2.5])),
    Case("HardSwish", [(3, 4)], sampler=away_from([-3.0, 3.0], low=-4, high=4)),
    Case("Clip", [(3, 4), np.array(-0.5), np.array(0.7)], sampler=away_from([-0.5, 0.7], 0.05)),
    Case("PRelu", [(3, 4), (4,)], sampler=[away_from([0.0]), uniform(0.1, 0.5)]),
    Case("ConvTranspose", [(1, 2, 3, 3), (2, 3, 2, 2), (3,)], attrs={"strides": [2, 2]}),
    Case("GlobalAveragePool", [(2, 3, 2, 2)]),
    Case("LpPool", [(1, 2, 4, 4)], attrs={"kernel_shape": [2, 2], "p": 2}),
    Case("ReduceProd", [(2, 3, 4), np.array([1])], sampler=away_from([0.0], 0.3)),
    Case("ReduceL1", [(2, 3, 4), np.array([1])], sampler=away_from([0.0])),
    Case("ReduceSumSquare", [(2, 3, 4), np.array([1])]),
    Case("ReduceLogSum", [(2, 3, 4), np.array([1])], sampler=positive()),
    Case("GroupNormalization", [(2, 4, 3), (4,), (4,)], attrs={"num_groups": 2}, opset=21),
    Case("RMSNormalization", [(2, 3, 4), (4,)], opset=23),
    Case("LpNormalization", [(3, 4)]),
    Case("LRN", [(2, 5, 2, 2)], attrs={"size": 3}),
    Case("MeanVarianceNormalization", [(2, 3, 2, 2)], full_check=False),
    Case("Tile", [(2, 3), np.array([2, 3])]),
    Case("Split", [(4, 3), np.array([1, 3])], outputs=2),
    Case("Squeeze", [(3, 1, 4), np.array([1])]),
    Case("GatherElements", [(3, 4), np.array([[0, 2, 1, 0], [2, 2, 0, 1]])]),
    Case("GatherND", [(3, 4), np.array([[0, 1], [2, -1], [0, 1]])]),
    Case("ScatterElements", [(3, 4), np.array([[0, 2, 1, 0]]), (1, 4)], attrs={"axis": 0}),
    Case("TopK", [(3, 5), np.array([2])], outputs=2, sampler=distinct()),
    Case("Trilu", [(3, 4)]),
    Case("SoftmaxCrossEntropyLoss", [(3, 5), np.array([1, 4, 0])]),
    Case("NegativeLogLikelihoodLoss", [(3, 5), np.array([1, 4, 0])]),
    Case("CastLike", [(3, 4), np.zeros((), np.float64)]),
    Case("Mean", [(3, 4), (4,)]),
    Case("CenterCropPad", [(4, 5), np.array([2, 7])]),
    Case("ReverseSequence", [(4, 3, 2), np.array([4, 1, 3])]),
    Case("Attention", [(1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 3), (3, 4)], opset=23),
    Case(
        "Attention",
        [(1, 4, 3, 2), (1, 2, 3, 2), (1, 2, 3, 2)],
        attrs={"is_causal": 1, "softcap": 2.0},
        id="gqa_causal_softcap",
        opset=23,
    ),
    Case(
        "RotaryEmbedding",
        [
            (1, 2, 3, 4),
            np.cos(np.arange(6.0).reshape(3, 2)),
            np.sin(np.arange(6.0).reshape(3, 2)),
            np.array([[0, 2, 1]]),
        ],
        wrt=[0],
        opset=23,
        full_check=False,
    ),
    Case(
        "Resize",
        [(1, 1, 3, 4), np.zeros(0), np.array([1.0, 1.0, 2.0, 1.5])],
        attrs={"mode": "cubic"},
        full_check=False,
    ),
    Case(
        "MaxUnpool",
        [(1, 1, 2, 2), np.array([[[[0, 3], [9, 14]]]])],
        attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
    ),
    Case("AffineGrid", [(2, 2, 3), np.array([2, 1, 3, 4])], opset=20),
    Case(
        "GridSample",
        [(1, 2, 3, 4), np.random.default_rng(0).uniform(-1, 1, (1, 3, 2, 2))],
        opset=20,
    ),
    Case("TensorScatter", [(2, 5, 3), (2, 2, 3), np.array([1, 3])], attrs={"axis": 1}, opset=24),
    Case("Unique", [(3, 4)], sampler=distinct()),
    Case("Col2Im", [(1, 4, 6), np.array([3, 4]), np.array([2, 2])]),
    Case("DFT", [(2, 6, 1)], attrs={"onesided": 1}, opset=20),
    Case("STFT", [(1, 8, 2), np.array(2), np.hamming(4)], attrs={"onesided": 0}, opset=17),
    Case(
        "MaxRoiPool",
        [(1, 2, 4, 5), np.array([[0, 0.4, 1.2, 4.2, 3.9]])],
        attrs={"pooled_shape": [2, 2]},
        sampler=distinct(),
    ),
    Case(
        "RoiAlign",
        [(1, 2, 4, 5), np.array([[0.3, 0.4, 2.6, 2.2]]), np.array([0])],
        attrs={"output_height": 2, "output_width": 2},
        opset=16,
    ),
    Case(
        "DequantizeLinear",
        [np.arange(12, dtype=np.uint8).reshape(3, 4), (3,)],
        attrs={"axis": 0},
        sampler=positive(0.1, 0.5),
        full_check=False,
    ),
]


def _second_model(case: Case):
    """M's gradient model with the scalar S = Σₖ sum(rₖ · dL/dxₖ) as its only output."""
    model, feeds, wrt = build(case, np.float64)
    grad = gradient_model(model, wrt=wrt)
    graph = grad.graph
    # The second gradient model names its outputs `<w>_grad` too: the first ones move aside.
    # TODO: drop this once the builder picks a fresh output name when `<w>_grad` is taken.
    first = {f"{w}_grad": f"{w}_grad1" for w in wrt}
    for node in graph.node:
        node.input[:] = [first.get(i, i) for i in node.input]
        node.output[:] = [first.get(o, o) for o in node.output]
    for vi in list(graph.output) + list(graph.value_info):
        vi.name = first.get(vi.name, vi.name)
    rng = np.random.default_rng(1)
    terms = []
    for k, w in enumerate(wrt):
        r = numpy_helper.from_array(rng.standard_normal(feeds[w].shape), f"second_r{k}")
        graph.initializer.append(r)
        graph.node.append(helper.make_node("Mul", [f"{w}_grad1", r.name], [f"second_p{k}"]))
        graph.node.append(
            helper.make_node("ReduceSum", [f"second_p{k}"], [f"second_s{k}"], keepdims=0)
        )
        terms.append(f"second_s{k}")
    graph.node.append(helper.make_node("Sum", terms, ["S"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("S", onnx.TensorProto.DOUBLE, []))
    return grad, feeds, wrt


@pytest.mark.parametrize("case", params(SECOND))
def test_second_order(case):
    second, feeds, wrt = _second_model(case)
    onnx.checker.check_model(gradient_model(second, wrt=wrt), full_check=case.full_check)
    for report in check_gradients(second, feeds, wrt=wrt, loss="S", eps=1e-5):
        assert report.ok(1e-5, 1e-7), (
            f"{case.label}: d S/d {report.name} ({report.mode}) off by "
            f"{report.abs_error:.3g} (rel {report.rel_error:.3g})\n"
            f"analytic {report.analytic[:6]}\nnumeric  {report.numeric[:6]}"
        )
