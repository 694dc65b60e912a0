"""Cut one ONNX model into N stage models that run one after another (a pipeline).

How the cuts are chosen:

1. ``onnx.shape_inference.infer_shapes`` gives every tensor a dtype and shape.
2. Tensors that depend only on initializers (weights, dequantized weights,
   constant shapes) are *constant*: a stage that needs one recomputes it from
   its own copy of the weights, so constants never cross a cut.
3. The other nodes, in the graph's topological order, are the sequence to cut.
   A cut between positions k-1 and k is crossed by every non-constant tensor
   (model inputs included) produced before k and consumed at or after k
   (model outputs count as consumed at the end), plus the outer tensors that
   an If/Loop/Scan body reads. A cut is *clean* when every crossing tensor has
   a known dtype and no If/Loop/Scan body reads a tensor across it.
4. Each node has a compute cost (output elements x the inner dimension of a
   MatMul/Gemm/Conv, 1 per element otherwise) and a weight cost (the bytes of
   the initializers it reads, through constant nodes). A stage's load is the
   mean of its shares of both. Among clean cuts, a dynamic programme picks the
   N-1 cuts that minimise ``sum((N x load - 1)^2) + 0.1 x sum(log2(crossing /
   smallest crossing))``: balanced stages, and each cut near the fewest bytes
   (a transformer's layer boundary: hidden state and mask).
5. ``onnx.utils.Extractor`` cuts each stage out by tensor names (taught here to
   follow If/Loop bodies' outer reads). Stage i's outputs are exactly cut i's
   tensors, which are exactly stage i+1's inputs: a tensor needed two stages
   later passes through the stage in between unchanged.

Free dims (batch, sequence) count as ``FREE_DIM`` when costing and in the
manifest's bytes per cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.shape_inference
import onnx.utils
from onnx import TensorProto

from edge_models.errors import InvalidModel
from edge_models.spec import TensorSpec, subgraphs, tensor_spec
from protocols.errors import ProtocolError
from protocols.pipeline import (
    MAX_STAGES,
    CrossingTensor,
    Cut,
    PipelineManifest,
    Stage,
)

FREE_DIM = 32
CROSSING_WEIGHT = 0.1
MAX_CANDIDATES = 400
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_RANDOM = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)
_MATMUL = frozenset({"MatMul", "MatMulInteger", "FusedMatMul"})
_CONV = frozenset({"Conv", "ConvInteger", "QLinearConv", "ConvTranspose"})


class SplitError(InvalidModel):
    """The model cannot be cut cleanly into the requested number of stages."""


@dataclass(frozen=True)
class StageModel:
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    load: float  # share of compute and weights, 0..1


@dataclass(frozen=True)
class SplitPlan:
    stages: tuple[StageModel, ...]
    cuts: tuple[Cut, ...]
    inputs: tuple[CrossingTensor, ...]
    outputs: tuple[CrossingTensor, ...]

    def manifest(self, model_cid: str, stage_cids: Sequence[str]) -> PipelineManifest:
        stages = tuple(
            Stage(cid=c, inputs=s.inputs, outputs=s.outputs)
            for c, s in zip(stage_cids, self.stages, strict=True)
        )
        return PipelineManifest(
            model=model_cid, inputs=self.inputs, outputs=self.outputs, stages=stages, cuts=self.cuts
        )


_ITEMSIZE: dict[int, int] = {
    TensorProto.BOOL: 1,
    TensorProto.INT8: 1,
    TensorProto.UINT8: 1,
    TensorProto.INT16: 2,
    TensorProto.UINT16: 2,
    TensorProto.FLOAT16: 2,
    TensorProto.BFLOAT16: 2,
    TensorProto.INT32: 4,
    TensorProto.UINT32: 4,
    TensorProto.FLOAT: 4,
    TensorProto.INT64: 8,
    TensorProto.UINT64: 8,
    TensorProto.DOUBLE: 8,
}


def _implicit_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= _implicit_inputs(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names.extend(sorted(_implicit_inputs(sub)))
    return names


class _Extractor(onnx.utils.Extractor):
    """``onnx.utils.Extractor`` that also follows the outer reads of If/Loop/Scan bodies."""

    def _dfs_search_reachable_nodes(
        self, node_output_name: str, graph_input_names: set[str], reachable: set[int]
    ) -> None:
        stack = [node_output_name]
        while stack:
            name = stack.pop()
            if name in graph_input_names or name not in self.outmap:
                continue
            index = self.outmap[name]
            if index not in reachable:
                reachable.add(index)
                stack += _node_inputs(self.graph.node[index])

    def _collect_reachable_tensors(
        self, nodes: list[onnx.NodeProto]
    ) -> tuple[list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
        names: set[str] = set()
        for node in nodes:
            names.update(_node_inputs(node))
            names.update(node.output)
        initializer = [self.initializers[t] for t in self.initializers if t in names]
        value_info = [self.value_infos[t] for t in self.value_infos if t in names]
        return initializer, value_info


def _elems(dims: Sequence[int | str | None] | None) -> int:
    if dims is None:
        return FREE_DIM**2
    n = 1
    for d in dims:
        n *= d if isinstance(d, int) and d > 0 else (1 if d == 0 else FREE_DIM)
    return n


class _Graph:
    """The costs and lifetimes of one shape-inferred model's tensors."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        if g.sparse_initializer:
            raise SplitError("models with sparse initializers cannot be split")
        self.model = model
        self.specs: dict[str, TensorSpec] = {}
        self.elem_type: dict[str, int] = {}
        for v in [*g.input, *g.value_info, *g.output]:
            if v.type.WhichOneof("value") != "tensor_type":
                continue
            self.elem_type[v.name] = v.type.tensor_type.elem_type
            # A dtype we cannot carry leaves the tensor out: no clean cut through it.
            with contextlib.suppress(InvalidModel):
                self.specs[v.name] = tensor_spec(v, "tensor")
        inits = {t.name: t for t in g.initializer}
        self.inputs = [v.name for v in g.input if v.name not in inits]
        self.outputs = [v.name for v in g.output]
        # Weight bytes behind each constant tensor (initializers, and what constant nodes make).
        self.const_bytes: dict[str, int] = {
            name: _elems(list(t.dims)) * _ITEMSIZE.get(int(t.data_type), 4)
            for name, t in inits.items()
        }
        self.const_bytes[""] = 0
        self.seq: list[onnx.NodeProto] = []
        for node in g.node:
            ins = _node_inputs(node)
            if node.op_type not in _RANDOM and all(n in self.const_bytes for n in ins):
                total = sum(self.const_bytes[n] for n in ins)
                for a in node.attribute:
                    if a.HasField("t"):
                        total += len(a.t.raw_data)
                for out in node.output:
                    self.const_bytes[out] = total
            else:
                self.seq.append(node)

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        spec = self.specs.get(name)
        return None if spec is None else spec.shape

    def tensor_bytes(self, name: str) -> int:
        size = _ITEMSIZE.get(self.elem_type.get(name, int(TensorProto.FLOAT)), 4)
        return _elems(self.shape(name)) * size

    def compute(self, node: onnx.NodeProto) -> float:
        out_elems = sum(_elems(self.shape(o)) for o in node.output if o)
        inner = 1
        ins = list(node.input)
        if node.op_type in _MATMUL and ins:
            a = self.shape(ins[0])
            inner = a[-1] if a and isinstance(a[-1], int) else FREE_DIM
        elif node.op_type == "Gemm" and ins:
            a = self.shape(ins[0])
            trans = any(x.name == "transA" and x.i for x in node.attribute)
            dim = (a[0] if trans else a[-1]) if a else None
            inner = dim if isinstance(dim, int) else FREE_DIM
        elif node.op_type in _CONV and len(ins) > 1:
            w_name = ins[3] if node.op_type == "QLinearConv" and len(ins) > 3 else ins[1]
            w = self.shape(w_name)
            if w is None:
                init = next((t for t in self.model.graph.initializer if t.name == w_name), None)
                w = tuple(init.dims) if init is not None else None
            inner = _elems(w[1:]) if w else FREE_DIM
        return float(max(out_elems, 1) * max(inner, 1))

    def weights(self, node: onnx.NodeProto) -> float:
        return float(sum(self.const_bytes.get(n, 0) for n in _node_inputs(node)))


