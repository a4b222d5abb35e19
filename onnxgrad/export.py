"""Write trained weights back into the original model, and export training graphs.

`save_model` rewrites the model exactly as the user gave it (not the opset-converted,
shape-inferred copy the other stages work on): the same nodes, names, opset imports, IR
version and metadata, with only the named initializers' values replaced. Weights that were
stored as external data stay external, at the same relative locations and offsets in the
output folder. Every file is first written to a temporary name in its destination folder
and then renamed over the target (`os.replace`), so no file is ever left half-written.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from onnxgrad.errors import ExportError, ModelLoadError
from onnxgrad.importer import FLOAT_TYPES, load, read, trainable_parameters

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

# A serialized protobuf message cannot exceed 2 GiB; above this size, export external data.
_PROTO_LIMIT = 2**31 - 2**26


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
    fresh = {name: _serialized(tensors[name], np.asarray(value)) for name, value in weights.items()}

    # 2. Embedded initializers: replace their values in place.
    patches: dict[str, list[tuple[onnx.TensorProto, bytes]]] = {}
    for name, new in fresh.items():
        tensor = tensors[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = _external_info(tensor).get("location", "")
            patches.setdefault(location, []).append((tensor, new.raw_data))
            continue
        for field in _DATA_FIELDS:
            tensor.ClearField(field)
        new.ClearField("name")
        new.ClearField("dims")
        new.ClearField("data_type")
        tensor.MergeFrom(new)

    # 3. External data: copy every file the model refers to, patching the trained regions,
    #    then the model; all to temporary files, renamed into place only once all are written.
    locations = sorted(
        {
            _external_info(t).get("location", "")
            for t in external_data_helper._get_all_tensors(model)
            if t.data_location == onnx.TensorProto.EXTERNAL
        }
    )
    if locations and base is None:
        raise ExportError(
            "the model refers to external data but was given as bytes or a proto, without its "
            "folder: pass the model's path as the source"
        )
    folder = path.resolve().parent
    if locations and folder == base and path.resolve() != source_path:
        raise ExportError(
            f"saving '{path}' next to the original model would overwrite the external data it "
            f"still reads ({', '.join(locations)}): save into another folder, or over the "
            "original model itself"
        )
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        for location in locations:
            staged.append(_stage_external(base, folder, location, patches.get(location, [])))
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
        path: the file to write (atomically). Models over 2 GiB keep their weights in
            `<file name>.data` next to it.
        loss: the output to differentiate (models only).
        wrt: the tensors to differentiate with respect to (models only).

    Raises:
        ExportError: the file cannot be written.
    """
    if hasattr(trainer_or_model, "training_model"):
        model = trainer_or_model.training_model
    else:
        from onnxgrad.autodiff.builder import gradient_model

        model = gradient_model(trainer_or_model, wrt=wrt, loss=loss)
    path = Path(path)
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, Path]] = []
    try:
        if model.ByteSize() > _PROTO_LIMIT:
            location = f"{path.name}.data"
            external_data_helper.convert_model_to_external_data(
                model, all_tensors_to_one_file=True, location=location, size_threshold=1024
            )
            tmp_dir = tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.")
            try:
                external_data_helper.write_external_data_tensors(model, tmp_dir)
                staged.append(
                    (_stage_move(Path(tmp_dir) / location, folder, location), folder / location)
                )
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        staged.append((_stage_bytes(folder, path.name, _serialize(model)), path.resolve()))
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("exported the training graph to '%s'", path)


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
    weights = {t.name: np.ascontiguousarray(numpy_helper.to_array(t)) for t in tensors}

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
        return model, path.resolve()
    try:
        return read(source), None
    except ModelLoadError as err:
        raise ExportError(f"cannot read the original model: {err}") from err


def _serialized(tensor: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
    """`value` as a TensorProto, checked against the initializer it replaces."""
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
    return numpy_helper.from_array(np.ascontiguousarray(value), tensor.name)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _stage_external(
    base: Path, folder: Path, location: str, patches: list[tuple[onnx.TensorProto, bytes]]
) -> tuple[str, Path]:
    """Copy one external data file to a temporary file in `folder`, with trained values in it."""
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise ExportError(
            f"external data location '{location}' is not a relative path inside the model's "
            "folder: cannot keep the layout"
        )
    source = base / location
    if not source.is_file():
        raise ExportError(
            f"the external data file '{location}' is missing next to the original model in "
            f"'{base}': it is needed to write the untrained tensors it holds"
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
                info = _external_info(tensor)
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
