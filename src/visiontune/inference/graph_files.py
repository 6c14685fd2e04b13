"""Exported graphs from anyone: read their files without following links and bound what they can
allocate, before ONNX Runtime or OpenVINO sees them.

An ONNX file or an OpenVINO ``.xml``/``.bin`` pair may come from a stranger (an archive keeps
symbolic links). Two attacks are closed here:

- **Reading through a link.** ``model.bin -> /some/secret`` makes the runtime load the secret as
  weights, and a crafted graph returns its bytes as probabilities. So the runtimes never open a
  path: every file is opened here with ``O_NOFOLLOW`` relative to its folder (a link, a device, a
  FIFO or a name leaving the folder is refused, naming the file), read into memory and handed
  over as bytes. An ONNX file's external data (``location`` beside the file) is inlined the same
  way.
- **Allocation bombs.** A few kilobytes of graph can ask for gigabytes: ``Broadcast`` of a scalar
  to ``[40000, 10000]`` is folded into a 1.6 GB constant when the model compiles. Before a runtime
  compiles the graph, every tensor computed from constants alone (what constant folding
  materialises) must have a static shape, and their elements together stay within
  :data:`FOLD_BASE` plus :data:`FOLD_PER_BYTE` per byte of the model's files (real graphs fold
  weight-sized tensors: transposes, reshapes, casts); every other tensor's static part (dynamic
  dimensions counted as 1) stays within :data:`MAX_TENSOR` elements.

Example:
    >>> import tempfile, os
    >>> folder = Path(tempfile.mkdtemp()); os.symlink("/etc/hostname", folder / "model.bin")
    >>> try:
    ...     read_beside(folder, "model.bin", 1 << 20)
    ... except ExportError as exc:
    ...     print("symbolic link" in str(exc))
    True
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..core.errors import ExportError

MAX_GRAPH_BYTES = 8 * 2**30  # one graph file or external data file; beyond this it is no classifier
MAX_TENSOR = 2**27  # elements of one computed tensor per image (ViT-L at 512 px peaks at ~2**24)
FOLD_BASE = 2**24  # elements constant folding may create in any graph (64 MiB of float32)...
FOLD_PER_BYTE = 2  # ...plus this many per byte of the graph's files (real graphs fold < 1 per byte)
PROTOBUF_LIMIT = 2**31 - 1  # one serialised ONNX model (external data is inlined into it)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def opened_folder(path: str | os.PathLike) -> Iterator[int]:
    """A descriptor of the folder ``path`` (the user's own path: links in it are the user's choice),
    closed afterwards; files in it are then opened relative to it, so they stay in it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ExportError(f"cannot open the folder {path}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def read_in(dir_fd: int, name: str, limit: int = MAX_GRAPH_BYTES, where: str | os.PathLike = "") -> bytes:
    """The bytes of the regular file ``name`` directly in the folder ``dir_fd``, never through a link.

    Raises:
        ExportError: ``name`` is not a plain file name, is a link or not a regular file, is larger
            than ``limit`` bytes, or cannot be read; the message names the file (``where``).
    """
    shown = os.path.join(str(where), name) if where else name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ExportError(f"{shown}: a model's files must lie directly in its folder; {name!r} does not")
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENXIO and _is_link(dir_fd, name)):
            raise ExportError(f"{shown} is a symbolic link; visiontune never reads a model's files through a "
                              "link (it may point at any file). Copy the real file into the folder") from None
        raise ExportError(f"cannot read {shown}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ExportError(f"{shown} is not a regular file; a model's files must be plain files")
        if info.st_size > limit:
            raise ExportError(f"{shown} is {info.st_size / 2**30:.1f} GiB, more than the {limit / 2**30:.0f} GiB "
                              "a model file may have")
        # read what fstat saw, plus one byte: Python sizes the buffer by the request, never by a constant bound
        data = fh.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise ExportError(f"{shown} changed while it was read; run the command again")
    return data


def entry_mode(dir_fd: int, name: str) -> int | None:
    """The ``st_mode`` of ``name`` itself in the folder ``dir_fd`` (a link is not followed); None when absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None


def _is_link(dir_fd: int, name: str) -> bool:
    return stat.S_ISLNK(entry_mode(dir_fd, name) or 0)


def read_beside(folder: str | os.PathLike, name: str, limit: int = MAX_GRAPH_BYTES) -> bytes:
    """:func:`read_in` for ``folder``'s file ``name``."""
    with opened_folder(folder) as fd:
        return read_in(fd, name, limit, folder)


def check_fold_budget(folded: Iterable[tuple[str, int | None]], other: Iterable[tuple[str, int]],
                      file_bytes: int, where: str | os.PathLike) -> None:
    """Refuse a graph that would allocate beyond the bounds above before a runtime compiles it.

    Args:
        folded: ``(what, elements)`` of each tensor computed from constants alone; ``None`` where
            its shape is not static (it cannot be bounded, so it is refused).
        other: ``(what, elements)`` of the static part of every other computed tensor.
        file_bytes: the size of the graph's files.
        where: the graph's path, for messages.
    """
    budget = FOLD_BASE + FOLD_PER_BYTE * file_bytes
    total = 0
    for what, elements in folded:
        if elements is None:
            raise ExportError(f"{where}: {what} is computed from constants into a shape that is not known before "
                              "running; visiontune refuses graphs whose constant folding it cannot bound")
        total += elements
        if total > budget:
            raise ExportError(f"{where}: constant folding would create {total:,}+ elements (at {what}) from "
                              f"{file_bytes:,} bytes of files, more than the {budget:,} a model of this size may; "
                              "this graph is crafted to exhaust memory. Re-export the model with visiontune")
    for what, elements in other:
        if elements > MAX_TENSOR:
            raise ExportError(f"{where}: {what} holds {elements:,} elements per image, more than the {MAX_TENSOR:,} "
                              "a classifier needs; this graph would exhaust memory. Re-export the model with "
                              "visiontune")


# ----------------------------------------------------------------------------- ONNX
def onnx_model_bytes(path: str | os.PathLike, dir_fd: int | None = None) -> bytes:
    """The ONNX model at ``path`` as one self-contained, checked serialisation for ONNX Runtime.

    Read without following links (relative to ``dir_fd`` when given, else ``path``'s folder),
    external data inlined from plain files beside it, sparse tensors refused (they expand when
    densified), constant folding and tensor sizes bounded (:func:`check_fold_budget`).
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if dir_fd is None:
            dir_fd = stack.enter_context(opened_folder(path.parent))
        data = read_in(dir_fd, path.name, where=path.parent)
        import onnx  # lazy: only exported graphs need it

        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception:
            raise ExportError(f"{path} is not a usable ONNX model (not an ONNX protobuf)") from None
        file_bytes = len(data) + _inline_external_data(model, dir_fd, path)
    _check_onnx_graph(model, file_bytes, path)
    if file_bytes > len(data):
        if model.ByteSize() > PROTOBUF_LIMIT:
            raise ExportError(f"{path} with its external data is over 2 GB; visiontune loads ONNX models up to 2 GB")
        data = model.SerializeToString()
    return data


def _tensors(graph) -> Iterator[Any]:
    """Every tensor stored in ``graph`` and its subgraphs: initializers and Constant values."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors(sub)


def _has_sparse(graph) -> bool:
    from onnx import AttributeProto

    if len(graph.sparse_initializer):
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
                return True
            if attr.type == AttributeProto.GRAPH and _has_sparse(attr.g):
                return True
            if attr.type == AttributeProto.GRAPHS and any(_has_sparse(g) for g in attr.graphs):
                return True
    return False


def _inline_external_data(model, dir_fd: int, path: Path) -> int:
    """Move each external tensor's bytes into the model, read from a plain file beside it; the bytes read."""
    from onnx import TensorProto

    files: dict[str, bytes] = {}
    total = 0
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = info.get("location", "")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise ExportError(f"{path}: tensor {tensor.name!r} has an unreadable external data offset") from None
        if name not in files:
            files[name] = read_in(dir_fd, name, where=path.parent)
            total += len(files[name])
        blob = files[name]
        end = len(blob) if length < 0 else offset + length
        if offset < 0 or end > len(blob) or end < offset:
            raise ExportError(f"{path}: tensor {tensor.name!r} points outside its external data file {name!r}")
        tensor.raw_data = blob[offset:end]
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
    return total


def _check_onnx_graph(model, file_bytes: int, path: Path) -> None:
    """Static shapes (ONNX shape inference with data propagation) of every value, then the bounds."""
    import onnx

    if _has_sparse(model.graph):
        raise ExportError(f"{path} holds sparse tensors, which expand when densified; visiontune exports "
                          "none. Re-export the model with visiontune")
    # shape inference reads only the dims of large initializers: infer on a copy without their bytes
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for tensor in light.graph.initializer:
        if len(tensor.raw_data) > 4096:
            tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{path} is not a usable ONNX model ({first[:200]})") from None
    graph = inferred.graph
    shapes: dict[str, list[int | None] | None] = {}
    for value in [*graph.value_info, *graph.output]:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type" or not value.type.tensor_type.HasField("shape"):
            shapes[value.name] = None
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in value.type.tensor_type.shape.dim]
    constant = {t.name for t in graph.initializer}
    folded: list[tuple[str, int | None]] = []
    other: list[tuple[str, int]] = []
    for index, node in enumerate(graph.node):
        inputs = [name for name in node.input if name]
        foldable = node.op_type == "Constant" or (bool(inputs) and all(name in constant for name in inputs))
        for name in node.output:
            if not name:
                continue
            what = f"node {index} ({node.op_type}) output {name!r}"
            shape = shapes.get(name)
            if foldable:
                constant.add(name)
                if node.op_type != "Constant":  # a Constant's bytes are in the file already
                    folded.append((what, _elements(shape)))
            elif shape is not None:
                other.append((what, _elements([d if d is not None else 1 for d in shape]) or 0))
    check_fold_budget(folded, other, file_bytes, path)


