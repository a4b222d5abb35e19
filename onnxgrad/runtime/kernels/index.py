"""Indexing kernels: gathers, scatters, arg-reductions, Range, OneHot, Trilu, CumSum, TopK,
Unique, TensorScatter.

Indices may be negative (counted from the end of their axis) wherever ONNX allows it.
"""

from __future__ import annotations

import numpy as np

from onnxgrad.runtime.kernels import KernelNode, kernel

# ufuncs whose `.at` accumulates a scatter with repeated indices, by reduction attribute.
_SCATTER_UFUNCS = {
    "add": np.add,
    "mul": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
}


def _normalize(indices: np.ndarray, dims) -> np.ndarray:
    """Indices into dimensions of size `dims` (broadcast), negative ones counted from the end."""
    indices = np.asarray(indices, dtype=np.int64)
    return np.where(indices < 0, indices + dims, indices)


def _reduction(node: KernelNode) -> str:
    reduction = node.attrs.get("reduction", "none")
    if reduction != "none" and reduction not in _SCATTER_UFUNCS:
        raise NotImplementedError(f"{node.op_type} reduction '{reduction}'")
    return reduction


@kernel("Gather")
def gather(node: KernelNode):
    """Gather: take along `axis`; negative indices count from the end."""
    axis = node.attrs.get("axis", 0)

    def run(x, indices):
        a = axis % x.ndim
        return (np.take(x, _normalize(indices, x.shape[a]), axis=a),)

    return run


def _element_index(x: np.ndarray, indices: np.ndarray, axis: int) -> tuple:
    """The fancy index that pairs each entry of `indices` with its position on other axes.

    `indices` may be smaller than `x` on the other axes (take_along_axis would broadcast it).
    Negative indices need no pass of their own: numpy counts them from the end, as ONNX does.
    """
    a = axis % x.ndim
    grid = list(np.indices(indices.shape, sparse=True))
    grid[a] = np.asarray(indices, dtype=np.int64)
    return tuple(grid)


@kernel("GatherElements")
def gather_elements(node: KernelNode):
    """GatherElements: out[p] = x[p with p[axis] replaced by indices[p]]."""
    axis = node.attrs.get("axis", 0)

    def run(x, indices):
        return (x[_element_index(x, indices, axis)],)

    return run


@kernel("GatherND")
def gather_nd(node: KernelNode):
    """GatherND: index tuples into x after `batch_dims` shared leading dimensions."""
    batch = node.attrs.get("batch_dims", 0)

    def run(x, indices):
        k = indices.shape[-1]
        lead = indices.shape[batch:-1]
        flat_x = x.reshape((-1,) + x.shape[batch:])
        flat_i = _normalize(indices, x.shape[batch : batch + k]).reshape(flat_x.shape[0], -1, k)
        rows = np.arange(flat_x.shape[0]).reshape(-1, 1)
        picked = flat_x[(rows,) + tuple(flat_i[..., j] for j in range(k))]
        return (picked.reshape(indices.shape[:batch] + lead + x.shape[batch + k :]),)

    return run


def _scatter(out: np.ndarray, where: tuple, updates: np.ndarray, reduction: str) -> np.ndarray:
    if reduction == "none":
        out[where] = updates
    else:
        _SCATTER_UFUNCS[reduction].at(out, where, updates)
    return out


@kernel("ScatterElements", "Scatter")
def scatter_elements(node: KernelNode):
    """ScatterElements (and Scatter, opsets 9-10) with reduction none/add/mul/max/min."""
    axis = node.attrs.get("axis", 0)
    reduction = _reduction(node)

    def run(x, indices, updates):
        return (_scatter(x.copy(), _element_index(x, indices, axis), updates, reduction),)

    return run


@kernel("ScatterND")
def scatter_nd(node: KernelNode):
    """ScatterND: rows or elements written at index tuples, with a reduction."""
    reduction = _reduction(node)

    def run(x, indices, updates):
        k = indices.shape[-1]
        flat = _normalize(indices, x.shape[:k]).reshape(-1, k)
        rows = updates.reshape((flat.shape[0],) + x.shape[k:])
        return (_scatter(x.copy(), tuple(flat.T), rows, reduction),)

    return run


def _arg(fn, reverse_fn):
    def factory(node: KernelNode):
        axis = node.attrs.get("axis", 0)
        keepdims = bool(node.attrs.get("keepdims", 1))
        last = bool(node.attrs.get("select_last_index", 0))

        def run(x):
            a = axis % x.ndim
            if last:
                flipped = reverse_fn(np.flip(x, a), axis=a, keepdims=keepdims)
                out = x.shape[a] - 1 - flipped
            else:
                out = fn(x, axis=a, keepdims=keepdims)
            return (np.asarray(out, dtype=np.int64),)

        return run

    return factory


kernel("ArgMax")(_arg(np.argmax, np.argmax))
kernel("ArgMin")(_arg(np.argmin, np.argmin))


