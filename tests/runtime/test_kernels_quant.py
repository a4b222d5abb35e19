"""Quantization kernels against onnxruntime, onnx's reference evaluator, or, where neither runs
the op form, the spec's formula computed directly in numpy.

QuantizeLinear, DequantizeLinear and DynamicQuantizeLinear (integer, float8, float4 and 2- and
4-bit integer types), MatMulInteger, ConvInteger, QLinearMatMul and QLinearConv.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.runtime.session import Session
from tests.runtime.test_kernels_shape import KCase, check_kernel, kparams

X = np.linspace(-30.0, 40.0, 24, dtype=np.float32).reshape(2, 3, 4)
S = np.array(0.25, np.float32)
S3 = np.array([0.2, 0.5, 0.1], np.float32)
SB = np.random.default_rng(0).uniform(0.1, 0.5, (2, 3, 2)).astype(np.float32)
Q8 = np.arange(-12, 12, dtype=np.int8).reshape(2, 3, 4) * 5

CASES = [
    KCase("QuantizeLinear", [X, S], id="uint8_default"),
    KCase("QuantizeLinear", [X, S, np.array(10, np.int8)], id="int8_zp"),
    KCase("QuantizeLinear", [X, S3, np.array([0, 100, 200], np.uint8)], id="per_axis"),
    KCase("QuantizeLinear", [X, S, np.array(3, np.int16)], id="int16", opset=21),
    KCase(
        "QuantizeLinear",
        [X, S],
        attrs={"output_dtype": TensorProto.INT8},
        id="output_dtype",
        opset=21,
        ref="onnx",
    ),
    KCase(
        "QuantizeLinear",
        [X, SB, np.zeros((2, 3, 2), np.int8)],
        attrs={"axis": 2, "block_size": 2},
        id="blocked",
        opset=21,
        ref="onnx",
    ),
    KCase("DequantizeLinear", [Q8, S, np.array(-3, np.int8)], id="int8"),
    KCase("DequantizeLinear", [Q8.astype(np.int32), S], id="int32"),
    KCase(
        "DequantizeLinear",
        [(Q8 + 100).astype(np.uint8), S3, np.array([1, 2, 3], np.uint8)],
        id="per_axis",
    ),
    KCase(
        "DequantizeLinear",
        [Q8, SB, np.ones((2, 3, 2), np.int8)],
        attrs={"axis": -1, "block_size": 2},
        id="blocked",
        opset=21,
        ref="onnx",
    ),
    KCase("DynamicQuantizeLinear", [X], outputs=3),
    KCase("DynamicQuantizeLinear", [np.abs(X) + 1], outputs=3, id="positive"),
]


@pytest.mark.parametrize("case", kparams(CASES))
def test_kernel(case):
    check_kernel(case)


# Integer and quantized products against onnxruntime: random operands, several shapes.
_RNG = np.random.default_rng(7)


def _u8(*shape):
    return _RNG.integers(0, 256, shape).astype(np.uint8)


def _i8(*shape):
    return _RNG.integers(-128, 128, shape).astype(np.int8)


def _f(*values):
    return np.array(values, np.float32)


def _scalar(value, dtype):
    return np.array(value, dtype)


U, I = np.uint8, np.int8

PRODUCT_CASES = [
    KCase("MatMulInteger", [_u8(3, 5), _u8(5, 4), _scalar(7, U), _scalar(130, U)], opset=10),
    KCase("MatMulInteger", [_u8(2, 3, 6), _i8(6, 4), _scalar(9, U), _scalar(-3, I)], id="batch"),
    KCase("MatMulInteger", [_i8(4), _u8(4, 3), _scalar(-5, I), _u8(3)], id="vector_per_col"),
    KCase("MatMulInteger", [_i8(2, 3, 5), _i8(2, 5, 4)], id="no_zero_points"),
    KCase(
        "ConvInteger",
        [_u8(1, 2, 5, 5), _u8(3, 2, 3, 3), _scalar(4, U), _scalar(200, U)],
        attrs={"pads": [1, 1, 1, 1]},
        opset=10,
    ),
    KCase(
        "ConvInteger",
        [_u8(2, 4, 9), _i8(4, 2, 3), _scalar(128, U), _scalar(-7, I)],
        attrs={"group": 2, "strides": [2], "dilations": [2], "pads": [2, 1]},
        id="1d_group",
    ),
    KCase(
        "ConvInteger",
        [_i8(1, 2, 4, 5, 3), _i8(2, 2, 2, 3, 2)],
        attrs={"auto_pad": "SAME_UPPER"},
        id="3d_same",
    ),
    KCase(
        "QLinearConv",
        [_u8(1, 2, 5, 5), _f(0.02), _scalar(4, U), _u8(3, 2, 3, 3), _f(0.01), _scalar(2, U)]
        + [_f(0.3), _scalar(100, U)],
        opset=10,
    ),
    KCase(
        "QLinearConv",
        [_u8(2, 4, 6, 5), _f(0.05), _scalar(120, U), _i8(6, 2, 3, 3)]
        + [_RNG.uniform(0.001, 0.01, 6).astype(np.float32), np.zeros(6, I), _f(0.2)]
        + [_scalar(128, U), _RNG.integers(-3000, 3000, 6).astype(np.int32)],
        attrs={"group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1], "dilations": [1, 2]},
        id="per_channel_bias",
    ),
    KCase(
        "QLinearConv",
        [_i8(1, 3, 8), _f(0.03), _scalar(-4, I), _i8(2, 3, 3), _f(0.02), _scalar(0, I)]
        + [_f(0.5), _scalar(-10, I)],
        attrs={"auto_pad": "SAME_LOWER", "strides": [3]},
        id="1d_int8",
    ),
    KCase(
        "QLinearConv",
        [_u8(1, 2, 4, 4), _f(0.02), _scalar(9, U), _u8(3, 2, 2, 2), _f(0.01), _u8(3)]
        + [_f(0.1), _scalar(30, U)],
        id="per_channel_zero_point",
    ),
    KCase(
        "QLinearMatMul",
        [_u8(3, 5), _f(0.02), _scalar(4, U), _u8(5, 4), _f(0.01), _scalar(200, U)]
        + [_f(0.3), _scalar(100, U)],
        opset=10,
    ),
    KCase(
        "QLinearMatMul",
        [_u8(2, 3, 7), _f(0.04), _scalar(4, U), _i8(7, 4), _f(0.01), _scalar(2, I)]
        + [_f(0.05), _scalar(10, U)],
        id="batch_mixed",
    ),
    KCase(
        "QLinearMatMul",
        [_i8(2, 3, 5), _f(0.02), _scalar(4, I), _i8(2, 5, 4), _f(0.01), _scalar(-2, I)]
        + [_f(0.03), _scalar(10, I)],
        opset=21,
        id="int8_batch",
    ),
    KCase(
        "QLinearMatMul",
        [_u8(3, 5), _f(0.02), _scalar(4, U), _u8(5, 4), _f(0.01, 0.02, 0.03, 0.04), _u8(4)]
        + [_f(0.3), _scalar(100, U)],
        id="per_column",
    ),
    KCase(
        "QLinearMatMul",
        [_u8(3, 6), _f(0.02).astype(np.float16), _scalar(4, U), _u8(6, 4)]
        + [_f(0.01).astype(np.float16), _scalar(2, U), _f(0.07).astype(np.float16)]
        + [_scalar(100, U)],
        opset=21,
        id="float16_scales",
    ),
]


@pytest.mark.parametrize("case", kparams(PRODUCT_CASES))
def test_product_kernel(case):
    check_kernel(case)


def _run_ours(op: str, inputs: list, attrs: dict | None = None, opset: int = 21) -> np.ndarray:
    """One node on onnxgrad's executor, every input fed."""
    names = [f"in{i}" if v is not None else "" for i, v in enumerate(inputs)]
    infos = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
        for n, v in zip(names, inputs)
        if v is not None
    ]
    node = helper.make_node(op, names, ["y"], **(attrs or {}))
    graph = helper.make_graph([node], op, infos, [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    inferred = onnx.shape_inference.infer_shapes(model)
    out = next(vi for vi in inferred.graph.value_info if vi.name == "y")
    model.graph.output.append(out)
    feeds = {n: v for n, v in zip(names, inputs) if v is not None}
    return Session(model).run(["y"], feeds)[0]


def _conv_reference(x, w, pads, strides, dilations, group):
    """A direct convolution of int64 operands, one kernel tap at a time."""
    nsp = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    taps = w.shape[2:]
    out = [
        (xp.shape[2 + i] - dilations[i] * (taps[i] - 1) - 1) // strides[i] + 1 for i in range(nsp)
    ]
    cg, mg = x.shape[1] // group, w.shape[0] // group
    y = np.zeros((x.shape[0], w.shape[0], *out), np.int64)
    for tap in itertools.product(*(range(k) for k in taps)):
        window = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilations, out, strides)
        )
        patch = xp[(slice(None), slice(None)) + window]
        for g in range(group):
            wt = w[(slice(g * mg, (g + 1) * mg), slice(None)) + tap]
            y[:, g * mg : (g + 1) * mg] += np.einsum(
                "nc...,mc->nm...", patch[:, g * cg : (g + 1) * cg], wt
            )
    return y


