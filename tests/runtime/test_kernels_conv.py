"""Conv, ConvTranspose and DeformConv kernels against onnxruntime over a grid of attributes.

onnxruntime runs these ops in float32 only, so float64 results are compared with its
float32 results on the same (float32-representable) inputs. Where onnxruntime refuses a
combination the spec allows (Conv with dilations and auto_pad=SAME_*), onnx's reference
evaluator is the judge. onnxruntime runs DeformConv in 2-D only; 1-D and 3-D DeformConv are
checked against a plain per-element loop written here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from onnxgrad.errors import ExecutionError
from onnxgrad.runtime.session import Session


def one_node(
    op: str, inputs: Sequence[np.ndarray], attrs: dict, outputs: int = 1, opset: int = 19
) -> onnx.ModelProto:
    """A model of one node whose inputs are graph inputs typed like the arrays given."""
    ins = [
        helper.make_tensor_value_info(f"in{i}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for i, a in enumerate(inputs)
    ]
    outs = [f"y{k}" for k in range(outputs)]
    node = helper.make_node(op, [i.name for i in ins], outs, name="node", **attrs)
    model = helper.make_model(
        helper.make_graph([node], "kernel", ins, []), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 9
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for name in outs:
        model.graph.output.append(inferred[name])
    return model


def reference(
    op: str,
    inputs: Sequence[np.ndarray],
    attrs: dict,
    outputs: int = 1,
    opset: int = 19,
    judge: str = "ort",
) -> list[np.ndarray]:
    """What onnxruntime (or the reference evaluator) computes; float64 runs as float32."""
    wide = [a.dtype == np.float64 for a in inputs]
    inputs = [a.astype(np.float32) if w else a for a, w in zip(inputs, wide)]
    model = one_node(op, inputs, attrs, outputs, opset)
    feeds = {f"in{i}": a for i, a in enumerate(inputs)}
    if judge == "ort":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        result = session.run(None, feeds)
    else:
        result = ReferenceEvaluator(model).run(None, feeds)
    if any(wide):
        result = [r.astype(np.float64) if r.dtype == np.float32 else r for r in result]
    return result


def check(
    op: str,
    inputs: Sequence[np.ndarray],
    attrs: dict,
    outputs: int = 1,
    opset: int = 19,
    judge: str = "ort",
    rtol: float = 1e-5,
) -> list[np.ndarray]:
    """Our outputs equal the judge's in dtype, shape and value; returns ours."""
    model = one_node(op, inputs, attrs, outputs, opset)
    ours = Session(model).run(None, {f"in{i}": a for i, a in enumerate(inputs)})
    theirs = reference(op, inputs, attrs, outputs, opset, judge)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype, f"output {k}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"output {k}: shape {a.shape} vs {b.shape}"
        scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=f"output {k}")
    return ours


