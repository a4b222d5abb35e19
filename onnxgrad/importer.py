"""Load, validate and normalize ONNX models; find their trainable parameters.

`load` is the first stage of the pipeline. It gives every later stage one predictable
kind of model: checked, local functions inlined, every node named, the default domain at
one canonical opset where onnx's version converter can bring it there, and shapes
inferred. This module imports nothing else of onnxgrad's but its errors.

External data is read into the protobuf unless the model's external data total
`KEEP_EXTERNAL_FROM` bytes or more. Then the graph's initializers of 1 KiB or more stay on
disk: each keeps its `location`, `offset` and `length`, and gains onnx's `basepath` key,
the model's folder as an absolute path. The reference lives in the tensor itself, so it
survives every copy of the proto that the stages make (a side table keyed by the proto's
id would not), and the proto stays small: it is checked (`checkable`), inferred,
converted and copied without ever holding the weights, so models past protobuf's 2 GiB
work. `tensor_array` is the one way to read a tensor's value: it memory-maps data kept on
disk, read-only, so a weight costs no memory until a kernel reads it, and then one copy in
the page cache however many sessions share it.

Why a threshold and not always: a model read into memory is self-contained (any tool can
save it; the onnxruntime backend hands it over as bytes), which a small model should stay.
Why a low one: every stage copies, checks and infers the proto, so weights held in it cost
time and memory many times over. Measured on this project's machine with two float32
MatMul weights (wall time and peak memory of the process; in memory, then kept on disk):

| external data | `Session(load(path))`, one run   | `Trainer` step and `save`        |
| ------------: | -------------------------------- | -------------------------------- |
|         67 MB | 1.3 s, 0.37 GiB; 0.3 s, 0.12 GiB | 3.4 s, 0.65 GiB; 0.8 s, 0.28 GiB |
|        268 MB | 4.5 s, 1.30 GiB; 0.2 s, 0.31 GiB | 26 s, 2.31 GiB; 4.0 s, 0.97 GiB  |
|        537 MB | 8.5 s, 2.55 GiB; 0.4 s, 0.56 GiB | 47 s, 4.56 GiB; 2.3 s, 1.81 GiB  |

A `basepath` is honored only in a ModelProto given to `load` (onnxgrad's own stages hand
these on); in a file or in bytes it is ignored, so a model file can still only read data
inside its own folder. Writers (`onnxgrad.export`) never write it.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
from google.protobuf.message import EncodeError
from onnx import external_data_helper, helper, numpy_helper

from onnxgrad.errors import ModelLoadError

logger = logging.getLogger(__name__)

CANONICAL_OPSET = 18
"""Models below this default-domain opset are converted up to it; newer ones stay as they are."""

# ai.onnx.ml ops whose output has their input's shape, and the output's element type (None:
# the input's). onnx infers neither for some of them, which leaves every shape after a
# leading Scaler (scikit-learn pipelines) unknown.
_ML_SAME_SHAPE: dict[str, int | None] = {
    "Binarizer": None,
    "Imputer": None,
    "Normalizer": onnx.TensorProto.FLOAT,
    "Scaler": onnx.TensorProto.FLOAT,
}

FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
    }
)

# Float inputs that hold configuration rather than weights: (op_type, input index).
# Initializers consumed only here are not parameters.
_CONFIG_INPUTS = frozenset(
    {
        ("Resize", 1),
        ("Resize", 2),
        ("Upsample", 1),
        ("Clip", 1),
        ("Clip", 2),
        ("Pad", 2),
        ("Dropout", 1),
        ("BatchNormalization", 3),
        ("BatchNormalization", 4),
    }
)

Source = str | os.PathLike | bytes | onnx.ModelProto

KEEP_EXTERNAL_FROM = 2**28
"""A model whose external data total at least this many bytes (256 MiB) keeps its large
initializers on disk, memory-mapped (see the module docstring); smaller ones are read into
memory."""

SMALL_TENSOR = 1024
"""Initializers under this many bytes are read into memory even when the model keeps the
rest on disk: shape constants then stay visible to shape inference (onnx's own default
threshold for external data)."""

BASEPATH = "basepath"
"""The external-data key (onnx's own) that holds the absolute folder of a kept tensor."""

PROTO_LIMIT = 2**31 - 2**26
"""The most bytes onnxgrad holds in one protobuf: 2 GiB, protobuf's limit, less 64 MiB of
room for what later stages add (gradient nodes, metadata). Past it, weights must live in
external data."""

MAPPED_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.BOOL,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.COMPLEX64,
        onnx.TensorProto.COMPLEX128,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.FLOAT8E4M3FN,
        onnx.TensorProto.FLOAT8E4M3FNUZ,
        onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ,
    }
)
"""Element types whose raw bytes are the numpy array as it is (on a little-endian machine):
memory-mapped without a copy. The packed ones (4-bit, 2-bit, ...) are converted by onnx."""

