"""Write trained weights back into the original model, and export training graphs.

`save_model` rewrites the model exactly as the user gave it (not the opset-converted,
shape-inferred copy the other stages work on): the same nodes, names, opset imports, IR
version and metadata, with only the named initializers' values replaced. Weights that were
stored as external data stay external, at the same relative locations and offsets in the
output folder. Every file is first written to a temporary name in its destination folder
and then renamed over the target (`os.replace`), so no file is ever left half-written.

Models that `load` keeps on disk (external data past `importer.KEEP_EXTERNAL_FROM`) never
become one protobuf here either: `save_model` copies their data files with the trained
regions patched in, and `write_model` (the training graph) streams every large
initializer into `<file name>.data`, from the trained values or straight from the
original file's bytes. No file onnxgrad writes carries the `basepath` that `load` adds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from onnxgrad.errors import ExportError, ModelLoadError
from onnxgrad.importer import (
    BASEPATH,
    FLOAT_TYPES,
    MAPPED_TYPES,
    PROTO_LIMIT,
    SMALL_TENSOR,
    drop_basepaths,
    external_info,
    in_memory_bytes,
    kept_external,
    load,
    read,
    tensor_array,
    trainable_parameters,
)

logger = logging.getLogger(__name__)

# Where a TensorProto may hold its values; a replaced tensor has them all cleared first.
_DATA_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
    "raw_data",
)


# Offsets in the data files `write_model` writes: tensors of 1 MiB or more start on a
# 64 KiB boundary (the coarsest allocation granularity a runtime maps files with), the
# others on 64 bytes (any element type's alignment).
_ALIGN_LARGE = 65536
_ALIGN = 64

# Bytes copied from one data file to another per read.
_CHUNK = 2**24


def save_model(
    original_source: str | os.PathLike | bytes | onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    path: str | os.PathLike,
) -> None:
    """Write the original model with the named initializers' values replaced.

    Args:
        original_source: the model as the user gave it: a path (re-read without its
            external data), serialized bytes or a ModelProto.
        weights: new values by initializer name; each must keep its initializer's dtype
            and shape.
        path: the file to write. External data files are written next to it, at the same
            relative locations the original used.

    Raises:
        ExportError: the source cannot be read, a name is not an initializer, a value's
            dtype or shape differs, or external data cannot be found or written.
    """
    model, source_path = _read_original(original_source)
    base = None if source_path is None else source_path.parent
    path = Path(path)

    # 1. Check every weight against its initializer before touching anything.
    tensors = {t.name: t for t in model.graph.initializer}
    unknown = [name for name in weights if name not in tensors]
    if unknown:
        raise ExportError(
            f"cannot save weight(s) {', '.join(repr(n) for n in unknown)}: the model has no "
            f"initializer of that name (it has {len(tensors)}: "
            f"{_preview(list(tensors))}). Only initializers can be written back"
        )
    fresh = {name: _checked(tensors[name], np.asarray(value)) for name, value in weights.items()}

    # 2. Embedded initializers: replace their values in place. External ones are patched
    #    in step 3, from a view of the new value's bytes (no copy of a large weight).
    patches: dict[str, list[tuple[onnx.TensorProto, memoryview | bytes]]] = {}
    for name, value in fresh.items():
        tensor = tensors[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = external_info(tensor).get("location", "")
            patches.setdefault(location, []).append((tensor, _raw(tensor, value)))
            continue
        new = numpy_helper.from_array(value, name)
        for field in _DATA_FIELDS:
            tensor.ClearField(field)
        new.ClearField("name")
        new.ClearField("dims")
        new.ClearField("data_type")
        tensor.MergeFrom(new)

    # 3. External data: copy every file the model refers to, patching the trained regions,
    #    then the model; all to temporary files, renamed into place only once all are written.
    sources = _external_sources(model, base)
    folder = path.resolve().parent
    clobbered = [loc for loc, src in sources.items() if (folder / loc).resolve() == src.resolve()]
    if clobbered and path.resolve() != source_path:
        raise ExportError(
            f"saving '{path}' next to the original model would overwrite the external data it "
            f"still reads ({', '.join(sorted(clobbered))}): save into another folder, or over "
            "the original model itself"
        )
    drop_basepaths(model)
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for location in sorted(sources):
            staged.append(
                _stage_external(sources[location], folder, location, patches.get(location, []))
            )
        staged.append((_stage_bytes(folder, path.name, _serialize(model)), path.resolve()))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved %d trained weight(s) into '%s'", len(weights), path)


def export_training_model(
    trainer_or_model,
    path: str | os.PathLike,
    *,
    loss: str | None = None,
    wrt: Sequence[str] | None = None,
) -> None:
    """Write a training graph (forward, loss and gradient outputs) that any ONNX runtime runs.

    Args:
        trainer_or_model: a `Trainer` (its training graph, with the current parameter
            values as initializers), or a model (path, bytes or ModelProto) passed to
            `onnxgrad.gradient_model` with `loss` and `wrt`.
        path: the file to write (atomically). Models over 2 GiB, and models whose weights
            `load` keeps on disk, keep their weights in `<file name>.data` next to it.
        loss: the output to differentiate (models only).
        wrt: the tensors to differentiate with respect to (models only).

    Raises:
        ExportError: the file cannot be written.
    """
    if hasattr(trainer_or_model, "training_graph"):
        model = trainer_or_model.training_graph
        values = {**trainer_or_model.parameters, **trainer_or_model.buffers}
    else:
        from onnxgrad.autodiff.builder import gradient_model

        model = gradient_model(trainer_or_model, wrt=wrt, loss=loss)
        values = {}
    write_model(model, path, values)
    logger.info("exported the training graph to '%s'", path)


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    values: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write a model atomically, with its weights in external data when they must be.

    When the model keeps initializers on disk (`load` of a model with large external data)
    or would pass protobuf's 2 GiB, every initializer of `SMALL_TENSOR` bytes or more goes
    to `<file name>.data` next to `path`, tensors of 1 MiB or more at 64 KiB-aligned
    offsets, and the model names it by that relative location. Otherwise the model is one
    file, as `onnx.save` writes it. The model itself is not modified.

    Args:
        model: the model to write.
        path: the file to write.
        values: new values for initializers, by name (their dtype and shape kept).

    Raises:
        ExportError: a value names no initializer or does not fit it, or a file cannot be
            written.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = {t.name: t for t in out.graph.initializer}
    values = dict(values or {})
    unknown = [name for name in values if name not in tensors]
    if unknown:
        raise ExportError(
            f"cannot write value(s) for {', '.join(repr(n) for n in unknown)}: the model has "
            "no initializer of that name"
        )
    for name, value in values.items():
        values[name] = _checked(tensors[name], np.asarray(value))
    replaced = sum(tensors[name].ByteSize() for name in values)
    size = in_memory_bytes(out) - replaced + sum(v.nbytes for v in values.values())
    external = bool(kept_external(out)) or size > PROTO_LIMIT

    path = Path(path)
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        if external:
            location = f"{path.name}.data"
            staged.append((_stage_data(out, values, folder, location), folder / location))
        else:
            for name, value in values.items():
                tensors[name].CopyFrom(numpy_helper.from_array(value, name))
        staged.append((_stage_bytes(folder, path.name, _serialize(out)), path.resolve()))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


WEIGHT_FORMATS = (".safetensors", ".npz")
"""The file types `export_weights` writes, by extension."""


def export_weights(
    model: str | os.PathLike | bytes | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    trainable_only: bool = False,
) -> list[str]:
    """Write a model's weights under their initializer names, for other frameworks.

    PyTorch's exporters name initializers after the module's state_dict keys
    ("fc1.weight"), so `torch_model.load_state_dict(safetensors.torch.load_file(path))`
    takes the weights back, with these exceptions:

    - integer buffers (BatchNorm's num_batches_tracked) are not float weights and are not
      written; torch's BatchNorm fills the counter in when it is missing;
    - with the module in eval mode, both exporters fold a BatchNormalization that follows a
      Conv into the Conv's weights: the dynamo exporter keeps the name "conv.weight" for the
      fused values and drops "bn.*"; export with `optimize=False` (dynamo) to keep them
      apart;
    - the legacy exporter (dynamo=False) renames what its constant folding produced:
      fused or transposed weights become "onnx::Conv_23", "onnx::MatMul_41", ...; those
      have no state_dict key. Load with strict=False and check the missing keys, or export
      with `do_constant_folding=False`.

    Args:
        model: a path, bytes or ModelProto (external data is read from the model's folder).
        path: the file to write (atomically): `.safetensors` (needs the safetensors package,
            an optional extra) or `.npz`.
        trainable_only: only the trainable parameters (`onnxgrad.trainable_parameters`);
            by default every floating-point initializer, BatchNormalization statistics and
            exporter constants included.

    Returns:
        The names written, in graph order.

    Raises:
        ExportError: an unknown extension, safetensors missing, or an unreadable model.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_FORMATS:
        raise ExportError(
            f"cannot tell the weight format of '{path}': name it .safetensors or .npz"
        )
    try:
        stored = read(model)
        keep = set(trainable_parameters(load(stored))) if trainable_only else None
    except ModelLoadError as err:
        raise ExportError(f"cannot read the model to export its weights: {err}") from err

    # 1. Which initializers: all floating-point ones as stored, or the trainable ones.
    tensors = [t for t in stored.graph.initializer if t.data_type in FLOAT_TYPES]
    if keep is not None:
        tensors = [t for t in tensors if t.name in keep]
    weights = {t.name: np.ascontiguousarray(tensor_array(t)) for t in tensors}

    # 2. The file, written to a temporary name and renamed into place.
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import save as safetensors_bytes
        except ImportError as err:
            raise ExportError(
                "writing .safetensors needs the safetensors package, which is not installed: "
                "install the extra with `pip install onnxgrad[safetensors]`, or write .npz"
            ) from err
        data = safetensors_bytes(weights, metadata={"producer": "onnxgrad"})
    else:
        buffer = io.BytesIO()
        np.savez(buffer, **weights)
        data = buffer.getvalue()
    folder = path.resolve().parent
    if not folder.is_dir():
        raise ExportError(f"cannot write '{path}': folder '{folder}' does not exist")
    tmp = _stage_bytes(folder, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("exported %d weight(s) to '%s'", len(weights), path)
    return list(weights)


def _read_original(source) -> tuple[onnx.ModelProto, Path | None]:
    """The model exactly as stored, external data left on disk, and its resolved path."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"the original model '{path}' no longer exists: cannot write into it")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception as err:
            raise ExportError(f"cannot re-read the original model '{path}': {err}") from err
        # As `load` does: a file's data lies in its own folder, whatever folder it names.
        drop_basepaths(model)
        return model, path.resolve()
    try:
        return read(source), None
    except ModelLoadError as err:
        raise ExportError(f"cannot read the original model: {err}") from err


def _checked(tensor: onnx.TensorProto, value: np.ndarray) -> np.ndarray:
    """`value`, contiguous, once its dtype and shape are the initializer's."""
    want = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if value.dtype != want:
        raise ExportError(
            f"weight '{tensor.name}' is {value.dtype}, but the initializer is {np.dtype(want)}: "
            f"cast it (value.astype(np.{np.dtype(want).name})) before saving"
        )
    if tuple(value.shape) != tuple(tensor.dims):
        raise ExportError(
            f"weight '{tensor.name}' has shape {list(value.shape)}, but the initializer has "
            f"{list(tensor.dims)}: initializers keep their shape"
        )
    return np.ascontiguousarray(value)


def _external_sources(model: onnx.ModelProto, base: Path | None) -> dict[str, Path]:
    """The data file behind each external location of the original model, by location.

    A tensor that `load` kept on disk names its folder (`basepath`); the others are read
    from `base`, the original model's folder.
    """
    sources: dict[str, Path] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = external_info(tensor)
        location = info.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise ExportError(
                f"external data location '{location}' of tensor '{tensor.name}' is not a "
                "relative path inside the model's folder: cannot keep the layout"
            )
        folder = Path(info[BASEPATH]) if BASEPATH in info else base
        if folder is None:
            raise ExportError(
                "the model refers to external data but was given as bytes or a proto, without "
                "its folder: pass the model's path as the source"
            )
        source = folder / location
        if sources.setdefault(location, source) != source:
            raise ExportError(
                f"tensors read external data named '{location}' from two folders "
                f"('{sources[location].parent}' and '{folder}'): one output folder cannot "
                "hold both"
            )
    return sources


def _stage_data(
    model: onnx.ModelProto, values: Mapping[str, np.ndarray], folder: Path, location: str
) -> str:
    """Write the model's large initializers to a temporary data file, pointing them at it.

    Each tensor's bytes come from `values`, from the file `load` left it in, or from the
    proto; tensors under `SMALL_TENSOR` bytes that are not on disk stay in the proto.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{location}.", suffix=".tmp")
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as out:
            offset = 0
            for tensor in model.graph.initializer:
                value = values.get(tensor.name)
                on_disk = tensor.data_location == onnx.TensorProto.EXTERNAL
                if tensor.data_type == onnx.TensorProto.STRING:
                    if value is not None:
                        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
                    continue
                if value is not None:
                    raw = _raw(tensor, value)
                elif on_disk:
                    raw = None
                else:
                    raw = _raw(tensor, numpy_helper.to_array(tensor))
                length = int(external_info(tensor)["length"]) if raw is None else len(raw)
                if not on_disk and length < SMALL_TENSOR:
                    if value is not None:
                        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
                    continue
                pad = -offset % (_ALIGN_LARGE if length >= 2**20 else _ALIGN)
                out.write(bytes(pad))
                offset += pad
                if raw is None:
                    _copy_kept(tensor, out)
                else:
                    out.write(raw)
                for field in _DATA_FIELDS:
                    tensor.ClearField(field)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, entry in (("location", location), ("offset", offset), ("length", length)):
                    tensor.external_data.add(key=key, value=str(entry))
                offset += length
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    drop_basepaths(model)
    logger.debug("staged '%s': %d bytes of external data", location, offset)
    return tmp


def _raw(tensor: onnx.TensorProto, value: np.ndarray) -> memoryview | bytes:
    """The raw bytes ONNX stores for `value` (a view of it where they are its memory)."""
    if tensor.data_type in MAPPED_TYPES and sys.byteorder == "little":
        return memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    return numpy_helper.from_array(value, tensor.name).raw_data


def _copy_kept(tensor: onnx.TensorProto, out) -> None:
    """Copy the bytes of a tensor that `load` kept on disk from its file into `out`."""
    info = external_info(tensor)
    source = Path(info[BASEPATH]) / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    try:
        with open(source, "rb") as f:
            f.seek(offset)
            while length > 0:
                chunk = f.read(min(length, _CHUNK))
                if not chunk:
                    raise OSError(f"the file ends {length} bytes early")
                out.write(chunk)
                length -= len(chunk)
    except OSError as err:
        raise ExportError(
            f"cannot copy the external data of tensor '{tensor.name}' from '{source}': {err}"
        ) from err


def _stage_external(
    source: Path,
    folder: Path,
    location: str,
    patches: list[tuple[onnx.TensorProto, memoryview | bytes]],
) -> tuple[str, Path]:
    """Copy one external data file to a temporary file in `folder`, with trained values in it."""
    if not source.is_file():
        raise ExportError(
            f"the external data file '{location}' is missing next to the original model in "
            f"'{source.parent}': it is needed to write the untrained tensors it holds"
        )
    target = folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        _default_mode(fd)
        with os.fdopen(fd, "r+b") as out:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, out)
            size = out.tell()
            for tensor, raw in patches:
                info = external_info(tensor)
                offset = int(info.get("offset", 0))
                length = int(info.get("length", len(raw)))
                if length != len(raw) or offset + length > size:
                    raise ExportError(
                        f"tensor '{tensor.name}' occupies bytes {offset}..{offset + length} of "
                        f"'{location}' (of {size}), which does not fit its {len(raw)}-byte value"
                    )
                out.seek(offset)
                out.write(raw)
                if "checksum" in info:
                    _set_external(tensor, "checksum", hashlib.sha1(raw).hexdigest())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("staged '%s' with %d trained tensor(s)", location, len(patches))
    return tmp, target


def _set_external(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value


def _default_mode(fd: int) -> None:
    """Give a temporary file the permissions a plainly created file would have (mkstemp: 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)


def _stage_bytes(folder: Path, name: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        _default_mode(fd)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _stage_move(source: Path, folder: Path, name: str) -> str:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.replace(source, tmp)
    return tmp


def _serialize(model: onnx.ModelProto) -> bytes:
    try:
        return model.SerializeToString()
    except Exception as err:  # protobuf refuses messages over 2 GiB
        raise ExportError(
            f"cannot serialize the model ({err}); models over 2 GiB must keep their weights "
            "as external data"
        ) from err


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
