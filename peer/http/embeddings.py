"""OpenAI-style ``POST /v1/embeddings`` for text-embedding models (e.g. the packaged MiniLM).

The text is tokenized here with the model's known tokenizer (models are known
by cid: ``edge_models.packaged``), the job runs through the market like any
other, and the sentence vectors are mean-pooled and normalized here. Errors
use OpenAI's shape, ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from peer.http.app import HttpError, front, job_parameters, read_json
from peer.http.auth import requires_token

MAX_INPUTS = 256
MAX_CHARS = 32 * 1024
MAX_TOKENS = 128  # the tokenizer truncates each input to this many tokens


async def _model_cid(request: Request, model: str) -> str:
    door = front(request)
    entry = door.local_entry(model)
    if entry is not None:
        return str(entry.cid)
    for ad in await door.ads():
        for m in ad.models:
            if m.cid == model or (m.name and m.name == model):
                return str(m.cid)
    raise HttpError(404, f"unknown model {model!r}: not in the local registry nor in any ad")


def _texts(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise HttpError(400, "input must be a string or a non-empty list of strings")
    if len(texts) > MAX_INPUTS:
        raise HttpError(400, f"at most {MAX_INPUTS} inputs per request, got {len(texts)}")
    for i, text in enumerate(texts):
        if not text:
            raise HttpError(400, f"input[{i}] is empty")
        if len(text) > MAX_CHARS:
            raise HttpError(400, f"input[{i}] is over {MAX_CHARS} characters")
    return texts


async def embeddings(request: Request) -> Response:
    """Embed ``input`` (a string or a list) with ``model``; float or base64 vectors."""
    from edge_models import packaged
    from edge_models.text import sentence_embeddings, tokenizer_for

    body = await read_json(request, 4 * MAX_INPUTS * MAX_CHARS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "model must be a model name or cid")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise HttpError(400, "encoding_format must be 'float' or 'base64'")
    if body.get("dimensions") is not None:
        raise HttpError(400, "dimensions is not supported: the model decides the size")
    texts = _texts(body)
    cid = await _model_cid(request, model)
    pkg = packaged.by_cid(cid)
    if pkg is None or pkg.tokenizer is None:
        raise HttpError(400, f"model {model!r} has no known tokenizer: it is not a text model")
    encoded = tokenizer_for(pkg.tokenizer).encode(texts, max_length=MAX_TOKENS)
    entry = front(request).local_entry(cid)
    if entry is not None:
        encoded = {s.name: encoded[s.name] for s in entry.inputs if s.name in encoded}
    result = await front(request).run_job(cid, encoded, {})
    if "last_hidden_state" not in result.outputs:
        raise HttpError(502, "the model did not return last_hidden_state")
    vectors = sentence_embeddings(result.outputs, encoded)
    tokens = int(np.asarray(encoded["attention_mask"]).sum())
    data = []
    for i, vector in enumerate(vectors):
        v = vector.astype("<f4")
        embedding: Any = (
            base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "edgeswarm": job_parameters(result),
        }
    )


def routes() -> list[tuple[str, list[str], Any]]:
    return [("/v1/embeddings", ["POST"], requires_token(embeddings))]