# One read-only mapping per data file (by path and identity), shared by every array that
# views it and unmapped when the last of them goes.
_MAPPINGS: dict[tuple, weakref.ref] = {}


def load(
    source: Source,
    *,
    convert: bool = True,
    infer_shapes: bool = True,
    check: bool = True,
) -> onnx.ModelProto:
    """Load and normalize a model.

    Args:
        source: a path, the serialized bytes, or a ModelProto (not modified).
        convert: bring the default domain up to `CANONICAL_OPSET` where possible.
        infer_shapes: run onnx shape inference (with data propagation).
        check: run `onnx.checker.check_model`.

    Returns:
        A new ModelProto with every node named, and external data loaded or, for a model
        whose external data total `KEEP_EXTERNAL_FROM` bytes or more, kept on disk with a
        `basepath` (read the values with `tensor_array`).

    Raises:
        ModelLoadError: the file is missing, malformed, truncated or fails the checker.
    """
    model = read(source)
    size = in_memory_bytes(model)
    if size >= PROTO_LIMIT:
        raise ModelLoadError(
            f"{_describe(source)} holds {size / 2**30:.1f} GB in its protobuf, which cannot "
            "exceed 2 GB: save its weights as external data (onnx.save(model, path, "
            "save_as_external_data=True)) and load it from its path"
        )

    # 1. Check the model as it came, so errors name what the user wrote.
    if check:
        try:
            onnx.checker.check_model(checkable(model))
        except (onnx.checker.ValidationError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ModelLoadError(f"{_describe(source)} fails the ONNX checker: {first}") from err

    # 2. A negative size is an unknown one: paddle2onnx writes -1 for a dynamic dimension,
    #    which onnxruntime reads so and the ONNX spec leaves undefined.
    _unknown_negative_dims(model.graph)

    # 3. Inline local functions so every stage sees plain nodes.
    if model.functions:
        try:
            model = onnx.inliner.inline_local_functions(model)
        except Exception as err:  # noqa: BLE001 - onnx raises bare RuntimeErrors from C++ here
            raise ModelLoadError(f"cannot inline the local functions of {_describe(source)}: {err}")

    # 4. One canonical opset, where the converter can. What opset 6 meant by a PRelu
    #    slope is made explicit first: the converter keeps it as written. A model that
    #    imports no default-domain opset (ai.onnx.ml ops only) has nothing to convert.
    opset = opset_of(model)
    if 0 < opset < 7:
        _unsqueeze_legacy_prelu_slopes(model)
    if convert and 0 < opset < CANONICAL_OPSET:
        model = _convert(model, opset, source)

    # 5. Names for every node, for error messages and gradient naming.
    name_nodes(model.graph)

    # 6. Shapes and types of every tensor, as far as onnx can tell.
    if infer_shapes:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
            if _shape_ml_outputs(model):
                model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as err:  # noqa: BLE001 - inference is best effort; a warning says so
            logger.warning(
                "shape inference failed on %s (%s); continuing without it", _describe(source), err
            )
    return model


def _unknown_negative_dims(graph: onnx.GraphProto) -> None:
    """Clear every negative dim_value of the graph's declared values, leaving the size unknown."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.ClearField("dim_value")


def read(source: Source) -> onnx.ModelProto:
    """Parse a model and resolve its external data, confined to the model's folder.

    External data is read into the proto, or kept on disk with a `basepath` when it totals
    `KEEP_EXTERNAL_FROM` bytes or more (see the module docstring). A ModelProto whose
    tensors already carry a `basepath` (an earlier `load`'s) keeps them as they are.

    Args:
        source: a path, the serialized bytes, or a ModelProto (copied, not modified).

    Raises:
        ModelLoadError: missing file, malformed bytes, or external data that is outside the
            folder, missing, or shorter than its tensor.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base = None
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "the given bytes")
        base = None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"model file '{path}' does not exist")
        model = _parse(path.read_bytes(), f"'{path}'")
        base = path.resolve().parent
    else:
        raise ModelLoadError(
            f"cannot load a model from {type(source).__name__}: give a path, bytes or a ModelProto"
        )

    external = [t for t in _all_tensors(model) if _is_external(t)]
    if not isinstance(source, onnx.ModelProto):
        drop_basepaths(model)  # only onnxgrad's own protos may name a folder
    kept = [t for t in external if BASEPATH in external_info(t)]
    for tensor in kept:
        _locate(tensor, Path(external_info(tensor)[BASEPATH]))
    pending = [t for t in external if BASEPATH not in external_info(t)]
    if pending:
        if base is None:
            raise ModelLoadError(
                "the model refers to external data but was given without its folder: "
                "load it from its path instead"
            )
        _resolve_external(model, pending, base)
    return model


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of a tensor as a numpy array (read-only), wherever its bytes are.

    Data kept on disk (a tensor with a `basepath`, see the module docstring) is
    memory-mapped, not copied: the array views a read-only mapping of the file, so the
    file must not be changed in place while the array lives (writers in onnxgrad replace
    files by renaming, which leaves the mapping intact). Packed element types (4-bit,
    2-bit, ...) are read and converted by onnx. Anything else is `numpy_helper.to_array`.

    Raises:
        ModelLoadError: the tensor refers to external data that cannot be read.
    """
    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    info = external_info(tensor)
    location = info.get("location", "")
    if BASEPATH not in info:
        raise ModelLoadError(
            f"tensor '{tensor.name}' keeps its data in '{location}', in a folder onnxgrad "
            "does not know: load the model with onnxgrad.load from its path first"
        )
    path, offset, length = _locate(tensor, Path(info[BASEPATH]))
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in MAPPED_TYPES and sys.byteorder == "little":
        if count == 0:
            array = np.empty(tuple(tensor.dims), dtype)
            array.flags.writeable = False
            return array
        return np.frombuffer(_mapping(path, tensor), dtype, count, offset).reshape(tensor.dims)
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    try:
        external_data_helper.load_external_data_for_tensor(loaded, info[BASEPATH])
    except OSError as err:
        raise ModelLoadError(
            f"cannot read the external data of tensor '{tensor.name}' from '{path}': {err}"
        ) from err
    return numpy_helper.to_array(loaded)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The external-data entries of a tensor (location, offset, length, basepath, ...)."""
    return {e.key: e.value for e in tensor.external_data}