def _elements(shape: list[int | None] | None) -> int | None:
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    count = 1
    for d in shape:
        count *= d
    return count


# ----------------------------------------------------------------------------- OpenVINO
def read_openvino(core: Any, path: str | os.PathLike, dir_fd: int | None = None) -> Any:
    """The OpenVINO model ``path`` (``.xml``, its ``.bin`` beside it) read from memory, checked.

    Both files are read without following links (relative to ``dir_fd`` when given), so OpenVINO
    never opens a path itself; then the folding and tensor bounds are checked on the model's
    inferred shapes, before anything compiles it.
    """
    import numpy as np
    import openvino as ov

    path = Path(path)
    with contextlib.ExitStack() as stack:
        if dir_fd is None:
            dir_fd = stack.enter_context(opened_folder(path.parent))
        xml = read_in(dir_fd, path.name, where=path.parent)
        weights_name = path.with_suffix(".bin").name
        weights = read_in(dir_fd, weights_name, where=path.parent) if entry_mode(dir_fd, weights_name) else b""
    tensor = ov.Tensor(np.frombuffer(weights, np.uint8).copy()) if weights else ov.Tensor(np.zeros(0, np.uint8))
    model = core.read_model(xml, tensor)
    check_openvino_model(model, len(xml) + len(weights), path)
    return model