# (x shape, w shape, pads, strides, dilations, group): onnxruntime's ConvInteger takes only a
# per-tensor w_zero_point, so the per-channel form is checked against the direct sum.
CONV_GEOMETRIES = [
    ((2, 4, 6, 5), (6, 2, 3, 3), [1, 0, 1, 2], [2, 1], [1, 2], 2),
    ((1, 3, 9), (4, 3, 2), [0, 3], [1], [3], 1),
    ((1, 2, 3, 4, 5), (2, 2, 2, 2, 3), [1, 0, 0, 0, 1, 1], [1, 2, 1], [1, 1, 2], 1),
]


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=["2d_group", "1d", "3d"])
@pytest.mark.parametrize("w_type", [np.uint8, np.int8])
def test_conv_integer_per_channel_zero_point(geometry, w_type):
    x_shape, w_shape, pads, strides, dilations, group = geometry
    x = _u8(*x_shape)
    w = (_u8 if w_type == np.uint8 else _i8)(*w_shape)
    x_zp = _scalar(131, U)
    w_zp = (_u8 if w_type == np.uint8 else _i8)(w_shape[0])
    attrs = {"pads": pads, "strides": strides, "dilations": dilations, "group": group}
    ours = _run_ours("ConvInteger", [x, w, x_zp, w_zp], attrs, opset=10)
    xc = x.astype(np.int64) - 131
    wc = w.astype(np.int64) - w_zp.astype(np.int64).reshape((-1,) + (1,) * (w.ndim - 1))
    expected = _conv_reference(xc, wc, pads, strides, dilations, group)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize(
    "a_shape, b_shape, a_zp_shape, b_zp_shape",
    [((3, 5), (5, 4), (3,), (4,)), ((2, 3, 5), (2, 5, 4), (2, 3, 1), (2, 1, 4))],
    ids=["2d", "batch"],
)
def test_matmul_integer_per_row(a_shape, b_shape, a_zp_shape, b_zp_shape):
    a, b, a_zp, b_zp = _u8(*a_shape), _i8(*b_shape), _u8(*a_zp_shape), _i8(*b_zp_shape)
    ours = _run_ours("MatMulInteger", [a, b, a_zp, b_zp], opset=10)
    a_rows = a_zp.reshape(-1, 1) if a_zp.ndim == 1 else a_zp
    expected = (a.astype(np.int64) - a_rows) @ (b.astype(np.int64) - b_zp)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, expected)


