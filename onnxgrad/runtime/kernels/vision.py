"""Detection and image kernels: NonMaxSuppression, RoiAlign, ImageDecoder."""

from __future__ import annotations

import io
import math

import numpy as np

from onnxgrad.runtime.kernels import KernelNode
from onnxgrad.runtime.kernels.sequence import kernel_if_missing


def _scalar(value, default, kind=float):
    if value is None or np.size(value) == 0:
        return default
    return kind(np.asarray(value).reshape(-1)[0])


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """Boxes as [y_min, x_min, y_max, x_max], from corners in any diagonal order (0) or
    from [x_center, y_center, width, height] (1)."""
    b = boxes.astype(np.float64)
    if center_point_box:
        xc, yc, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)
    y0, x0 = np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3])
    y1, x1 = np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])
    return np.stack([y0, x0, y1, x1], axis=1)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with many (0 where the union is empty)."""
    h = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    w = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = h * w
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@kernel_if_missing("NonMaxSuppression")
def non_max_suppression(node: KernelNode):
    """NonMaxSuppression: per batch and class, boxes in decreasing score order (ties: lower
    index first), above score_threshold, each kept unless its IoU with a kept box exceeds
    iou_threshold, at most max_output_boxes_per_class; rows (batch, class, box)."""
    center = node.attrs.get("center_point_box", 0)

    def run(boxes, scores, max_output=None, iou_threshold=None, score_threshold=None):
        limit = _scalar(max_output, 0, int)
        iou_max = _scalar(iou_threshold, 0.0)
        selected = []
        if limit > 0:
            for b in range(scores.shape[0]):
                corners = _corners(boxes[b], center)
                for c in range(scores.shape[1]):
                    s = scores[b, c].astype(np.float64)
                    order = np.argsort(-s, kind="stable")
                    if score_threshold is not None:
                        order = order[s[order] > _scalar(score_threshold, 0.0)]
                    kept: list[int] = []
                    for i in order:
                        if len(kept) == limit:
                            break
                        if not kept or np.all(_iou(corners[i], corners[kept]) <= iou_max):
                            kept.append(int(i))
                    selected.extend((b, c, i) for i in kept)
        return (np.array(selected, dtype=np.int64).reshape(-1, 3),)

    return run


def _bilinear_axis(coords: np.ndarray, size: int):
    """For sample coordinates along one axis: the two neighbour indices and their weights
    (both weights 0 for samples more than one pixel outside the image)."""
    outside = (coords < -1.0) | (coords > size)
    c = np.clip(coords, 0, None)
    low = np.floor(c).astype(np.int64)
    at_edge = low >= size - 1
    low = np.where(at_edge, size - 1, low)
    high = np.where(at_edge, size - 1, low + 1)
    c = np.where(at_edge, low, c)
    frac = c - low
    weights = np.stack([1 - frac, frac], axis=-1)
    weights[outside] = 0.0
    return np.stack([low, high], axis=-1), weights


@kernel_if_missing("RoiAlign")
def roi_align(node: KernelNode):
    """RoiAlign: each RoI cut into output_height × output_width bins, each bin the average
    (or maximum) of bilinear samples on a regular grid inside it."""
    attrs = node.attrs
    mode = attrs.get("mode", "avg")
    if mode not in ("avg", "max"):
        raise NotImplementedError(f"RoiAlign mode '{mode}'")
    out_h, out_w = attrs.get("output_height", 1), attrs.get("output_width", 1)
    ratio = attrs.get("sampling_ratio", 0)
    scale = attrs.get("spatial_scale", 1.0)
    default_mode = "half_pixel" if node.opset >= 16 else "output_half_pixel"
    half_pixel = attrs.get("coordinate_transformation_mode", default_mode) == "half_pixel"

    def one(x: np.ndarray, roi: np.ndarray) -> np.ndarray:
        # 1. The RoI on the feature map; without half_pixel, at least one pixel wide and high.
        offset = 0.5 if half_pixel else 0.0
        x0, y0, x1, y1 = (float(v) * scale - offset for v in roi)
        w, h = x1 - x0, y1 - y0
        if not half_pixel:
            w, h = max(w, 1.0), max(h, 1.0)
        bin_h, bin_w = h / out_h, w / out_w
        grid_h = ratio if ratio > 0 else math.ceil(h / out_h)
        grid_w = ratio if ratio > 0 else math.ceil(w / out_w)

        # 2. Sample coordinates: grid points at the centres of a grid_h × grid_w split of
        #    each bin; the bilinear weights are separable along y and x.
        ys = y0 + (np.arange(out_h)[:, None] + (np.arange(grid_h)[None, :] + 0.5) / grid_h) * bin_h
        xs = x0 + (np.arange(out_w)[:, None] + (np.arange(grid_w)[None, :] + 0.5) / grid_w) * bin_w
        yi, wy = _bilinear_axis(ys.reshape(-1), x.shape[1])
        xi, wx = _bilinear_axis(xs.reshape(-1), x.shape[2])

        # 3. terms[c, sy, sx, a, b] = wy[sy, a] · wx[sx, b] · x[c, yi[sy, a], xi[sx, b]].
        picked = x[:, yi[:, :, None, None], xi[None, None, :, :]]  # [C, Sy, 2, Sx, 2]
        terms = picked * (wy[:, :, None, None] * wx[None, None, :, :])
        c = x.shape[0]
        if mode == "avg":
            values = terms.sum(axis=(2, 4)).reshape(c, out_h, grid_h, out_w, grid_w)
            return values.sum(axis=(2, 4)) / max(grid_h * grid_w, 1)
        # max mode takes the largest weighted corner of each sample, then the largest
        # sample, as onnxruntime and onnx's reference do.
        values = terms.max(axis=(2, 4)).reshape(c, out_h, grid_h, out_w, grid_w)
        return values.max(axis=(2, 4))

    def run(x, rois, batch_indices):
        wide = x.astype(np.float64)
        out = np.zeros((rois.shape[0], x.shape[1], out_h, out_w), dtype=x.dtype)
        for r in range(rois.shape[0]):
            out[r] = one(wide[int(batch_indices[r])], rois[r])
        return (out,)

    return run


@kernel_if_missing("ImageDecoder")
def image_decoder(node: KernelNode):
    """ImageDecoder: encoded image bytes (uint8) to an [H, W, C] uint8 array in RGB, BGR or
    Grayscale (C = 1). Decoding needs Pillow, an optional dependency."""
    pixel_format = node.attrs.get("pixel_format", "RGB")
    if pixel_format not in ("RGB", "BGR", "Grayscale"):
        raise NotImplementedError(f"ImageDecoder pixel_format '{pixel_format}'")
    try:
        import PIL.Image
    except ImportError as err:
        raise NotImplementedError("ImageDecoder needs Pillow: pip install pillow") from err

    def run(encoded):
        with PIL.Image.open(io.BytesIO(np.ascontiguousarray(encoded).tobytes())) as image:
            if pixel_format == "Grayscale":
                return (np.asarray(image.convert("L"), dtype=np.uint8)[:, :, None],)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return (rgb[:, :, ::-1].copy() if pixel_format == "BGR" else rgb,)

    return run


def _base_coords(size: int, align_corners: bool) -> np.ndarray:
    """Normalized pixel positions along one axis in [−1, 1]: the pixel centres, or the
    corner pixels' centres at ±1 with align_corners."""
    if align_corners:
        return np.linspace(-1.0, 1.0, size) if size > 1 else np.zeros(1)
    return (2.0 * np.arange(size) + 1.0) / size - 1.0


