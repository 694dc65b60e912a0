"""`edgeswarm models split MODEL --stages N`: cut a registered model into a pipeline.

Writes ``stage-<i>.onnx`` files and ``manifest.json`` to ``--out`` (default
``./<model>-<N>stages``), adds every stage to the model store (a stage is an
ordinary model: served, fetched and paid like any other) and registers the
manifest, whose sha256 is the pipeline's cid (``models list`` shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from peer.cli.common import DataDirOpt, JsonOpt, config_from_cli, fail, print_json
from peer.cli.local_api import running_peer
from peer.cli.models_cmd import ModelArg, models_app, open_registry

if TYPE_CHECKING:
    from edge_models.pipelines import PipelineEntry
    from edge_models.registry import Registry


def add_manifest(registry: Registry, path: Path, name: str | None) -> PipelineEntry:
    """``models add manifest.json``: register a pipeline (its stages may live on other peers)."""
    from edge_models.errors import EdgeModelError
    from protocols.pipeline import MAX_MANIFEST_BYTES

    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            fail(f"{path} is over {MAX_MANIFEST_BYTES} bytes: not a pipeline manifest")
        data = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    try:
        return registry.pipelines.add(data, name, source=f"file:{path.resolve()}")
    except EdgeModelError as exc:
        fail(str(exc))


def pipeline_line(entry: PipelineEntry, width: int) -> str:
    m = entry.manifest
    cross = ", ".join(f"{b} B" for b in m.crossing_bytes)
    return (
        f"{entry.name:<{width}}  {entry.cid[:12]}  pipeline of {len(m.stages)} stages over "
        f"{m.model[:12]} (crossing {cross})"
    )


@models_app.command("split")
def split_command(
    model: ModelArg,
    stages: Annotated[
        int, typer.Option("--stages", min=2, max=16, help="How many stage models to cut.")
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Where to write the stages and manifest.json."),
    ] = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Cut a model into N stages (balanced, few bytes crossing each cut) and register them."""
    import onnx

    from edge_models.errors import EdgeModelError
    from edge_models.split import plan_split, write_split

    cfg = config_from_cli(data_dir=data_dir)
    registry = open_registry(cfg)
    try:
        entry = registry.get(model)
        proto = onnx.load(str(registry.path_of(entry.cid)))
        plan = plan_split(proto, stages)
        del proto
        out_dir = out if out is not None else Path(f"{entry.name}-{stages}stages")
        files = write_split(plan, entry.cid, out_dir, prefix=f"{entry.name}-")
    except EdgeModelError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the stages: {exc.strerror or exc}")
    api = running_peer(cfg)
    stage_out: list[dict[str, Any]] = []
    for path, stage in zip(files.stage_paths, files.manifest.stages, strict=True):
        if api is not None:  # the running peer adds each stage and serves it at once
            added = api.call("POST", "/control/models", json={"path": str(path.resolve())})
            cid = added.json()["cid"]
        else:
            try:
                cid = registry.add_file(path).cid
            except EdgeModelError as exc:
                fail(str(exc))
        if cid != stage.cid:
            fail(f"stage file {path} changed while it was added")
        stage_out.append({"cid": cid, "path": str(path)})
    try:
        pipe = registry.pipelines.add(
            files.manifest.to_bytes(),
            source=f"split:{entry.cid}",
            default_name=f"{entry.name}-{stages}stages",
        )
    except EdgeModelError as exc:
        fail(str(exc))
    crossing = files.manifest.crossing_bytes
    if json_out:
        print_json(
            {
                "pipeline": pipe.cid,
                "manifest": str(files.manifest_path),
                "stages": stage_out,
                "crossing_bytes": crossing,
            }
        )
        return
    typer.echo(f"pipeline {pipe.name} {pipe.cid}")
    typer.echo(f"manifest {files.manifest_path}")
    for i, (s, cut) in enumerate(zip(stage_out, [*files.manifest.cuts, None], strict=True)):
        typer.echo(f"  stage {i + 1}  {s['cid'][:12]}  {s['path']}")
        if cut is not None:
            names = ", ".join(t.name for t in cut.tensors)
            typer.echo(f"    cut {i + 1}: {cut.bytes} B ({names})")