def _crossings(gr: _Graph) -> tuple[list[list[str]], list[bool]]:
    """For each cut position k (1..n-1): the tensors crossing it, and whether it is clean."""
    n = len(gr.seq)
    pos = {name: -1 for name in gr.inputs}
    for i, node in enumerate(gr.seq):
        for out in node.output:
            if out:
                pos[out] = i
    last: dict[str, int] = {}
    implicit_users: dict[str, int] = {}
    for i, node in enumerate(gr.seq):
        for name in _node_inputs(node):
            if name in pos:
                last[name] = i
        if node.op_type in _CONTROL_FLOW:
            for sub in subgraphs(node):
                for name in _implicit_inputs(sub):
                    if name in pos:
                        implicit_users[name] = max(implicit_users.get(name, -1), i)
    for name in gr.outputs:
        if name in pos:
            last[name] = n
    # Sweep: tensor t crosses every cut k with pos[t] < k <= last[t].
    start: dict[int, list[str]] = {}
    for name, p in pos.items():
        if name in last and last[name] > p:
            start.setdefault(p + 1, []).append(name)
    live: dict[str, None] = {}
    crossing: list[list[str]] = [[]]
    clean: list[bool] = [False]
    for name in start.get(0, []):
        live[name] = None
    for k in range(1, n):
        for name in start.get(k, []):
            live[name] = None
        for name in [t for t in live if last[t] < k]:
            del live[name]
        names = list(live)
        ok = all(t in gr.specs for t in names) and not any(
            pos[t] < k <= implicit_users.get(t, -1) for t in names
        )
        crossing.append(names)
        clean.append(ok and bool(names))
    return crossing, clean