def test_matmul_integer_wraps_like_int32():
    a = np.full((1, 40000), 255, np.uint8)
    b = np.full((40000, 2), 255, np.uint8)
    total = 255 * 255 * 40000  # past 2^31: an int32 accumulator wraps
    wrapped = (total + 2**31) % 2**32 - 2**31
    ours = _run_ours("MatMulInteger", [a, b], opset=10)
    np.testing.assert_array_equal(ours, np.full((1, 2), wrapped, np.int32))


def _pow2(*exponents):
    """Scales that are powers of two, so every precision computes the multiplier exactly."""
    return np.ldexp(1.0, np.array(exponents)).astype(np.float32)


def test_qlinear_matmul_per_row():
    # onnxruntime takes only a per-tensor a_scale; the formula is exact with these scales.
    a, b = _u8(2, 3, 5), _u8(2, 5, 4)
    a_scale, a_zp = _pow2(-3, -4, -2).reshape(3, 1), _u8(3, 1)
    b_scale, b_zp = _pow2(-5, -6, -4, -5).reshape(1, 4), _u8(1, 4)
    y_scale, y_zp = _pow2(-1), _scalar(90, U)
    inputs = [a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp]
    ours = _run_ours("QLinearMatMul", inputs)
    acc = (a.astype(np.int64) - a_zp) @ (b.astype(np.int64) - b_zp)
    expected = np.clip(np.rint(acc * (a_scale * b_scale / y_scale)) + 90, 0, 255)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)


