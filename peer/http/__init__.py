"""The HTTP front door of a peer: KServe v2 REST, /v1/embeddings, /metrics, /explorer, control API.

Off by default; ``edgeswarm run --http HOST:PORT`` (config ``http``, env
``EDGESWARM_HTTP``) serves it from the peer's own trio loop (hypercorn's trio
worker + Starlette). State-changing and credit-spending routes need the bearer
token in ``<data dir>/http.token``. See ``peer.http.app`` for the routes.
"""

from peer.http.server import HttpConfigError, HttpServer, open_http, parse_bind

__all__ = ["HttpConfigError", "HttpServer", "open_http", "parse_bind"]
