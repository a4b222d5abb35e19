"""A small node builder for the backward graph.

``b.Mul(x, y)`` appends a Mul node and returns its output's name. Rules write math
through it and never touch protobuf: it names nodes and tensors (everything emitted for
forward node ``n`` is prefixed ``n_grad/``), makes typed constants, tracks the element
type of what it emits, and papers over the few signature changes between opsets
(reductions, Squeeze and Unsqueeze taking axes as an attribute or an input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.errors import GradientError
from onnxgrad.importer import tensor_array

_BOOL_OPS = frozenset(
    {
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "IsNaN",
        "IsInf",
    }
)
_INT64_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
# The input whose element type the (first) output has, where it is not the first one.
_DATA_INPUT = {"Where": 1, "OneHot": 2}
# Inputs that never give the output's type (Where's boolean condition).
_CONDITION_INPUT = {"Where": 0}
# Outputs of their own fixed type; other outputs after the first are typed only for ops
# whose outputs all share the data's type.
_OUTPUT_DTYPES = {
    ("TopK", 1): onnx.TensorProto.INT64,
    ("MaxPool", 1): onnx.TensorProto.INT64,
    ("Dropout", 1): onnx.TensorProto.BOOL,
    ("Unique", 1): onnx.TensorProto.INT64,
    ("Unique", 2): onnx.TensorProto.INT64,
    ("Unique", 3): onnx.TensorProto.INT64,
}
_SAME_TYPE_OUTPUTS = frozenset({"Split", "BatchNormalization", "RNN", "GRU", "LSTM"})

# Opset at which a reduction takes its axes as an input instead of an attribute.
_AXES_INPUT_SINCE = {
    "ReduceSum": 13,
    "ReduceMean": 18,
    "ReduceMax": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceL1": 18,
    "ReduceL2": 18,
    "ReduceLogSum": 18,
    "ReduceLogSumExp": 18,
    "ReduceSumSquare": 18,
}


@dataclass
class GraphInfo:
    """What the emitter knows about tensors: element types and shapes.

    Shapes are lists of int (static), str (symbolic) or None (unknown) per dimension;
    a missing entry means the rank is unknown.
    """

    dtypes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[int | str | None]] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)

    @classmethod
    def from_graph(cls, graph: onnx.GraphProto) -> GraphInfo:
        info = cls()
        for t in graph.initializer:
            info.dtypes[t.name] = t.data_type
            info.shapes[t.name] = list(t.dims)
            info.constants[t.name] = t
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            if tt.elem_type:
                info.dtypes.setdefault(vi.name, tt.elem_type)
            if tt.HasField("shape"):
                dims: list[int | str | None] = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(d.dim_value)
                    elif d.HasField("dim_param"):
                        dims.append(d.dim_param)
                    else:
                        dims.append(None)
                info.shapes.setdefault(vi.name, dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                attr = node.attribute[0]
                if attr.name == "value":
                    info.dtypes[node.output[0]] = attr.t.data_type
                    info.shapes[node.output[0]] = list(attr.t.dims)
                    info.constants[node.output[0]] = attr.t
        return info


class Emitter:
    """Appends nodes to a shared list; one instance is scoped to one forward node.

    Any attribute that starts with a capital letter is an ONNX op:
    ``b.ReduceSum(x, axes, keepdims=1)``. Keyword arguments become attributes, except
    ``outputs`` (how many outputs; a tuple of names is returned when it is not 1) and
    ``name`` (the output's name, instead of a generated one).
    """

    def __init__(
        self,
        info: GraphInfo,
        opset: int,
        nodes: list[onnx.NodeProto] | None = None,
        prefix: str = "",
        constants: dict | None = None,
        taken: set[str] | None = None,
    ):
        self.info = info
        self.opset = opset
        self.nodes = [] if nodes is None else nodes
        self.prefix = prefix
        self._constants = {} if constants is None else constants
        self._taken = set() if taken is None else taken

    def scoped(self, prefix: str) -> Emitter:
        """An emitter that shares this one's node list and constants, with a new prefix."""
        return Emitter(self.info, self.opset, self.nodes, prefix, self._constants, self._taken)

    # Facts about tensors.

    def dtype(self, name: str) -> int:
        """The ONNX element type of `name` (TensorProto.FLOAT when nothing tells)."""
        return self.info.dtypes.get(name, onnx.TensorProto.FLOAT)

    def shape(self, name: str) -> list[int | str | None] | None:
        """The known shape of `name`, or None when even its rank is unknown."""
        return self.info.shapes.get(name)

    def rank(self, name: str) -> int | None:
        """The rank of `name`, or None when unknown."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def static_shape(self, name: str) -> list[int] | None:
        """The shape of `name` when every dimension is a known integer."""
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return list(shape)  # type: ignore[arg-type]

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a forward initializer or Constant output, or None if not constant."""
        tensor = self.info.constants.get(name)
        return None if tensor is None else tensor_array(tensor)

    # Node emission.

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)

        def emit(*inputs: str | None, **attrs: Any):
            return self.op(op_type, *inputs, **attrs)

        return emit

    def op(
        self,
        op_type: str,
        *inputs: str | None,
        outputs: int = 1,
        name: str | None = None,
        domain: str = "",
        **attrs: Any,
    ):
        """Append one node and return its output name (or a tuple for several outputs)."""
        base = self._fresh(f"{self.prefix}{op_type}")
        if outputs == 1:
            outs = [name or base]
        else:
            outs = [f"{base}_{i}" for i in range(outputs)]
        self._taken.update(outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(
            op_type,
            ["" if i is None else i for i in inputs],
            outs,
            name=base,
            domain=domain,
            **attrs,
        )
        self.nodes.append(node)
        dtype = self._result_dtype(op_type, inputs, attrs)
        for k, out in enumerate(outs):
            fixed = _OUTPUT_DTYPES.get((op_type, k))
            if fixed is not None:
                self.info.dtypes[out] = fixed
            elif dtype and (k == 0 or op_type in _SAME_TYPE_OUTPUTS):
                self.info.dtypes[out] = dtype
        return outs[0] if outputs == 1 else tuple(outs)

    def _fresh(self, base: str) -> str:
        name = base
        k = 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def _result_dtype(self, op_type: str, inputs: Sequence[str | None], attrs: dict) -> int:
        if op_type in _BOOL_OPS:
            return onnx.TensorProto.BOOL
        if op_type in _INT64_OPS:
            return onnx.TensorProto.INT64
        if (
            op_type in ("Cast", "EyeLike", "RandomNormalLike", "RandomUniformLike")
            and "to" in attrs
        ):
            return attrs["to"]
        if op_type == "CastLike" and len(inputs) > 1 and inputs[1]:
            return self.dtype(inputs[1])
        if op_type == "ConstantOfShape":
            value = attrs.get("value")
            return value.data_type if value is not None else onnx.TensorProto.FLOAT
        data = _DATA_INPUT.get(op_type, 0)
        if data < len(inputs) and inputs[data] and inputs[data] in self.info.dtypes:
            return self.info.dtypes[inputs[data]]
        for k, name in enumerate(inputs):
            if k != _CONDITION_INPUT.get(op_type) and name and name in self.info.dtypes:
                return self.info.dtypes[name]
        return 0

    # Constants.

    def const(self, value: Any, like: str | None = None, dtype: int | None = None) -> str:
        """A constant tensor, typed like tensor `like` (or `dtype`), shared across the graph."""
        if dtype is None:
            dtype = self.dtype(like) if like is not None else onnx.TensorProto.FLOAT
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        array = np.asarray(value, dtype=np_dtype)
        key = (dtype, array.shape, array.tobytes())
        if key in self._constants:
            return self._constants[key]
        name = self._fresh(f"onnxgrad_const/{_const_label(array)}")
        tensor = numpy_helper.from_array(array, name)
        if dtype == onnx.TensorProto.BFLOAT16:
            tensor = helper.make_tensor(name, dtype, array.shape, array.astype(np.float32).ravel())
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        self.info.dtypes[name] = dtype
        self.info.shapes[name] = list(array.shape)
        self._constants[key] = name
        return name

    def ints(self, values: Sequence[int] | int) -> str:
        """A constant int64 tensor (1-D for a sequence, 0-D for an int)."""
        return self.const(values, dtype=onnx.TensorProto.INT64)

    def zeros_like(self, name: str) -> str:
        """Zeros with the runtime shape and the element type of `name`."""
        value = numpy_helper.from_array(
            np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.dtype(name)))
        )
        return self.ConstantOfShape(self.Shape(name), value=value)

    # Signature changes between opsets.

    def reduce(
        self,
        op_type: str,
        x: str,
        axes: Sequence[int] | str | None,
        keepdims: int = 1,
        **attrs: Any,
    ) -> str:
        """A Reduce* op with axes given as a list or an int64 tensor."""
        if self.opset >= _AXES_INPUT_SINCE.get(op_type, 1_000):
            axes_input = (
                None if axes is None else (axes if isinstance(axes, str) else self.ints(list(axes)))
            )
            return self.op(op_type, x, axes_input, keepdims=keepdims, **attrs)
        if isinstance(axes, str):
            raise NotImplementedError(f"{op_type} with runtime axes needs opset >= 13")
        return self.op(
            op_type, x, axes=None if axes is None else list(axes), keepdims=keepdims, **attrs
        )

    def reduce_sum(self, x: str, axes: Sequence[int] | str | None, keepdims: int = 1) -> str:
        """ReduceSum over `axes` (a list, or an int64 tensor name)."""
        return self.reduce("ReduceSum", x, axes, keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        """Unsqueeze with the opset's signature."""
        if self.opset >= 13:
            return self.Unsqueeze(x, self.ints(list(axes)))
        return self.Unsqueeze(x, axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        """Squeeze with the opset's signature."""
        if self.opset >= 13:
            return self.Squeeze(x, self.ints(list(axes)))
        return self.Squeeze(x, axes=list(axes))

    def split(self, x: str, sizes: Sequence[int], axis: int) -> tuple[str, ...]:
        """`x` cut into pieces of `sizes` along `axis`, with the opset's Split signature
        (`x` itself when there is one piece)."""
        if len(sizes) == 1:
            return (x,)
        if self.opset >= 13:
            return tuple(self.op("Split", x, self.ints(list(sizes)), outputs=len(sizes), axis=axis))
        return tuple(self.op("Split", x, outputs=len(sizes), axis=axis, split=list(sizes)))

    def sum_to(self, dx: str, x: str, dx_shape: Sequence[int | str | None] | None) -> str:
        """Sum `dx` (broadcast from `x`, of shape `dx_shape`) down to the shape of `x`.

        Static shapes give one ReduceSum over the known broadcast axes (or nothing at all);
        symbolic ones give a small subgraph that finds those axes at run time. Pass
        dx_shape=None when it is not known.
        """
        xs, ys = self.shape(x), dx_shape
        if xs is not None and ys is not None and len(xs) <= len(ys):
            lead = len(ys) - len(xs)
            axes = list(range(lead))
            static = True
            for i, d in enumerate(xs):
                e = ys[lead + i]
                if d == e and d is not None:
                    continue
                if d == 1:
                    axes.append(lead + i)  # summing a dimension that is 1 at run time is harmless
                else:
                    static = False
                    break
            if static:
                if not axes:
                    return dx
                total = self.reduce_sum(dx, axes, keepdims=1)
                if lead == 0:
                    return total
                sx = self.static_shape(x)
                return self.Reshape(total, self.ints(sx) if sx is not None else self.Shape(x))

        if self.opset < 13:
            return self._sum_to_per_axis(dx, x, xs, ys)

        # Known only at run time: reduce where x (padded with leading 1s) is 1 and dx is not.
        sx, sd = self.Shape(x), self.Shape(dx)
        pad = self.Reshape(self.Sub(self.Size(sd), self.Size(sx)), self.ints([1]))
        ones = self.ConstantOfShape(pad, value=numpy_helper.from_array(np.ones(1, np.int64)))
        padded = self.Concat(ones, sx, axis=0)
        one = self.ints(1)
        mask = self.And(self.Equal(padded, one), self.Not(self.Equal(sd, one)))
        axes = self.Reshape(self.NonZero(mask), self.ints([-1]))
        total = self.op("ReduceSum", dx, axes, keepdims=1, noop_with_empty_axes=1)
        return self.Reshape(total, sx)

    def _sum_to_per_axis(self, dx: str, x: str, xs, ys) -> str:
        """`sum_to` before opset 13, where ReduceSum takes its axes only as an attribute.

        Each axis whose broadcast is known only at run time is summed anyway, then
        Where(x's size there is 1, the sum, dx) keeps one of the two (the sum broadcast
        back to dx's shape), and one Slice (opset 10) cuts the result to the shape of x.
        """
        if xs is None or ys is None or len(xs) > len(ys) or self.opset < 10:
            raise GradientError(
                f"the gradient of '{x}' must be summed over broadcast axes known only at run "
                f"time, which needs opset 10 (13 with unknown ranks); the model has "
                f"{self.opset}: convert it with onnx.version_converter"
            )
        lead = len(ys) - len(xs)
        total = self.reduce_sum(dx, list(range(lead)), keepdims=0) if lead else dx
        pairs = list(zip(xs, ys[lead:]))
        ones = [i for i, (d, e) in enumerate(pairs) if d == 1 and e != 1]  # known broadcasts
        if ones:
            total = self.reduce_sum(total, ones, keepdims=1)
        sx = self.Shape(x)
        for i, (d, e) in enumerate(pairs):
            if d == 1 or e == 1 or (d == e and d is not None) or isinstance(d, int):
                continue
            summed = self.reduce_sum(total, [i], keepdims=1)
            size = self.Gather(sx, self.ints(i), axis=0)
            total = self.Where(self.Equal(size, self.ints(1)), summed, total)
        zeros = self.ints([0] * len(xs))
        return self.Slice(total, zeros, sx, self.ints(list(range(len(xs)))))


def _const_label(array: np.ndarray) -> str:
    if array.size == 1:
        v = array.reshape(-1)[0].item()
        return f"{array.dtype.name}_{v!r}".replace(" ", "")[:40]
    return f"{array.dtype.name}_{'x'.join(map(str, array.shape)) or 'scalar'}"