# QuantizeLinear and DequantizeLinear for float8, float4 and 2- and 4-bit integers.
_INT_RANGES = {
    np.dtype(ml_dtypes.int2): (-2, 1),
    np.dtype(ml_dtypes.uint2): (0, 3),
    np.dtype(ml_dtypes.int4): (-8, 7),
    np.dtype(ml_dtypes.uint4): (0, 15),
}

SMALL_TYPES = {
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "float4e2m1": ml_dtypes.float4_e2m1fn,
    "int4": ml_dtypes.int4,
    "uint4": ml_dtypes.uint4,
    "int2": ml_dtypes.int2,
    "uint2": ml_dtypes.uint2,
}


def _round_to_grid(v: np.ndarray, dtype) -> np.ndarray:
    """v rounded to the float type `dtype`, saturating, by search over every code: the
    nearest finite value, at a tie the code whose last (mantissa) bit is even."""
    codes = np.arange(2 ** ml_dtypes.finfo(dtype).bits, dtype=np.uint8)
    grid = codes.view(dtype).astype(np.float64)
    finite = np.isfinite(grid)
    codes, grid = codes[finite], grid[finite]
    flat = np.clip(v.reshape(-1, 1).astype(np.float64), grid.min(), grid.max())
    dist = np.abs(flat - grid)
    nearest = dist == dist.min(axis=1, keepdims=True)
    even = nearest & (codes % 2 == 0)
    pick = np.where(even.any(axis=1), even.argmax(axis=1), nearest.argmax(axis=1))
    return codes[pick].view(dtype).reshape(v.shape)


def _quant_input(rng: np.random.Generator) -> np.ndarray:
    """(3, 24) values on a 1/8 grid (ties after dividing by the scales below), with
    out-of-range and infinite values in the last column."""
    x = np.round(rng.uniform(-14.0, 14.0, (3, 24)) * 8) / 8
    x[:, -1] = [1e5, -np.inf, np.inf]
    x[:, -2] = [-1e5, 0.0, -0.0]
    return x.astype(np.float32)


_QX = _quant_input(np.random.default_rng(11))
_QSCALE = np.array([0.5, 1.0, 0.25], np.float32)


def _zero_points(dtype, shift_floats: bool = False) -> np.ndarray:
    """Per-axis zero points: mid-range values for the integers; for the floats zeros (what
    models use, and all onnxruntime takes), or with `shift_floats` non-zero ones."""
    dtype = np.dtype(dtype)
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        return np.array([lo + 1, 0, hi - 1]).astype(dtype)
    return np.array([0.5, 0.0, -2.0] if shift_floats else [0.0] * 3).astype(dtype)


@pytest.mark.parametrize("name", list(SMALL_TYPES))
def test_quantize_formula(name):
    dtype = np.dtype(SMALL_TYPES[name])
    zp = _zero_points(dtype, shift_floats=True)
    ours = _run_ours("QuantizeLinear", [_QX, _QSCALE, zp], {"axis": 0})
    scaled = _QX / _QSCALE.reshape(3, 1)
    shift = zp.astype(np.float64).reshape(3, 1)
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        expected = np.clip(np.rint(scaled) + shift, lo, hi)
    else:
        # Float types: the zero point is added before the one rounding, in the cast.
        expected = _round_to_grid(scaled + shift, dtype).astype(np.float64)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours.astype(np.float64), expected)


