"""Op table for normalization and Dropout rules: float64 finite differences and onnxruntime
parity, plus the cases a one-node table cannot express (LayerNormalization statistics in the
loss, Dropout's run-time training flag, the missing-mask error)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxgrad import gradient_model
from onnxgrad.errors import UnsupportedOpError
from onnxgrad.gradcheck import check_gradients
from onnxgrad.runtime.session import Session
from tests.optable import Case, away_from, check_case, params


def stats(c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed running statistics of c channels: a mean and a positive variance."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 1.5, c)


def bn(shape: tuple, **kw) -> Case:
    mean, var = stats(shape[1], len(shape))
    return Case("BatchNormalization", [shape, (shape[1],), (shape[1],), mean, var], **kw)


CASES = [
    # BatchNormalization, inference: mean and var are constants without gradients.
    bn((4, 3), id="rank2"),
    bn((2, 3, 4), id="rank3"),
    bn((2, 3, 2, 3), id="rank4"),
    bn((2, 2, 2, 2, 3), id="rank5"),
    bn((2, 3, 2, 3), id="epsilon", attrs={"epsilon": 0.1}),
    bn((2, 3, 4), id="dynamic", dynamic=True),
    bn((2, 3, 2, 2), id="x_only", wrt=[0]),
    # Training mode: batch statistics; the running statistics are outputs 1 and 2.
    bn((4, 3), id="train_rank2", attrs={"training_mode": 1}, outputs=3, loss_outputs=[0]),
    bn((2, 3, 2, 2), id="train_rank4", attrs={"training_mode": 1}, outputs=3, loss_outputs=[0]),
    bn((2, 3, 2, 2), id="train_running", attrs={"training_mode": 1, "momentum": 0.7}, outputs=3),
    bn(
        (2, 3, 4),
        id="train_dynamic",
        attrs={"training_mode": 1},
        outputs=3,
        loss_outputs=[0],
        dynamic=True,
    ),
    # LayerNormalization (opset 17): axis, epsilon, optional bias, broadcast scale.
    Case("LayerNormalization", [(3, 4), (4,), (4,)], id="last", opset=17),
    Case("LayerNormalization", [(2, 3, 4), (3, 4), (3, 4)], attrs={"axis": 1}, id="axis1"),
    Case("LayerNormalization", [(2, 3, 4), (3, 4), (3, 4)], attrs={"axis": -2}, id="neg_axis"),
    Case("LayerNormalization", [(2, 3, 4), (2, 3, 4), (2, 3, 4)], attrs={"axis": 0}, id="all"),
    Case("LayerNormalization", [(2, 3, 4), (4,)], attrs={"axis": -2}, id="bcast_scale_no_bias"),
    Case("LayerNormalization", [(2, 3, 4), (4,), (4,)], attrs={"epsilon": 0.3}, id="epsilon"),
    Case("LayerNormalization", [(2, 3, 4), (4,), (4,)], id="dynamic", dynamic=True),
    # The statistics outputs exist but only Y feeds the loss (they are float32, the stash
    # type, in the float64 model, so they cannot enter its loss; see the tests below).
    Case(
        "LayerNormalization", [(2, 3, 4), (4,), (4,)], outputs=3, loss_outputs=[0], id="stats_out"
    ),
    # InstanceNormalization.
    Case("InstanceNormalization", [(2, 3, 4), (3,), (3,)], id="rank3"),
    Case("InstanceNormalization", [(2, 2, 2, 3), (2,), (2,)], id="rank4"),
    Case(
        "InstanceNormalization", [(1, 2, 2, 2, 2), (2,), (2,)], attrs={"epsilon": 0.01}, id="rank5"
    ),
    Case("InstanceNormalization", [(2, 3, 4), (3,), (3,)], id="dynamic", dynamic=True),
    # RMSNormalization (opset 23).
    Case("RMSNormalization", [(3, 4), (4,)], opset=23, id="last"),
    Case("RMSNormalization", [(2, 3, 4), (3, 4)], attrs={"axis": 1}, opset=23, id="axis1"),
    Case(
        "RMSNormalization",
        [(2, 3, 4), (4,)],
        attrs={"axis": -2, "epsilon": 0.1},
        opset=23,
        id="bcast_scale",
    ),
    Case("RMSNormalization", [(2, 3, 4), (4,)], opset=23, id="dynamic", dynamic=True),
    # LpNormalization: |x| has a kink at 0 for p = 1.
    Case("LpNormalization", [(3, 4)], id="p2_last"),
    Case("LpNormalization", [(3, 4)], attrs={"axis": 0}, id="p2_axis0"),
    Case(
        "LpNormalization",
        [(2, 3, 4)],
        attrs={"p": 1, "axis": 1},
        id="p1",
        sampler=away_from([0.0], 0.2),
    ),
    Case(
        "LpNormalization",
        [(2, 3, 4)],
        attrs={"p": 1},
        id="p1_dynamic",
        dynamic=True,
        sampler=away_from([0.0], 0.2),
    ),
    # LRN: odd and even windows, the window wider than the channels.
    Case("LRN", [(2, 5, 2, 2)], attrs={"size": 3}, id="size3"),
    # onnxruntime's LRN takes odd sizes and 4-D inputs only.
    Case(
        "LRN",
        [(1, 4, 2, 3)],
        attrs={"size": 2, "alpha": 0.5, "beta": 0.6, "bias": 2.0},
        id="even",
        ort=False,
    ),
    Case("LRN", [(2, 3, 2, 2)], attrs={"size": 5, "alpha": 0.3, "beta": 0.9}, id="wide"),
    Case("LRN", [(2, 4, 3)], attrs={"size": 3, "alpha": 0.2}, id="rank3", ort=False),
    Case("LRN", [(1, 4, 2, 2)], attrs={"size": 3, "alpha": 0.4}, id="dynamic", dynamic=True),
    # Dropout in inference: the identity.
    Case("Dropout", [(3, 4)], id="plain"),
    Case("Dropout", [(3, 4), np.array(0.4), np.array(False)], outputs=2, id="inference_mask"),
    Case("Dropout", [(3, 4)], opset=11, attrs={"ratio": 0.2}, id="opset11"),
    # Dropout in training: a fixed seed makes every run draw the same mask. onnxruntime
    # draws other masks, so it is not compared.
    Case(
        "Dropout",
        [(3, 4), np.array(0.3), np.array(True)],
        outputs=2,
        attrs={"seed": 3},
        id="training",
        ort=False,
    ),
    Case(
        "Dropout",
        [(2, 3, 4), None, np.array(True)],
        outputs=2,
        attrs={"seed": 5},
        id="training_default_ratio",
        ort=False,
        dynamic=True,
    ),
]


# onnx's MeanVarianceNormalization function body holds float32 constants, so onnx's own
# type check (full_check) rejects every float64 model that uses it: those cases skip it.
CASES += [
    Case("GroupNormalization", [(2, 4, 3), (4,), (4,)], attrs={"num_groups": 2}, opset=21, id="g2"),
    Case(
        "GroupNormalization", [(2, 4, 2, 2), (4,), (4,)], attrs={"num_groups": 1}, opset=21, id="g1"
    ),
    Case(
        "GroupNormalization", [(1, 4, 2, 3), (4,), (4,)], attrs={"num_groups": 4}, opset=21, id="g4"
    ),
    Case(
        "GroupNormalization",
        [(2, 6, 2), (6,), (6,)],
        attrs={"num_groups": 3, "epsilon": 0.05},
        opset=21,
        id="dynamic",
        dynamic=True,
    ),
    Case("MeanVarianceNormalization", [(2, 3, 2, 2)], id="default_axes", full_check=False),
    Case(
        "MeanVarianceNormalization", [(2, 3, 4)], attrs={"axes": [2]}, id="last", full_check=False
    ),
    Case("MeanVarianceNormalization", [(3, 4)], attrs={"axes": [0, 1]}, id="all", full_check=False),
    Case(
        "MeanVarianceNormalization",
        [(2, 3, 4)],
        attrs={"axes": [-1, 0]},
        id="neg_axes",
        dynamic=True,
        full_check=False,
    ),
]


@pytest.mark.parametrize("case", params(CASES))
def test_gradient(case):
    check_case(case)


# LayerNormalization with its Mean and InvStdDev outputs in the loss.


def _layer_norm_model(dtype, stash_type: int) -> onnx.ModelProto:
    """loss = Σ r0·Y + Σ r1·Mean + Σ r2·InvStdDev, the statistics cast to x's type."""
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(dtype), f"r{k}")
        for k, s in enumerate([(2, 3, 4), (2, 1, 1), (2, 1, 1)])
    ]
    nodes = [
        helper.make_node(
            "LayerNormalization",
            ["x", "scale", "bias"],
            ["y", "mean", "inv"],
            name="ln",
            axis=1,
            stash_type=stash_type,
        ),
        helper.make_node("Cast", ["mean"], ["mean_x"], name="cast_mean", to=t),
        helper.make_node("Cast", ["inv"], ["inv_x"], name="cast_inv", to=t),
    ]
    terms = []
    for k, name in enumerate(["y", "mean_x", "inv_x"]):
        nodes.append(helper.make_node("Mul", [name, f"r{k}"], [f"w{k}"], name=f"weigh{k}"))
        nodes.append(
            helper.make_node("ReduceSum", [f"w{k}"], [f"l{k}"], name=f"sum{k}", keepdims=0)
        )
        terms.append(f"l{k}")
    nodes.append(helper.make_node("Sum", terms, ["loss"], name="total"))
    inputs = [
        helper.make_tensor_value_info("x", t, [2, 3, 4]),
        helper.make_tensor_value_info("scale", t, [3, 4]),
        helper.make_tensor_value_info("bias", t, [3, 4]),
    ]
    graph = helper.make_graph(
        nodes, "ln", inputs, [helper.make_tensor_value_info("loss", t, [])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ln_feeds(dtype):
    rng = np.random.default_rng(3)
    return {
        k: rng.uniform(-2, 2, s).astype(dtype)
        for k, s in [("x", (2, 3, 4)), ("scale", (3, 4)), ("bias", (3, 4))]
    }


def test_layer_norm_statistics_in_loss_float64():
    # stash_type=11 (double): the statistics are float64 and the rule reuses them.
    model = _layer_norm_model(np.float64, 11)
    for report in check_gradients(model, _ln_feeds(np.float64), wrt=["x", "scale", "bias"]):
        assert report.ok(1e-6, 1e-8), f"{report.name}: {report.abs_error}"


def test_layer_norm_statistics_in_loss_stash_narrower():
    # stash_type=1 with a float64 x: the statistics outputs are float32, too coarse for
    # finite differences, so the rule recomputes them in float64. Its gradient must match
    # the one of the float64-stash model, which test above checks numerically.
    feeds = _ln_feeds(np.float64)
    wrt = ["x", "scale", "bias"]
    names = [f"{w}_grad" for w in wrt]
    narrow = Session(gradient_model(_layer_norm_model(np.float64, 1), wrt=wrt))
    wide = Session(gradient_model(_layer_norm_model(np.float64, 11), wrt=wrt))
    for name, a, b in zip(names, narrow.run(names, feeds), wide.run(names, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_norm_statistics_in_loss_onnxruntime():
    model = _layer_norm_model(np.float32, 1)
    grad = gradient_model(model, wrt=["x", "scale", "bias"])
    names = [o.name for o in grad.graph.output]
    feeds = _ln_feeds(np.float32)
    ours = Session(grad).run(names, feeds)
    theirs = Session(grad, backend="onnxruntime").run(names, feeds)
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


# Dropout: training flag known only at run time, and the missing mask.


def _dropout_model(with_mask: bool, training_input: bool) -> onnx.ModelProto:
    t = onnx.TensorProto.DOUBLE
    outs = ["y", "mask"] if with_mask else ["y"]
    inputs = [helper.make_tensor_value_info("x", t, [3, 4])]
    inits = [numpy_helper.from_array(np.array(0.25), "ratio")]
    if training_input:
        inputs.append(helper.make_tensor_value_info("training", onnx.TensorProto.BOOL, []))
    else:
        inits.append(numpy_helper.from_array(np.array(True), "training"))
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "training"], outs, name="drop", seed=11),
        helper.make_node("ReduceSum", ["y"], ["loss"], name="sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "drop", inputs, [helper.make_tensor_value_info("loss", t, [])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("training", [True, False])
def test_dropout_runtime_training_flag(training):
    model = _dropout_model(with_mask=True, training_input=True)
    grad = gradient_model(model, wrt=["x"])
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4))
    feeds = {"x": x, "training": np.array(training)}
    mask, dx = Session(grad).run(["mask", "x_grad"], feeds)
    expected = mask / 0.75 if training else np.ones_like(x)
    np.testing.assert_allclose(dx, expected)
    if training:
        assert not mask.all()  # the seed draws some zeros in 12 elements at ratio 0.25


def test_dropout_training_without_mask_is_an_error():
    model = _dropout_model(with_mask=False, training_input=False)
    with pytest.raises(UnsupportedOpError, match=r"Dropout node 'drop' \(opset 18\) .*no mask"):
        gradient_model(model, wrt=["x"])