@kernel("Range")
def range_(node: KernelNode):
    """Range: max(ceil((limit - start) / delta), 0) values from start, in its type."""

    def run(start, limit, delta):
        # Scalars by the spec; function bodies sometimes hand in one-element vectors.
        start, limit, delta = (np.asarray(v).reshape(-1)[0] for v in (start, limit, delta))
        count = max(int(np.ceil((limit - start) / delta)), 0)
        steps = np.arange(count, dtype=np.float64 if start.dtype.kind == "f" else np.int64)
        return ((start + steps * delta).astype(start.dtype),)

    return run


@kernel("OneHot")
def one_hot(node: KernelNode):
    """OneHot: values[1] where the index hits, values[0] elsewhere (and out of range)."""
    axis = node.attrs.get("axis", -1)

    def run(indices, depth, values):
        n = int(np.asarray(depth).reshape(-1)[0])
        idx = np.asarray(indices).astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        hot = idx[..., None] == np.arange(n)  # out-of-range indices match nothing: all off
        out = np.where(hot, values[1], values[0]).astype(values.dtype)
        return (np.moveaxis(out, -1, axis % out.ndim),)

    return run


@kernel("Trilu")
def trilu(node: KernelNode):
    """Trilu: the upper (or lower) triangle of the last two axes, from diagonal k."""
    upper = node.attrs.get("upper", 1)

    def run(x, k=None):
        diagonal = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
        return ((np.triu if upper else np.tril)(x, diagonal),)

    return run


@kernel("CumSum")
def cumsum(node: KernelNode):
    """CumSum along a runtime axis, exclusive and reverse."""
    exclusive = node.attrs.get("exclusive", 0)
    reverse = node.attrs.get("reverse", 0)

    def run(x, axis):
        a = int(np.asarray(axis).reshape(-1)[0]) % x.ndim
        t = np.flip(x, a) if reverse else x
        out = np.cumsum(t, axis=a, dtype=x.dtype)
        if exclusive:  # shift by one: each element gets the sum of those strictly before it
            head = np.zeros_like(np.take(out, [0], axis=a))
            out = np.concatenate([head, np.take(out, np.arange(x.shape[a] - 1), axis=a)], axis=a)
        return (np.flip(out, a) if reverse else out,)

    return run


@kernel("TopK")
def top_k(node: KernelNode):
    """TopK: the k largest (or smallest) values and their indices; ties keep index order."""
    axis = node.attrs.get("axis", -1)
    largest = node.attrs.get("largest", 1)
    k_attr = node.attrs.get("k")  # opset < 10

    def run(x, k=None):
        count = k_attr if k is None else int(np.asarray(k).reshape(-1)[0])
        a = axis % x.ndim
        keys = x.astype(np.float64) if x.dtype.kind in "uib" else x
        # A stable sort keeps equal values in index order: ties go to the lower index.
        order = np.argsort(-keys if largest else keys, axis=a, kind="stable")
        order = np.take(order, np.arange(count), axis=a)
        return np.take_along_axis(x, order, axis=a), order.astype(np.int64)

    return run


@kernel("Unique")
def unique(node: KernelNode):
    """Unique values (or slices along `axis`), sorted or in order of first occurrence, with
    the first-occurrence indices, the inverse indices and the counts."""
    axis = node.attrs.get("axis")
    keep_sorted = node.attrs.get("sorted", 1)

    def run(x):
        a = None if axis is None else axis % x.ndim
        # numpy sorts only its own types: ml_dtypes floats (bfloat16, ...) go through float32.
        keys = x.astype(np.float32) if x.dtype.kind == "V" else x
        _, first, inverse, counts = np.unique(
            keys, return_index=True, return_inverse=True, return_counts=True, axis=a
        )
        inverse = inverse.reshape(-1)
        if not keep_sorted:
            # Renumber the unique entries by where they first occur.
            order = np.argsort(first, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(order.size)
            first, counts, inverse = first[order], counts[order], rank[inverse]
        y = x.reshape(-1)[first] if a is None else np.take(x, first, axis=a)
        first, inverse, counts = (np.asarray(v, dtype=np.int64) for v in (first, inverse, counts))
        return y, first, inverse, counts

    return run


@kernel("TensorScatter")
def tensor_scatter(node: KernelNode):
    """TensorScatter: the cache with `update` written along `axis` from each batch entry's
    write index (0 when absent); mode "circular" wraps the index around the axis."""
    axis = node.attrs.get("axis", -2)
    circular = node.attrs.get("mode", "linear") == "circular"

    def run(past, update, write_indices=None):
        a = axis % past.ndim
        if a == 0:
            raise ValueError("TensorScatter axis must not be the batch axis 0")
        out = past.copy()
        length, size = update.shape[a], past.shape[a]
        batch = past.shape[0]
        starts = np.zeros(batch, np.int64) if write_indices is None else write_indices
        for b in range(batch):
            positions = int(starts[b]) + np.arange(length)
            if circular:
                positions %= size
            # A view of this batch entry with the sequence axis first: writes land in `out`.
            target = np.moveaxis(out[b], a - 1, 0)
            target[positions] = np.moveaxis(update[b], a - 1, 0)
        return (out,)

    return run
