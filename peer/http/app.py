"""The Starlette app of the front door: KServe v2, /v1/embeddings, /metrics, explorer, control.

Every route is declared in ``build_app`` with its methods; state-changing and
credit-spending routes are wrapped in ``requires_token`` (see
``peer.http.auth``), the rest is read-only. Every handler runs inside
``_endpoint``, which times it for ``/metrics`` and turns errors into
``{"error": ...}`` answers with the right status, so a bad client gets a clear
message and never takes the peer down. Request bodies are capped while they
stream in (``read_body``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from peer import metrics
from peer.http import v2
from peer.http.auth import Endpoint, requires_token
from protocols.tensor import DEFAULT_LIMITS, TensorLimits

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# JSON numbers take up to ~25 bytes per element: cap JSON bodies well above the
# tensor limit so the tensor checks, not the body cap, reject big inputs.
JSON_BODY_FACTOR = 4
MAX_CONTROL_BODY = 64 * 1024
MAX_DEADLINE_S = 600.0
DEADLINE_GRACE_S = 5.0
_CID_RE = re.compile(r"[0-9a-f]{64}")


class HttpError(Exception):
    """An answer other than success: ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, *, openai: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.openai = openai


@dataclass
class FrontDoor:
    """What the routes need: the running peer, the token and the limits."""

    peer: Any
    token: str
    limits: TensorLimits = DEFAULT_LIMITS
    started: float = field(default_factory=time.time)
    _ads_cache: tuple[float, list[Any]] = (0.0, [])

    @property
    def max_body(self) -> int:
        return self.limits.max_total_bytes * JSON_BODY_FACTOR + 64 * 1024

    @property
    def registry(self) -> Any:
        market = getattr(self.peer, "market", None)
        return getattr(market, "registry", None)

    def local_entry(self, model: str) -> Any:
        """The local registry entry for a name, cid or cid prefix, or None."""
        registry = self.registry
        if registry is None:
            return None
        from edge_models.errors import ModelNotFound

        try:
            return registry.get(model)
        except ModelNotFound:
            return None

    async def ads(self, *, max_age: float = 5.0) -> list[Any]:
        """Ads we can find cheaply (no crawl), cached for ``max_age`` seconds."""
        at, ads = self._ads_cache
        if trio.current_time() - at < max_age:
            return ads
        with trio.move_on_after(5.0):
            found: list[Any] = await self.peer.find_ads(refresh=False)
            ads = found
        self._ads_cache = (trio.current_time(), ads)
        return ads

    async def run_job(
        self, model: str, arrays: dict[str, npt.NDArray[Any]], options: Mapping[str, Any]
    ) -> Any:
        """One job through the market (the same path as ``peer.infer``); errors as HttpError."""
        from edge_models.errors import EdgeModelError, ModelNotFound
        from peer.market import DeadlineExceeded, JobFailed, MarketFailure, UnknownModel
        from protocols.errors import ProtocolError

        if getattr(self.peer, "market", None) is None:
            raise HttpError(503, f"this node (role {self.peer.role}) runs no job market")
        max_price = _number(options, "max_price", 0.0, 1e9)
        deadline = _number(options, "deadline", 0.1, MAX_DEADLINE_S)
        budget = deadline if deadline is not None else self.peer.config.job_timeout or 30.0
        try:
            with trio.fail_after(budget + DEADLINE_GRACE_S):
                return await self.peer.infer(model, arrays, max_price=max_price, deadline=deadline)
        except (UnknownModel, ModelNotFound) as exc:
            raise HttpError(404, str(exc)) from None
        except (DeadlineExceeded, trio.TooSlowError) as exc:
            raise HttpError(504, str(exc) or f"no result within {budget:g} s") from None
        except MarketFailure as exc:  # NoExecutors, ExecutorsFailed
            raise HttpError(503, str(exc)) from None
        except (JobFailed, EdgeModelError, ProtocolError, ValueError) as exc:
            raise HttpError(400, str(exc)) from None