def check_openvino_model(model: Any, file_bytes: int, where: str | os.PathLike) -> None:
    """:func:`check_fold_budget` on an OpenVINO model's ops (shapes as OpenVINO inferred them)."""
    constant: set[str] = set()
    folded: list[tuple[str, int | None]] = []
    other: list[tuple[str, int]] = []
    for op in model.get_ordered_ops():
        kind, name = op.get_type_name(), op.get_name()  # unique, unlike friendly names a file sets
        sources = [value.get_node().get_name() for value in op.input_values()]
        foldable = kind == "Constant" or (kind not in ("Parameter", "ReadValue") and bool(sources)
                                          and all(s in constant for s in sources))
        if foldable:
            constant.add(name)
        if kind in ("Result", "Constant"):  # a Constant's bytes are in the .bin already
            continue
        for index, output in enumerate(op.outputs()):
            shape = output.get_partial_shape()
            what = f"{kind} {op.get_friendly_name()!r} output {index}"
            if foldable:
                folded.append((what, _elements([d.get_length() if d.is_static else None for d in shape])
                               if shape.rank.is_static else None))
            elif shape.rank.is_static:
                other.append((what, _elements([d.get_length() if d.is_static else 1 for d in shape]) or 0))
    check_fold_budget(folded, other, file_bytes, where)