def _const_model(op, inputs, attrs, opset, out_type, shape) -> onnx.ModelProto:
    """A node on constant inputs, followed by a Cast of its output to float32, "yf" (the
    onnxruntime Python API returns no float8 or 4-bit arrays)."""
    names = [f"c{i}" for i in range(len(inputs))]
    inits = [numpy_helper.from_array(v, n) for n, v in zip(names, inputs)]
    nodes = [
        helper.make_node(op, names, ["y"], **attrs),
        helper.make_node("Cast", ["y"], ["yf"], to=TensorProto.FLOAT),
    ]
    outputs = [
        helper.make_tensor_value_info("y", out_type, shape),
        helper.make_tensor_value_info("yf", TensorProto.FLOAT, shape),
    ]
    graph = helper.make_graph(nodes, op, [], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _against_onnxruntime(model: onnx.ModelProto, dtype) -> None:
    import onnxruntime

    ours = Session(model).run(["y"], {})[0]
    sess = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    theirs = sess.run(["yf"], {})[0]
    assert ours.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ours.astype(np.float32), theirs)


# (type, attributes, scale, zero point): the forms onnxruntime's QuantizeLinear runs. Not
# e4m3fn with saturate=0: onnxruntime gives 448, not NaN, for values from 464 to 496, which
# round to 480, past the largest float (the spec's NaN case; see test_quantize_no_saturate).
ORT_QUANTIZE = [
    ("e4m3fn", {}, np.float32(0.5), None),
    ("e4m3fn", {"axis": 0}, _QSCALE / 64, "zeros"),
    ("e5m2", {}, np.float32(1e-3), None),
    ("e5m2", {"saturate": 0}, np.float32(1e-3), None),
    ("int4", {"axis": 0}, _QSCALE, "mid"),
    ("uint4", {}, np.float32(2.0), "mid"),
    ("int4", {"axis": 1, "block_size": 8}, _RNG.uniform(0.5, 3, (3, 3)), "blocked"),
]


@pytest.mark.parametrize(
    "name, attrs, scale, zp",
    ORT_QUANTIZE,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(ORT_QUANTIZE)],
)
def test_quantize_like_onnxruntime(name, attrs, scale, zp):
    dtype = np.dtype(SMALL_TYPES[name])
    scale = np.asarray(scale, np.float32)
    if zp == "mid":
        zp = _zero_points(dtype) if scale.ndim else np.array(3, dtype)
    elif zp == "zeros":
        zp = np.zeros(scale.shape, dtype)
    elif zp == "blocked":
        zp = _RNG.integers(-3, 4, scale.shape).astype(dtype)
    else:
        zp = np.array(0, dtype)
    out_type = helper.np_dtype_to_tensor_dtype(dtype)
    model = _const_model("QuantizeLinear", [_QX, scale, zp], attrs, 21, out_type, [3, 24])
    _against_onnxruntime(model, dtype)


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "int4", "uint4"])
def test_dequantize_like_onnxruntime(name):
    dtype = np.dtype(SMALL_TYPES[name])
    x = _run_ours("QuantizeLinear", [_QX[:, :-1], _QSCALE, _zero_points(dtype)], {"axis": 0})
    scale = np.array([0.3, 1.7, 0.05], np.float32)
    inputs = [x, scale, _zero_points(dtype)]
    model = _const_model("DequantizeLinear", inputs, {"axis": 0}, 21, TensorProto.FLOAT, [3, 23])
    # DequantizeLinear's output is float32 already; the Cast is the identity.
    _against_onnxruntime(model, np.float32)