def _choose(
    loads: Sequence[float], cross: Sequence[float], candidates: Sequence[int], stages: int
) -> list[int]:
    """The stages-1 cut positions (from ``candidates``) of least cost (see the module doc)."""
    n = len(loads)
    prefix = [0.0]
    for x in loads:
        prefix.append(prefix[-1] + x)
    low = min(cross[k] for k in candidates)

    def stage_cost(a: int, b: int) -> float:
        return (stages * (prefix[b] - prefix[a]) - 1.0) ** 2

    def cut_cost(k: int) -> float:
        return CROSSING_WEIGHT * math.log2(max(cross[k], 1.0) / max(low, 1.0))

    # best[j][c]: least cost of the first j+1 stages with cut j at candidate index c.
    inf = float("inf")
    m = len(candidates)
    best = [[inf] * m for _ in range(stages - 1)]
    back = [[-1] * m for _ in range(stages - 1)]
    for c, k in enumerate(candidates):
        best[0][c] = stage_cost(0, k) + cut_cost(k)
    for j in range(1, stages - 1):
        for c, k in enumerate(candidates):
            here = cut_cost(k)
            for p in range(c):
                if best[j - 1][p] == inf:
                    continue
                v = best[j - 1][p] + stage_cost(candidates[p], k) + here
                if v < best[j][c]:
                    best[j][c], back[j][c] = v, p
    finals = [best[-1][c] + stage_cost(k, n) for c, k in enumerate(candidates)]
    c = min(range(m), key=lambda i: finals[i])
    if finals[c] == inf:
        raise SplitError("no set of clean cuts gives every stage at least one node")
    chosen = []
    for j in range(stages - 2, -1, -1):
        chosen.append(candidates[c])
        c = back[j][c]
    return sorted(chosen)