@kernel_if_missing("AffineGrid")
def affine_grid(node: KernelNode):
    """AffineGrid: the sampling grid θ · [x, y, (z,) 1] over an output of `size`
    ([N, C, H, W] or [N, C, D, H, W]); the grid's last axis is (x, y[, z])."""
    align = bool(node.attrs.get("align_corners", 0))

    def run(theta, size):
        dims = [int(d) for d in np.asarray(size).reshape(-1)][2:]
        # Coordinates ordered (x, y, z): x runs along the last axis.
        axes = [_base_coords(d, align) for d in dims]
        mesh = np.meshgrid(*axes, indexing="ij")
        points = np.stack([*mesh[::-1], np.ones(mesh[0].shape)], axis=-1)  # [..., k + 1]
        grid = np.einsum("...j,nij->n...i", points, theta.astype(np.float64))
        return (grid.astype(theta.dtype),)

    return run


@kernel_if_missing("Col2Im")
def col2im(node: KernelNode):
    """Col2Im: columns [N, C · Πblock, L] summed back into an image of image_shape; the
    inverse layout of an im2col with the same dilations, pads and strides."""
    attrs = node.attrs

    def run(x, image_shape, block_shape):
        image = [int(v) for v in np.asarray(image_shape).reshape(-1)]
        block = [int(v) for v in np.asarray(block_shape).reshape(-1)]
        k = len(image)
        dilations = attrs.get("dilations", [1] * k)
        strides = attrs.get("strides", [1] * k)
        pads = attrs.get("pads", [0] * (2 * k))
        padded = [image[i] + pads[i] + pads[i + k] for i in range(k)]
        counts = [
            (padded[i] - (dilations[i] * (block[i] - 1) + 1)) // strides[i] + 1 for i in range(k)
        ]
        n = x.shape[0]
        c = x.shape[1] // int(np.prod(block))
        cols = x.reshape(n, c, *block, *counts)
        out = np.zeros((n, c, *padded), dtype=x.dtype)
        for offset in np.ndindex(*block):
            where = tuple(
                slice(o * d, o * d + s * (m - 1) + 1, s)
                for o, d, s, m in zip(offset, dilations, strides, counts)
            )
            out[(slice(None), slice(None)) + where] += cols[(slice(None), slice(None)) + offset]
        crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(k))
        return (out[(slice(None), slice(None)) + crop],)

    return run


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """x folded back into [lo, hi] by reflecting at the bounds as often as needed."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    below, above = x < lo, x > hi
    d = np.where(below, lo - x, x - hi)
    folds = np.floor(d / span)
    r = d - folds * span
    even = folds % 2 == 0
    from_below = np.where(even, lo + r, hi - r)
    from_above = np.where(even, hi - r, lo + r)
    return np.where(below, from_below, np.where(above, from_above, x))


def _cubic_weights(t: np.ndarray) -> list[np.ndarray]:
    """Keys' cubic convolution weights (A = −0.75) of the taps at −1, 0, 1, 2 from floor."""
    a = -0.75

    def far(s):  # a tap at distance s in [1, 2)
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    def near(s):  # a tap at distance s in [0, 1)
        return ((a + 2) * s - (a + 3)) * s * s + 1

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@kernel_if_missing("GridSample")
def grid_sample(node: KernelNode):
    """GridSample: X [N, C, D1, ...] read at the normalized grid points [N, O1, ..., k]
    (last axis x, y, z: reversed spatial order) by nearest, (bi)linear or (bi)cubic
    interpolation, with zeros, border or reflection padding."""
    mode = node.attrs.get("mode", "linear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)  # the opset-16 names
    if mode not in ("nearest", "linear", "cubic"):
        raise NotImplementedError(f"GridSample mode '{mode}'")
    padding = node.attrs.get("padding_mode", "zeros")
    if padding not in ("zeros", "border", "reflection"):
        raise NotImplementedError(f"GridSample padding_mode '{padding}'")
    align = bool(node.attrs.get("align_corners", 0))

    def run(x, grid):
        dims = x.shape[2:]
        k = len(dims)
        lo = [0.0 if align else -0.5] * k
        hi = [d - 1.0 if align else d - 0.5 for d in dims]
        out = np.zeros((x.shape[0], x.shape[1]) + grid.shape[1:-1], dtype=np.float64)
        for n in range(x.shape[0]):
            image = x[n].astype(np.float64)
            g = grid[n].reshape(-1, k).astype(np.float64)[:, ::-1]  # spatial order
            coords = []
            for i, size in enumerate(dims):
                # 1. Normalized [−1, 1] to pixel coordinates.
                if align:
                    c = (g[:, i] + 1) / 2 * (size - 1)
                else:
                    c = ((g[:, i] + 1) * size - 1) / 2
                if mode == "nearest":
                    c = np.rint(c)  # halves to even, as PyTorch rounds
                # 2. Coordinates outside the image move in for border and reflection.
                outside = (c < lo[i]) | (c > hi[i])
                if padding == "border":
                    c = np.where(outside, np.clip(c, 0, size - 1), c)
                elif padding == "reflection":
                    c = np.where(outside, _reflect(c, lo[i], hi[i]), c)
                coords.append(c)
            out[n] = _interpolate(image, coords, mode, padding, lo, hi).reshape(out.shape[1:])
        return (out.astype(x.dtype),)

    return run


def _interpolate(image, coords, mode, padding, lo, hi) -> np.ndarray:
    """image [C, D1, ...] at the points `coords` (one array per spatial axis): [C, P]."""
    dims = image.shape[1:]

    # 1. The taps along each axis: integer positions and weights.
    taps = []
    for c in coords:
        if mode == "nearest":
            taps.append([(c.astype(np.int64), np.ones_like(c))])
            continue
        base = np.floor(c)
        t = c - base
        base = base.astype(np.int64)
        if mode == "linear":
            taps.append([(base, 1 - t), (base + 1, t)])
        else:
            taps.append([(base + j - 1, w) for j, w in enumerate(_cubic_weights(t))])

    # 2. Sum over every combination of taps, reading pixels under the padding mode.
    total = np.zeros((image.shape[0], coords[0].shape[0]))
    for combo in np.ndindex(*[len(t) for t in taps]):
        weight = np.ones_like(coords[0])
        index = []
        valid = np.ones(coords[0].shape, dtype=bool)
        for axis, j in enumerate(combo):
            i, w = taps[axis][j]
            weight = weight * w
            size = dims[axis]
            if padding == "zeros":
                valid &= (i >= 0) & (i < size)
                i = np.clip(i, 0, size - 1)
            elif padding == "border":
                i = np.clip(i, 0, size - 1)
            else:
                i = np.clip(
                    _reflect(i.astype(np.float64), lo[axis], hi[axis]).astype(np.int64), 0, size - 1
                )
            index.append(i)
        total += image[(slice(None), *index)] * (weight * valid)
    return total