def sample(shape, dtype=np.float32, seed=0) -> np.ndarray:
    """Standard normal values, rounded to float32 so both precisions see the same input."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


SPATIAL = {1: ([7], [3]), 2: ([6, 7], [3, 2]), 3: ([5, 4, 5], [2, 2, 3])}
GROUPS = {"g1": (1, 2, 3), "g2": (2, 4, 6), "depthwise": (4, 4, 4)}  # group, C, M
PADDINGS = ("none", "pads", "SAME_UPPER", "SAME_LOWER", "VALID")


def _padding(mode: str, nsp: int) -> dict:
    if mode == "pads":
        return {"pads": [1] * nsp + [2] * nsp}
    if mode == "none":
        return {}
    return {"auto_pad": mode}


CONV = []
for _nsp, _g, _s, _d, _mode in itertools.product((1, 2, 3), GROUPS, (1, 2, 3), (1, 2), PADDINGS):
    if _nsp == 3 and (_s, _d) == (3, 2):
        continue  # the kernel no longer fits the small 3-D input
    CONV.append(pytest.param(_nsp, _g, _s, _d, _mode, id=f"{_nsp}d-{_g}-s{_s}-d{_d}-{_mode}"))


@pytest.mark.parametrize("nsp, groups, stride, dilation, mode", CONV)
def test_conv(nsp, groups, stride, dilation, mode):
    group, c, m = GROUPS[groups]
    sizes, kernel = SPATIAL[nsp]
    attrs = dict(
        strides=[stride] * nsp, dilations=[dilation] * nsp, group=group, **_padding(mode, nsp)
    )
    if stride == 2:
        attrs["kernel_shape"] = kernel
    judge = "onnx" if dilation > 1 and mode.startswith("SAME") else "ort"
    x, w, b = sample((2, c, *sizes)), sample((m, c // group, *kernel), seed=1), sample((m,), seed=2)
    inputs = [x, w, b] if stride != 1 else [x, w]  # the bias is optional
    check("Conv", inputs, attrs, judge=judge)


@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_conv_float64(nsp):
    sizes, kernel = SPATIAL[nsp]
    attrs = {"strides": [2] * nsp, "pads": [1] * nsp + [0] * nsp, "group": 2}
    x, w = sample((2, 4, *sizes), np.float64), sample((4, 2, *kernel), np.float64, seed=1)
    (y,) = check("Conv", [x, w, sample((4,), np.float64, seed=2)], attrs)
    assert y.dtype == np.float64


@pytest.mark.parametrize(
    "x, w, attrs",
    [
        ((2, 3, 5, 5), (4, 3, 1, 1), {}),
        ((2, 4, 6, 7), (6, 2, 5, 6), {"group": 2}),  # more kernel taps than outputs
        ((3, 2, 9), (4, 2, 4), {"strides": [1], "dilations": [2], "pads": [0, 1]}),
        (
            (4, 2, 9, 8),
            (3, 2, 4, 3),
            {"dilations": [2, 2], "strides": [2, 3], "pads": [1, 0, 1, 1]},
        ),
        # Fewer output positions (N·out = 4) than output channels: the product runs
        # transposed, W as BLAS's rows (the weight gradient of a conv with many channels).
        ((1, 3, 8, 8), (6, 3, 7, 7), {}),
        ((1, 4, 8, 8), (10, 2, 7, 7), {"group": 2, "pads": [1, 0, 0, 1], "strides": [2, 3]}),
    ],
    ids=[
        "1x1",
        "big_kernel_group2",
        "big_kernel_1d",
        "big_kernel_dilated",
        "big_kernel_few_outputs",
        "big_kernel_few_outputs_group2",
    ],
)
def test_conv_layouts(x, w, attrs):
    (y,) = check("Conv", [sample(x), sample(w, seed=1)], attrs)
    assert y.dtype == np.float32 and y.flags.c_contiguous


@pytest.mark.parametrize(
    "op, x, w, attrs, message",
    [
        ("Conv", (1, 4, 5), (2, 4, 3), {"group": 2}, "group=2"),
        ("Conv", (1, 2, 3), (2, 2, 4), {}, "does not fit"),
        ("ConvTranspose", (1, 2, 2), (2, 2, 2), {"pads": [2, 2]}, "no output"),
    ],
)
def test_bad_geometry_is_an_execution_error(op, x, w, attrs, message):
    inputs = [sample(x), sample(w)]
    ins = [
        helper.make_tensor_value_info(f"in{i}", onnx.TensorProto.FLOAT, a.shape)
        for i, a in enumerate(inputs)
    ]
    out = helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, ["n", "c", "l"])
    node = helper.make_node(op, ["in0", "in1"], ["y0"], name="node", **attrs)
    model = helper.make_model(
        helper.make_graph([node], "bad", ins, [out]), opset_imports=[helper.make_opsetid("", 19)]
    )
    with pytest.raises(ExecutionError, match=message):
        Session(model).run(None, {"in0": inputs[0], "in1": inputs[1]})


CT_MODES = (
    "none",
    "pads",
    "output_padding",
    "output_shape",
    "output_shape_long",
    "SAME_UPPER",
    "SAME_LOWER",
    "VALID",
)
CT_SPATIAL = {1: ([4], [3]), 2: ([3, 4], [3, 2]), 3: ([3, 2, 3], [2, 2, 3])}


def _ct_attrs(mode: str, nsp: int, stride: int, sizes) -> dict:
    if mode == "pads":
        return {"pads": [1] * nsp + [0] * nsp}
    if mode == "output_padding":
        return {"pads": [0] * nsp + [1] * nsp, "output_padding": [stride - 1] * nsp}
    if mode == "output_shape":
        return {"output_shape": [stride * s - 1 for s in sizes]}
    if mode == "output_shape_long":  # longer than the full result: zeros at the end
        return {"output_shape": [stride * s + 1 for s in sizes]}
    if mode == "none":
        return {}
    return {"auto_pad": mode}


CONV_T = []
for _nsp, _g, _s, _d, _mode in itertools.product((1, 2, 3), GROUPS, (1, 2, 3), (1, 2), CT_MODES):
    if _mode == "output_padding" and _s == 1 and _d == 1:
        continue  # output_padding must stay below the stride or the dilation
    CONV_T.append(pytest.param(_nsp, _g, _s, _d, _mode, id=f"{_nsp}d-{_g}-s{_s}-d{_d}-{_mode}"))


@pytest.mark.parametrize("nsp, groups, stride, dilation, mode", CONV_T)
def test_conv_transpose(nsp, groups, stride, dilation, mode):
    group, c, m = GROUPS[groups]
    sizes, kernel = CT_SPATIAL[nsp]
    attrs = dict(
        strides=[stride] * nsp,
        dilations=[dilation] * nsp,
        group=group,
        **_ct_attrs(mode, nsp, stride, sizes),
    )
    x, w, b = sample((2, c, *sizes)), sample((c, m // group, *kernel), seed=1), sample((m,), seed=2)
    inputs = [x, w, b] if stride != 1 else [x, w]
    check("ConvTranspose", inputs, attrs)


@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_conv_transpose_float64(nsp):
    sizes, kernel = CT_SPATIAL[nsp]
    attrs = {"strides": [2] * nsp, "pads": [1] * nsp + [0] * nsp, "output_padding": [1] * nsp}
    x, w = sample((2, 3, *sizes), np.float64), sample((3, 2, *kernel), np.float64, seed=1)
    (y,) = check("ConvTranspose", [x, w], attrs)
    assert y.dtype == np.float64


# DeformConv: offsets of about ±1.5 pixels, so that some samples fall between pixels and
# some outside the input; "edges" offsets are whole and half pixels, landing on pixel
# centres, on cell borders and exactly on the input's last row and column.
DEFORM = {
    "plain": {"group": 1, "offset_group": 1, "c": 2, "m": 3},
    "groups": {"group": 2, "offset_group": 2, "c": 4, "m": 6},
    "offset_groups": {"group": 1, "offset_group": 2, "c": 4, "m": 2},
    "mixed_groups": {"group": 2, "offset_group": 4, "c": 4, "m": 2},
}
DEFORM_GEOMETRY = {
    "s1": {"strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0]},
    "s2-pads": {"strides": [2, 1], "dilations": [1, 1], "pads": [1, 0, 2, 1]},
    "dilated-pads": {"strides": [1, 2], "dilations": [2, 1], "pads": [1, 1, 1, 1]},
}


def deform_inputs(x, w, out, offset_group, scale=1.5, edges=False, dtype=np.float32, seed=5):
    """X, W, offset, B and mask for DeformConv with output sizes `out`."""
    rng = np.random.default_rng(seed)
    nsp, taps = len(x) - 2, math.prod(w[2:])
    shape = (x[0], offset_group * taps * nsp, *out)
    if edges:
        offset = rng.choice([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], shape)
    else:
        offset = rng.standard_normal(shape) * scale
    mask = rng.uniform(0.0, 1.0, (x[0], offset_group * taps, *out))
    return [
        sample(x, dtype),
        sample(w, dtype, seed=1),
        offset.astype(np.float32).astype(dtype),
        sample((w[0],), dtype, seed=2),
        mask.astype(np.float32).astype(dtype),
    ]


def _out_sizes(sizes, kernel, strides, dilations, pads):
    nsp = len(sizes)
    return [
        (sz + pads[i] + pads[i + nsp] - dilations[i] * (k - 1) - 1) // strides[i] + 1
        for i, (sz, k) in enumerate(zip(sizes, kernel))
    ]


@pytest.mark.parametrize("optional", ["none", "bias", "bias_mask"])
@pytest.mark.parametrize("geometry", DEFORM_GEOMETRY)
@pytest.mark.parametrize("groups", DEFORM)
def test_deform_conv(groups, geometry, optional):
    g, attrs = DEFORM[groups], DEFORM_GEOMETRY[geometry]
    kernel = [3, 2]
    out = _out_sizes([6, 7], kernel, attrs["strides"], attrs["dilations"], attrs["pads"])
    inputs = deform_inputs(
        (2, g["c"], 6, 7), (g["m"], g["c"] // g["group"], *kernel), out, g["offset_group"]
    )
    inputs = inputs[: {"none": 3, "bias": 4, "bias_mask": 5}[optional]]
    attrs = dict(attrs, group=g["group"], offset_group=g["offset_group"], kernel_shape=kernel)
    check("DeformConv", inputs, attrs, opset=22)


def test_deform_conv_mask_without_bias():
    out = _out_sizes([5, 5], [2, 2], [1, 1], [1, 1], [0, 0, 0, 0])
    x, w, offset, _, mask = deform_inputs((1, 2, 5, 5), (3, 2, 2, 2), out, 1)
    model = one_node("DeformConv", [x, w, offset, mask], {}, opset=22)
    model.graph.node[0].input[3:] = ["", "in3"]  # B absent, mask present
    (y,) = Session(model).run(None, {"in0": x, "in1": w, "in2": offset, "in3": mask})
    (want,) = reference("DeformConv", [x, w, offset, np.zeros(3, np.float32), mask], {}, opset=22)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deform_conv_on_pixel_and_cell_edges(dtype):
    attrs = {"pads": [1, 1, 1, 1], "offset_group": 2}
    out = _out_sizes([4, 5], [2, 2], [1, 1], [1, 1], attrs["pads"])
    x, w, offset, b, mask = deform_inputs((2, 2, 4, 5), (3, 2, 2, 2), out, 2, edges=True)
    inputs = [a.astype(dtype) for a in (x, w, offset, b, mask)]
    (y,) = check("DeformConv", inputs, attrs, opset=22)
    assert y.dtype == dtype


def deform_conv_loop(x, w, offset, b, mask, strides, dilations, pads, group, offset_group):
    """DeformConv one output element, one input channel and one kernel tap at a time."""
    n, c, *sizes = x.shape
    m, cw, *kernel = w.shape
    nsp = len(sizes)
    out = offset.shape[2:]
    taps = list(itertools.product(*(range(k) for k in kernel)))
    offset = offset.reshape(n, offset_group, len(taps), nsp, *out)
    mask = mask.reshape(n, offset_group, len(taps), *out)
    y = np.zeros((n, m, *out))
    for i, oc, o in itertools.product(range(n), range(m), itertools.product(*map(range, out))):
        total = 0.0 if b is None else float(b[oc])
        grp = oc // (m // group)
        for ci in range(cw):
            ch = grp * cw + ci
            og = ch // (c // offset_group)
            for t, tap in enumerate(taps):
                at = [
                    o[a] * strides[a]
                    - pads[a]
                    + tap[a] * dilations[a]
                    + float(offset[(i, og, t, a, *o)])
                    for a in range(nsp)
                ]
                value = 0.0
                for corner in itertools.product((0, 1), repeat=nsp):
                    where = [math.floor(p) + bit for p, bit in zip(at, corner)]
                    if not all(0 <= q < s for q, s in zip(where, sizes)):
                        continue
                    weight = math.prod(1 - abs(p - q) for p, q in zip(at, where))
                    value += weight * float(x[(i, ch, *where)])
                total += float(w[(oc, ci, *tap)]) * float(mask[(i, og, t, *o)]) * value
        y[(i, oc, *o)] = total
    return y


@pytest.mark.parametrize(
    "sizes, kernel, strides, dilations, pads, group, offset_group",
    [
        ([9], [3], [2], [1], [1, 2], 1, 2),
        ([8], [2], [1], [3], [0, 0], 2, 2),
        ([4, 5, 4], [2, 3, 2], [1, 2, 1], [1, 1, 2], [1, 0, 1, 0, 1, 1], 2, 1),
        ([3, 4, 4], [2, 2, 2], [2, 1, 1], [1, 1, 1], [0, 0, 0, 0, 0, 0], 1, 2),
    ],
    ids=["1d-offset_groups", "1d-dilated-groups", "3d-groups", "3d-offset_groups"],
)
def test_deform_conv_nd_against_loop(sizes, kernel, strides, dilations, pads, group, offset_group):
    out = _out_sizes(sizes, kernel, strides, dilations, pads)
    x, w, offset, b, mask = deform_inputs(
        (2, 4, *sizes), (4, 4 // group, *kernel), out, offset_group, dtype=np.float64
    )
    attrs = {"strides": strides, "dilations": dilations, "pads": pads, "group": group}
    attrs["offset_group"] = offset_group
    model = one_node("DeformConv", [x, w, offset, b, mask], attrs, opset=22)
    (y,) = Session(model).run(None, {f"in{i}": a for i, a in enumerate([x, w, offset, b, mask])})
    want = deform_conv_loop(x, w, offset, b, mask, strides, dilations, pads, group, offset_group)
    assert y.shape == want.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nsp", [1, 2, 3])
def test_deform_conv_with_zero_offsets_is_conv(nsp):
    sizes, kernel = SPATIAL[nsp]
    attrs = {
        "strides": [2] * nsp,
        "dilations": [1] * nsp,
        "pads": [1] * nsp + [0] * nsp,
        "group": 2,
    }
    out = _out_sizes(sizes, kernel, attrs["strides"], attrs["dilations"], attrs["pads"])
    x, w, _, b, _ = deform_inputs((2, 4, *sizes), (6, 2, *kernel), out, 2)
    offset = np.zeros((2, 2 * math.prod(kernel) * nsp, *out), np.float32)
    model = one_node("DeformConv", [x, w, offset, b], dict(attrs, offset_group=2), opset=22)
    (y,) = Session(model).run(None, {"in0": x, "in1": w, "in2": offset, "in3": b})
    (want,) = reference("Conv", [x, w, b], attrs)
    assert y.shape == want.shape and y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "offset_channels, attrs, message",
    [
        (7, {}, "offset has shape"),
        (8, {"group": 2}, "group=2"),
        (8, {"offset_group": 3}, "offset_group=3"),
    ],
)
def test_deform_conv_bad_shapes_are_execution_errors(offset_channels, attrs, message):
    x, w = sample((1, 2, 3, 3)), sample((1, 2, 2, 2), seed=1)
    offset = np.zeros((1, offset_channels, 2, 2), np.float32)
    ins = [
        helper.make_tensor_value_info(f"in{i}", onnx.TensorProto.FLOAT, a.shape)
        for i, a in enumerate([x, w, offset])
    ]
    out = helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])
    node = helper.make_node("DeformConv", ["in0", "in1", "in2"], ["y0"], name="node", **attrs)
    model = helper.make_model(
        helper.make_graph([node], "bad", ins, [out]), opset_imports=[helper.make_opsetid("", 22)]
    )
    with pytest.raises(ExecutionError, match=message):
        Session(model).run(None, {"in0": x, "in1": w, "in2": offset})