@pytest.mark.parametrize("name", list(SMALL_TYPES))
def test_dequantize_formula(name):
    dtype = np.dtype(SMALL_TYPES[name])
    zp = _zero_points(dtype, shift_floats=True)
    x = _run_ours("QuantizeLinear", [_QX[:, :-1], _QSCALE, zp], {"axis": 0})
    scale = np.array([0.3, 1.7, 0.05], np.float32)
    ours = _run_ours("DequantizeLinear", [x, scale, zp], {"axis": 0})
    centered = x.astype(np.float64) - zp.astype(np.float64).reshape(3, 1)
    expected = (centered * scale.reshape(3, 1)).astype(np.float32)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, expected)


def test_quantize_precision_attribute():
    # 2049 is not a float16: divided in float16 it becomes 2048, in float32 it stays.
    x = np.array([2049.0, 6.0], np.float32)
    scale, zp = np.float32(1.0), np.array(0, np.uint16)
    half = _run_ours("QuantizeLinear", [x, scale, zp], {"precision": TensorProto.FLOAT16}, 23)
    full = _run_ours("QuantizeLinear", [x, scale, zp], {}, 23)
    np.testing.assert_array_equal(half, np.array([2048, 6], np.uint16))
    np.testing.assert_array_equal(full, np.array([2049, 6], np.uint16))


def test_qlinear_matmul_float8():
    e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)
    a = _RNG.uniform(-4, 4, (3, 6)).astype(e4m3)
    b = _RNG.uniform(-4, 4, (2, 6, 5)).astype(e4m3)
    zero = np.array(0, e4m3)
    a_scale, b_scale, y_scale = _pow2(-2), _pow2(3), _pow2(-1)
    inputs = [a, a_scale, zero, b, b_scale, zero, y_scale, zero]
    ours = _run_ours("QLinearMatMul", inputs)
    acc = a.astype(np.float64) @ b.astype(np.float64)
    expected = _round_to_grid(acc * (a_scale * b_scale / y_scale), e4m3)
    assert ours.dtype == e4m3
    np.testing.assert_array_equal(ours.astype(np.float64), expected.astype(np.float64))


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2"])
def test_quantize_no_saturate(name):
    # The spec's table for saturate=0: a value that rounds past the largest finite one, and
    # ±inf, become NaN in e4m3fn and ±inf in e5m2; the rest round to nearest even.
    dtype = np.dtype(SMALL_TYPES[name])
    codes = np.arange(256, dtype=np.uint8)
    finite = np.isfinite(codes.view(dtype).astype(np.float64))
    top, below = codes[finite & (codes < 128)][[-1, -2]]
    big = float(top.view(dtype))
    edge = big + (big - float(below.view(dtype))) / 2  # halfway to the next step up
    x = np.array([big, edge, edge * 1.001, big * 2, -big * 1.1, -edge, np.inf, -np.inf])
    x = np.concatenate([x, _QX[0, :-2] * 0.1]).astype(np.float32)
    ours = _run_ours("QuantizeLinear", [x, np.float32(1.0), np.array(0, dtype)], {"saturate": 0})
    # At the edge, a tie goes to the even code: back to the largest value if its code is even.
    magnitude = np.abs(x.astype(np.float64))
    past = (magnitude > edge) | ((magnitude == edge) & bool(top % 2))
    expected = _round_to_grid(x, dtype).astype(np.float64)
    expected[past] = np.nan if name == "e4m3fn" else np.copysign(np.inf, x[past])
    assert ours.dtype == dtype
    np.testing.assert_array_equal(ours.astype(np.float64), expected)


def test_float8e8m0_scales():
    # float8e8m0 holds powers of two only; numpy cannot divide in it, so the kernels widen it.
    scale = np.array([2.0, 0.5, 4.0], ml_dtypes.float8_e8m0fnu)
    wide = scale.astype(np.float64).reshape(3, 1)
    q = _run_ours("QuantizeLinear", [_QX, scale, np.zeros(3, np.int8)], {"axis": 0}, 23)
    np.testing.assert_array_equal(q, np.clip(np.rint(_QX / wide), -128, 127))
    attrs = {"axis": 0, "output_dtype": TensorProto.FLOAT}
    y = _run_ours("DequantizeLinear", [q, scale], attrs, 23)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, q * wide)