def plan_split(model: onnx.ModelProto, stages: int) -> SplitPlan:
    """Choose the cuts and extract the stage models (raises ``SplitError`` with one line)."""
    if not 2 <= stages <= MAX_STAGES:
        raise SplitError(f"--stages must be 2..{MAX_STAGES}, got {stages}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # onnx raises several types
        raise SplitError(f"shape inference failed: {str(exc).splitlines()[0][:200]}") from exc
    gr = _Graph(inferred)
    n = len(gr.seq)
    if n < stages:
        raise SplitError(
            f"the model is too small to cut into {stages} stages: it has {n} "
            f"non-constant node{'s' if n != 1 else ''}"
        )
    crossing, clean = _crossings(gr)
    candidates = [k for k in range(1, n) if clean[k]]
    cross = [float(sum(gr.tensor_bytes(t) for t in names)) for names in crossing]
    if len(candidates) < stages - 1:
        why = (
            "control flow (If/Loop/Scan) reads tensors across every other cut"
            if any(node.op_type in _CONTROL_FLOW for node in gr.seq)
            else "the tensors crossing the other cuts have unknown types"
        )
        raise SplitError(
            f"cannot cut the model cleanly into {stages} stages: only {len(candidates)} clean "
            f"cut{'s' if len(candidates) != 1 else ''} ({why})"
        )
    if len(candidates) > MAX_CANDIDATES:
        keep = sorted(candidates, key=lambda k: cross[k])[:MAX_CANDIDATES]
        candidates = sorted(keep)
    compute = [gr.compute(node) for node in gr.seq]
    weights = [gr.weights(node) for node in gr.seq]
    tc, tw = sum(compute) or 1.0, sum(weights) or 1.0
    loads = [0.5 * c / tc + 0.5 * w / tw for c, w in zip(compute, weights, strict=True)]
    cuts_at = _choose(loads, cross, candidates, stages)

    extractor = _Extractor(inferred)
    bounds = [0, *cuts_at, n]
    boundaries = [list(gr.inputs), *(crossing[k] for k in cuts_at), list(gr.outputs)]
    stage_models = []
    for i in range(stages):
        ins, outs = boundaries[i], boundaries[i + 1]
        try:
            sub = extractor.extract_model(ins, outs)
            onnx.checker.check_model(sub)
        except Exception as exc:
            raise SplitError(
                f"stage {i + 1} could not be extracted: {str(exc).splitlines()[0][:200]}"
            ) from exc
        load = sum(loads[bounds[i] : bounds[i + 1]])
        stage_models.append(StageModel(sub, tuple(ins), tuple(outs), load))

    def tensors(names: Iterable[str]) -> tuple[CrossingTensor, ...]:
        out = []
        for name in names:
            spec = gr.specs.get(name)
            if spec is None:
                raise SplitError(f"tensor {name!r:.80} has no known dtype")
            out.append(CrossingTensor(name=name, dtype=spec.dtype, shape=spec.shape))
        return tuple(out)

    try:
        cuts = tuple(Cut(tensors=tensors(crossing[k]), bytes=int(cross[k])) for k in cuts_at)
        return SplitPlan(
            stages=tuple(stage_models),
            cuts=cuts,
            inputs=tensors(gr.inputs),
            outputs=tensors(gr.outputs),
        )
    except ProtocolError as exc:
        raise SplitError(str(exc)) from exc


@dataclass(frozen=True)
class SplitFiles:
    manifest: PipelineManifest
    manifest_path: Path
    stage_paths: tuple[Path, ...]


def write_split(plan: SplitPlan, model_cid: str, out_dir: Path, *, prefix: str = "") -> SplitFiles:
    """Write ``<prefix>stage<i>of<N>.onnx`` files and ``manifest.json`` (canonical bytes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, cids = [], []
    for i, stage in enumerate(plan.stages, start=1):
        data = stage.model.SerializeToString()
        path = out_dir / f"{prefix}stage{i}of{len(plan.stages)}.onnx"
        path.write_bytes(data)
        paths.append(path)
        cids.append(hashlib.sha256(data).hexdigest())
    try:
        manifest = plan.manifest(model_cid, cids)
    except ProtocolError as exc:
        raise SplitError(str(exc)) from exc
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_bytes(manifest.to_bytes())
    return SplitFiles(manifest=manifest, manifest_path=manifest_path, stage_paths=tuple(paths))
