"""What a model is: its cid, name and exact input/output signature.

``inspect_model`` reads the signature from an ``onnx.ModelProto`` and refuses
what we will not run (external data, custom op domains, non-tensor inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto

from edge_models.errors import InvalidModel

# A dim is a fixed size (int), a symbolic name bound per call (str), or unknown (None).
Dim = int | str | None

_ONNX_DTYPES: dict[int, str] = {
    TensorProto.BOOL: "bool",
    TensorProto.INT8: "int8",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.UINT8: "uint8",
    TensorProto.UINT16: "uint16",
    TensorProto.UINT32: "uint32",
    TensorProto.UINT64: "uint64",
    TensorProto.FLOAT16: "float16",
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.STRING: "string",  # object arrays of str (protocols.tensor.STRING)
}


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output. ``shape`` is None when the rank is unknown."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": None if self.shape is None else list(self.shape),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        shape = d["shape"]
        return cls(
            name=str(d["name"]),
            dtype=str(d["dtype"]),
            shape=None if shape is None else tuple(shape),
        )


@dataclass(frozen=True)
class ModelEntry:
    """A model held by the registry; ``cid`` is the sha256 hex of its bytes."""

    cid: str
    name: str
    size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    source: str
    added_at: float = 0.0
    # The IPFS CIDv1 kubo gives these bytes (protocols.model_wire.ipfs_cid_of); "" if unknown.
    ipfs_cid: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "name": self.name,
            "size": self.size,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "opset": self.opset,
            "source": self.source,
            "added_at": self.added_at,
            "ipfs_cid": self.ipfs_cid,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelEntry:
        return cls(
            cid=str(d["cid"]),
            name=str(d["name"]),
            size=int(d["size"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            opset=int(d["opset"]),
            source=str(d["source"]),
            added_at=float(d.get("added_at", 0.0)),
            ipfs_cid=str(d.get("ipfs_cid", "")),
        )


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


def inspect_model(
    model: onnx.ModelProto, allowed_domains: frozenset[str], *, check: bool = True
) -> Signature:
    """Check a parsed model against our rules and read its signature.

    ``check=False`` leaves out ``onnx.checker``: the caller runs ``check_model_file``
    on the file once it has dropped the parsed model (one copy in memory, not two).
    """
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            raise InvalidModel(
                f"tensor {tensor.name!r} uses external data; expected a self-contained "
                "model file (save it with onnx.save(..., save_as_external_data=False))"
            )
    local_functions = {f.domain for f in model.functions}
    allowed = allowed_domains | local_functions
    used = {op.domain for op in model.opset_import} | set(_node_domains(model))
    bad = sorted(d for d in used if d not in allowed)
    if bad:
        raise InvalidModel(
            f"model uses operator domains {bad} that are not allowed "
            f"(allowed: {sorted({d or 'ai.onnx' for d in allowed_domains})})"
        )
    if check:
        _checked(onnx.checker.check_model, model)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_spec(v, "input") for v in graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, "output") for v in graph.output)
    opset = next(
        (op.version for op in model.opset_import if op.domain in ("", "ai.onnx")),
        0,
    )
    return Signature(inputs=inputs, outputs=outputs, opset=int(opset))


def check_model_file(path: str) -> None:
    """``onnx.checker`` on a model file (it reads the file itself: no serialized copy)."""
    _checked(onnx.checker.check_model, path)


def _checked(check: Callable[[Any], None], model: Any) -> None:
    try:
        check(model)
    except Exception as exc:  # the checker raises several types
        raise InvalidModel(f"not a valid ONNX model: {_first_line(exc)}") from exc


def _spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise InvalidModel(
            f"{role} {value.name!r} is a {kind or 'untyped value'}; only tensor inputs and "
            "outputs are supported"
        )
    tt = value.type.tensor_type
    dtype = _ONNX_DTYPES.get(tt.elem_type)
    if dtype is None:
        got = TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else "undefined"
        raise InvalidModel(
            f"{role} {value.name!r} has element type {got}; supported: "
            f"{', '.join(_ONNX_DTYPES.values())}"
        )
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        dims: list[Dim] = []
        for d in tt.shape.dim:
            which = d.WhichOneof("value")
            if which == "dim_value":
                dims.append(int(d.dim_value))
            elif which == "dim_param" and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorSpec(name=value.name, dtype=dtype, shape=shape)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _graph_nodes(sub)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    yield from _graph_nodes(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield node
            for sub in _subgraphs(node):
                yield from _graph_nodes(sub)


def _node_domains(model: onnx.ModelProto) -> Iterator[str]:
    for node in _all_nodes(model):
        yield node.domain


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices


def _all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    graphs = [model.graph]
    graphs.extend(g for node in _all_nodes(model) for g in _subgraphs(node))
    for graph in graphs:
        yield from _graph_tensors(graph)
    for node in _all_nodes(model):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def tensor_spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    """A value info's name, dtype and shape (``InvalidModel`` if it is no supported tensor)."""
    return _spec(value, role)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs a node's attributes hold (If/Loop/Scan bodies)."""
    return _subgraphs(node)