def kept_external(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of `model` that `load` left on disk (those with a `basepath`)."""
    return [t for t in _all_tensors(model) if _is_external(t) and BASEPATH in external_info(t)]


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as onnx's checker can take it: initializers kept on disk become inputs.

    The checker resolves external data against the current directory and refuses the
    absolute folders `basepath` holds; `read` has checked those tensors' files already. A
    graph input of the same name, type and shape checks the graph exactly as the
    initializer would (models below IR 4 list it as an input already). The model itself
    is returned when nothing is kept on disk.
    """
    graph = model.graph
    kept = {t.name for t in graph.initializer if _is_external(t)}
    if not kept:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    listed = {i.name for i in copy.graph.input}
    stay = []
    for tensor in copy.graph.initializer:
        if tensor.name not in kept:
            stay.append(tensor)
        elif tensor.name not in listed:
            info = helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            copy.graph.input.append(info)
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(stay)
    return copy


def in_memory_bytes(model: onnx.ModelProto) -> int:
    """The size of `model` as one protobuf (data kept on disk counts only its reference)."""
    try:
        return model.ByteSize()
    except EncodeError:  # protobuf cannot even measure a message past 2 GiB
        return max(PROTO_LIMIT, sum(_size(t) for t in model.graph.initializer))


def _size(tensor: onnx.TensorProto) -> int:
    try:
        return tensor.ByteSize()
    except EncodeError:
        return 2**31


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The opset version the model imports for `domain` (0 when it imports none)."""
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return 0


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a deterministic, unique name (`<OpType>_<index>`)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs of the graph: IR < 4 models also list initializers as inputs."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def trainable_parameters(model: onnx.ModelProto) -> list[str]:
    """Names of the initializers that hold trainable weights, in graph order.

    A parameter is a floating-point initializer of rank 1 or more that some node reads at a
    position holding data (not configuration such as Resize scales, Clip bounds, or
    BatchNormalization's running statistics). Rank-0 floats are exporter constants (the
    1.0 of `1 - x`, the sqrt(2) of GELU), never weights, and so are small tensors (up to
    4096 elements) holding an infinity or NaN, and one-element tensors that only Where
    reads as a value to select (the 0 and -inf of an attention mask, which exporters
    write with shape [1]).
    Reads inside the bodies of If, Loop and Scan count too: exporters put whole networks
    in an If branch.
    """
    consumers: dict[str, list[tuple[str, int]]] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for i, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node.op_type, i))
            for sub in subgraphs(node):
                collect(sub)

    collect(model.graph)
    params = []
    for t in model.graph.initializer:
        if t.data_type not in FLOAT_TYPES or len(t.dims) == 0:
            continue
        uses = consumers.get(t.name, [])
        if not uses or all(use in _CONFIG_INPUTS for use in uses):
            continue
        if _is_fill(t, uses):
            continue
        params.append(t.name)
    return params


def _is_fill(tensor: onnx.TensorProto, uses: list[tuple[str, int]]) -> bool:
    """Whether an initializer is a constant to select or mask with rather than a weight."""
    size = int(np.prod(tensor.dims, dtype=np.int64))
    if size == 1 and all(use in (("Where", 1), ("Where", 2)) for use in uses):
        return True
    if size > 4096:  # a real weight; reading it to look for infinities would cost memory
        return False
    return not bool(np.isfinite(tensor_array(tensor)).all())


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node holds (If's branches, Loop's and Scan's body), in attribute order."""
    out = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def op_label(node: onnx.NodeProto) -> str:
    """The node's op type as messages name it: prefixed by its domain outside ai.onnx."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Attribute values of a node: strings decoded, tensors as numpy arrays."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        elif isinstance(value, onnx.TensorProto):
            value = tensor_array(value)
        out[attr.name] = value
    return out


def initializer_arrays(model: onnx.ModelProto, names: Iterable[str] | None = None) -> dict:
    """The initializers of `model` as numpy arrays (all of them, or those named)."""
    wanted = None if names is None else set(names)
    return {
        t.name: tensor_array(t)
        for t in model.graph.initializer
        if wanted is None or t.name in wanted
    }


def tensor_type(model: onnx.ModelProto, name: str) -> onnx.TypeProto | None:
    """The declared or inferred type of tensor `name`, or None when unknown."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == name:
            return vi.type
    for t in g.initializer:
        if t.name == name:
            return helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return None


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ModelLoadError(
            f"{what} is not a valid ONNX model (truncated or not protobuf): {err}"
        ) from err
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{what} is not an ONNX model: it has no graph or no IR version")
    return model


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from external_data_helper._get_all_tensors(model)


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def drop_basepaths(model: onnx.ModelProto) -> None:
    """Remove the absolute folders `load` records from every tensor of `model`, in place:
    a file names only paths relative to its own folder."""
    for tensor in _all_tensors(model):
        entries = [(e.key, e.value) for e in tensor.external_data if e.key != BASEPATH]
        if len(entries) != len(tensor.external_data):
            del tensor.external_data[:]
            for key, value in entries:
                tensor.external_data.add(key=key, value=value)


def _resolve_external(model: onnx.ModelProto, tensors: list[onnx.TensorProto], base: Path) -> None:
    """Read external data into the tensors, or give them a `basepath` when it is large."""
    located = [(t, _locate(t, base)) for t in tensors]
    total = sum(length for _, (_, _, length) in located)
    keep = total >= KEEP_EXTERNAL_FROM
    initializers = {id(t) for t in model.graph.initializer}
    for tensor, (path, _, length) in located:
        if keep and id(tensor) in initializers and length >= SMALL_TENSOR:
            if "length" not in external_info(tensor):
                tensor.external_data.add(key="length", value=str(length))
            tensor.external_data.add(key=BASEPATH, value=str(base))
            continue
        location = external_info(tensor)["location"]
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except Exception as err:
            raise ModelLoadError(
                f"cannot read the external data of tensor '{tensor.name}' from '{location}': {err}"
            ) from err
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    if keep:
        logger.info(
            "%.1f GB of external data stay on disk in '%s' (memory-mapped)", total / 2**30, base
        )


def _locate(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """The file, offset and length of a tensor's external data, checked to lie in `base`."""
    info = external_info(tensor)
    location = info.get("location", "")
    target = (base / location).resolve()
    if (
        not location
        or os.path.isabs(location)
        or ".." in Path(location).parts
        or base.resolve() not in target.parents
    ):
        raise ModelLoadError(
            f"tensor '{tensor.name}' keeps its data at '{location}', outside the model's "
            f"folder '{base}': only relative paths inside it are allowed"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"tensor '{tensor.name}' keeps its data in '{location}', which is missing next "
            f"to the model in '{base}'"
        )
    size = target.stat().st_size
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError as err:
        raise ModelLoadError(
            f"tensor '{tensor.name}' has a malformed external offset or length in '{location}' "
            f"({err}): they must be whole numbers of bytes"
        ) from err
    want = _raw_bytes(tensor)
    if offset < 0 or length < 0 or offset + length > size or (want is not None and length < want):
        need = length if want is None else max(length, want)
        raise ModelLoadError(
            f"tensor '{tensor.name}' needs bytes {offset}..{offset + need} of '{location}' in "
            f"'{base}', which holds {size}: the data file is truncated or not this model's"
        )
    return target, offset, length


def _raw_bytes(tensor: onnx.TensorProto) -> int | None:
    """How many raw bytes a tensor of this type and shape takes (None: not fixed per element)."""
    if tensor.data_type not in MAPPED_TYPES:
        return None
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _mapping(path: Path, tensor: onnx.TensorProto) -> mmap.mmap:
    """A read-only mapping of `path`, shared while any array views it."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        found = _MAPPINGS.get(key)
        mapping = None if found is None else found()
        if mapping is None:
            with open(path, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for stale in [k for k, ref in _MAPPINGS.items() if ref() is None]:
                del _MAPPINGS[stale]
            _MAPPINGS[key] = weakref.ref(mapping)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot map the external data of tensor '{tensor.name}' from '{path}': {err}"
        ) from err
    return mapping


def _unsqueeze_legacy_prelu_slopes(model: onnx.ModelProto) -> None:
    """Make opset-6 PRelu slopes broadcast the way that opset meant them.

    Before opset 7, a 1-D slope of C values applied along axis 1 (the channels); from opset
    7 on, slopes broadcast numpy-style, from the last axis. The version converter keeps the
    slope as written, so a [C] slope of an [N, C, H, W] input (the old PyTorch exporter's
    PReLU(num_parameters=C)) would no longer broadcast. An Unsqueeze to [C, 1, 1] before
    each such PRelu keeps the meaning, and the slope itself keeps its shape (the trained
    weights still fit the original file).
    """
    if not any(n.op_type == "PRelu" for n in model.graph.node):
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without ranks no slope can be placed; left as written
        return
    ranks = {
        vi.name: len(vi.type.tensor_type.shape.dim)
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info)
        if vi.type.tensor_type.HasField("shape")
    }
    ranks.update({t.name: len(t.dims) for t in model.graph.initializer})
    single = {t.name for t in model.graph.initializer if int(np.prod(t.dims)) == 1}
    taken = {o for n in model.graph.node for o in n.output} | set(ranks)
    nodes = []
    for k, node in enumerate(model.graph.node):
        if node.op_type != "PRelu" or len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        rank, slope = ranks.get(node.input[0], 0), node.input[1]
        if rank > 2 and ranks.get(slope) == 1 and slope not in single:
            name = f"{node.name or f'PRelu_{k}'}/slope"
            while name in taken:
                name += "_"
            taken.add(name)
            axes = list(range(1, rank - 1))
            nodes.append(helper.make_node("Unsqueeze", [slope], [name], name, axes=axes))
            node.input[1] = name
            logger.debug(
                "PRelu node '%s': slope '%s' unsqueezed on axes %s", node.name, slope, axes
            )
        nodes.append(node)
    if len(nodes) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)


def _shape_ml_outputs(model: onnx.ModelProto) -> bool:
    """Type and shape shape-preserving ai.onnx.ml outputs from their input; True if any changed."""
    graph = model.graph
    infos = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    changed = False
    for node in graph.node:
        if node.domain != "ai.onnx.ml" or node.op_type not in _ML_SAME_SHAPE or not node.input:
            continue
        source = infos.get(node.input[0])
        if source is None or not source.type.tensor_type.HasField("shape"):
            continue
        target = infos.get(node.output[0])
        if target is None:
            target = graph.value_info.add()
            target.name = node.output[0]
            infos[target.name] = target
        tt = target.type.tensor_type
        if not tt.elem_type:
            tt.elem_type = _ML_SAME_SHAPE[node.op_type] or source.type.tensor_type.elem_type
            changed = True
        if not tt.HasField("shape"):
            tt.shape.CopyFrom(source.type.tensor_type.shape)
            changed = True
    return changed


def _convert(model: onnx.ModelProto, opset: int, source: Source) -> onnx.ModelProto:
    try:
        converted = onnx.version_converter.convert_version(model, CANONICAL_OPSET)
        if opset < 11 and any(n.op_type == "Pad" for n in converted.graph.node):
            _retype_pad_values(converted, _element_types(model))
        # The converter leaves the IR version as it was; the new opset needs a newer one
        # (what later stages write, such as TrainingInfoProto, checks it). Initializers
        # that an IR < 4 model lists as inputs stay listed: overridable inputs.
        needed = helper.find_min_ir_version_for(list(converted.opset_import), True)
        converted.ir_version = max(converted.ir_version, needed)
        # The converter can write invalid models (float32 constants beside float64 inputs);
        # only a full check with type inference catches that.
        onnx.checker.check_model(checkable(converted), full_check=True)
    except Exception as err:  # noqa: BLE001 - any converter failure leaves the model as written
        logger.warning(
            "%s stays at opset %d: the version converter cannot bring it to %d (%s)",
            _describe(source),
            opset,
            CANONICAL_OPSET,
            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
        )
        return model
    logger.debug("converted %s from opset %d to %d", _describe(source), opset, CANONICAL_OPSET)
    return converted


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every main-graph tensor whose type shape inference finds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)  # reads no external data
    except Exception:  # noqa: BLE001 - the types are only a hint for `_retype_pad_values`
        return {}
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _retype_pad_values(model: onnx.ModelProto, types: dict[str, int]) -> None:
    """Give the constant_value the converter adds to a Pad the type of the padded tensor.

    onnx's adapter from Pad-2's `value` attribute to Pad-11's input writes a float32
    Constant whatever the data type, which fails type inference for float64 (or float16)
    models; `types` are the element types of the model before conversion.
    """
    producers = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type != "Pad" or len(node.input) < 3 or not node.input[2]:
            continue
        want = types.get(node.input[0])
        constant = producers.get(node.input[2])
        if want is None or constant is None or not constant.attribute:
            continue
        tensor = constant.attribute[0].t
        if constant.attribute[0].name != "value" or tensor.data_type == want:
            continue
        value = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(want))
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))


def _describe(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{source}'"
    if isinstance(source, onnx.ModelProto):
        return f"model '{source.graph.name or 'unnamed'}'"
    return "the model"