def _number(options: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise HttpError(400, f"parameter {key} must be a number")
    if not low <= value <= high:
        raise HttpError(400, f"parameter {key} must be between {low:g} and {high:g}")
    return float(value)


def front(request: Request) -> FrontDoor:
    door: FrontDoor = request.app.state.front_door
    return door


async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise HttpError(413, f"the request body is over the limit of {cap} bytes")
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise HttpError(413, f"the request body is over the limit of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, cap: int = MAX_CONTROL_BODY) -> dict[str, Any]:
    import json

    body = await read_body(request, cap)
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    return value


def _error(exc: HttpError) -> Response:
    if exc.openai:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        body: Any = {"error": {"message": str(exc), "type": kind, "code": exc.status}}
    else:
        body = {"error": str(exc)}
    return JSONResponse(body, status_code=exc.status)


def _endpoint(path: str, handler: Endpoint, *, openai: bool = False) -> Endpoint:
    """Time the handler and turn every failure into a JSON error (never a crash)."""

    async def endpoint(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await handler(request)
        except HttpError as exc:
            exc.openai = exc.openai or openai
            response = _error(exc)
        except v2.V2Error as exc:
            response = _error(HttpError(400, str(exc), openai=openai))
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, path)
            response = _error(
                HttpError(500, f"internal error: {type(exc).__name__}", openai=openai)
            )
        metrics.HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
        metrics.HTTP_SECONDS.labels(path).observe(time.perf_counter() - t0)
        return response

    marked: Any = endpoint
    marked.requires_token = getattr(handler, "requires_token", False)
    return endpoint


# --------------------------------------------------------------------------- KServe v2


async def v2_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def v2_ready(request: Request) -> Response:
    peer = front(request).peer
    ready = peer.role == "bootstrap" or getattr(peer, "market", None) is not None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def v2_server(request: Request) -> Response:
    return JSONResponse(
        {
            "name": "edgeswarm",
            "version": VERSION,
            "extensions": ["binary_tensor_data", "edgeswarm_market"],
            "parameters": {"peer_id": front(request).peer.peer_id},
        }
    )


def job_parameters(result: Any) -> dict[str, Any]:
    """Who ran a job and what it cost, for an answer's ``parameters``. ``local`` is true
    when this peer's own executor won the auction (self-award): then ``price`` is 0 and
    ``receipt_id`` is null, since a peer owes itself nothing and no receipt exists."""
    return {
        "receipt_id": None if result.receipt is None else result.receipt.receipt_id.hex(),
        "executor": result.executor,
        "local": result.receipt is None,
        "price": result.price,
        "model_cid": result.model_cid,
    }


def _tensor_meta(specs: Any) -> list[dict[str, Any]]:
    out = []
    for s in specs:
        dims = s.shape if s.shape is not None else [None]
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in dims]
        out.append(
            {
                "name": s.name,
                "datatype": v2.ONNX_TO_V2.get(s.dtype, s.dtype.upper()),
                "shape": shape,
            }
        )
    return out


async def _model_info(door: FrontDoor, model: str) -> dict[str, Any]:
    entry = door.local_entry(model)
    if entry is not None:
        return {
            "name": entry.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": _tensor_meta(entry.inputs),
            "outputs": _tensor_meta(entry.outputs),
            "parameters": {"cid": entry.cid, "local": True},
        }

    def serving(ads: list[Any]) -> list[tuple[Any, Any]]:
        return [
            (ad, m)
            for ad in ads
            for m in ad.models
            if m.cid == model or (m.name and m.name == model)
        ]

    servers = serving(await door.ads())
    if not servers:  # the cache may predate the ad that serves it: look once more, fresh
        servers = serving(await door.ads(max_age=0.0))
    if not servers:
        raise HttpError(404, f"unknown model {model!r}: not in the local registry nor in any ad")
    cids = sorted({m.cid for _, m in servers})
    if len(cids) > 1:
        raise HttpError(404, f"model name {model!r} is ambiguous: {', '.join(cids)}; use a cid")
    return {
        "name": servers[0][1].name or cids[0],
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [],
        "outputs": [],
        "parameters": {"cid": cids[0], "local": False, "servers": len(servers)},
    }


async def v2_model(request: Request) -> Response:
    return JSONResponse(await _model_info(front(request), request.path_params["model"]))


async def v2_model_ready(request: Request) -> Response:
    info = await _model_info(front(request), request.path_params["model"])
    return JSONResponse({"name": info["name"], "ready": True})


async def v2_infer(request: Request) -> Response:
    door = front(request)
    model = request.path_params["model"]
    body = await read_body(request, door.max_body)
    # BYTES inputs are object arrays of bytes: the market carries them as UTF-8 string
    # tensors (``protocols.tensor``), which ONNX Runtime takes as tensor(string).
    parsed = v2.decode_request(body, request.headers.get(v2.HEADER_LENGTH), door.limits)
    result = await door.run_job(model, parsed.arrays, parsed.parameters)
    params = job_parameters(result)
    params["latency_ms"] = round(result.latency_ms, 3)
    # The signed receipt: anyone can verify it offline (None for a local run).
    params["receipt"] = None if result.receipt is None else result.receipt.to_bytes().hex()
    out, headers = v2.encode_response(
        model_name=model, outputs=result.outputs, request=parsed, parameters=params
    )
    return Response(out, headers=headers)


# --------------------------------------------------------------------------- build


Handler = Callable[[Request], Awaitable[Response]]


def v2_routes() -> list[tuple[str, list[str], Handler]]:
    routes: list[tuple[str, list[str], Handler]] = [
        ("/v2/health/live", ["GET"], v2_live),
        ("/v2/health/ready", ["GET"], v2_ready),
        ("/v2", ["GET"], v2_server),
        ("/v2/models/{model}", ["GET"], v2_model),
        ("/v2/models/{model}/ready", ["GET"], v2_model_ready),
        ("/v2/models/{model}/infer", ["POST"], requires_token(v2_infer)),
    ]
    # tritonclient puts /versions/{version} in when a model_version is given.
    versioned = [
        (p.replace("{model}", "{model}/versions/{version}"), m, h)
        for p, m, h in routes
        if p.startswith("/v2/models/")
    ]
    return routes + versioned


def build_app(
    door: FrontDoor, extra: list[tuple[str, list[str], Handler]] | None = None
) -> Starlette:
    """The app for one peer. ``extra``: more (path, methods, handler) routes."""
    from peer.http import control, embeddings, explorer

    table = [
        *v2_routes(),
        *embeddings.routes(),
        *explorer.routes(),
        *control.routes(),
        *(extra or []),
    ]
    routes = [
        Route(path, _endpoint(path, handler, openai=path.startswith("/v1/")), methods=methods)
        for path, methods, handler in table
    ]
    routes.append(Route("/metrics", explorer.metrics_app(door.peer), methods=["GET"]))
    app = Starlette(routes=routes)
    app.state.front_door = door
    app.state.token = door.token
    return app
