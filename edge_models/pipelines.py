"""Pipelines held by a peer: manifests (``protocols.pipeline``) under ``<models>/pipelines``.

Layout::

    pipelines/<cid>.json   {"name", "source", "added_at", "manifest": {...}}

The cid is the sha256 of the manifest's canonical JSON, checked again when the
file is read, so an edited file is ignored (with a warning), never trusted.
A pipeline's stages are ordinary models: they need not be here to register
the pipeline (other peers serve them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_models.errors import AmbiguousModelRef, InvalidModel, ModelNotFound
from protocols.errors import ProtocolError
from protocols.pipeline import MAX_MANIFEST_BYTES, PipelineManifest

log = logging.getLogger(__name__)

_CID_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]{4,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class PipelineEntry:
    cid: str
    name: str
    manifest: PipelineManifest
    source: str
    added_at: float

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "kind": "pipeline",
            "cid": self.cid,
            "name": self.name,
            "model": m.model,
            "stages": [s.cid for s in m.stages],
            "crossing_bytes": m.crossing_bytes,
            "source": self.source,
            "added_at": self.added_at,
        }


def parse_manifest(data: bytes) -> PipelineManifest:
    """A manifest from JSON bytes; ``InvalidModel`` (one line) when it breaks a rule."""
    try:
        return PipelineManifest.from_bytes(data)
    except ProtocolError as exc:
        raise InvalidModel(f"not a pipeline manifest: {exc}") from None


class PipelineStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def list(self) -> list[PipelineEntry]:
        out = []
        for path in sorted(self.root.glob("*.json")):
            entry = self._read(path)
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.name, e.cid))

    def find(self, ref: str) -> PipelineEntry | None:
        """A pipeline by name, cid or unique cid prefix (>= 4 hex digits); None if none."""
        if not isinstance(ref, str) or not ref:
            return None
        if _CID_RE.fullmatch(ref):
            path = self.root / f"{ref}.json"
            return self._read(path) if path.exists() else None
        entries = self.list()
        for e in entries:
            if e.name == ref:
                return e
        low = ref.lower()
        if not _HEX_RE.fullmatch(low):
            return None
        matches = [e for e in entries if e.cid.startswith(low)]
        if len(matches) > 1:
            raise AmbiguousModelRef(f"cid prefix {ref!r} matches {len(matches)} pipelines")
        return matches[0] if matches else None

    def get(self, ref: str) -> PipelineEntry:
        entry = self.find(ref)
        if entry is None:
            raise ModelNotFound(f"no pipeline matches {ref!r:.80}")
        return entry

    def add(
        self, data: bytes, name: str | None = None, *, source: str, default_name: str = ""
    ) -> PipelineEntry:
        """Register a manifest (any JSON formatting; stored canonical). Idempotent per cid."""
        manifest = parse_manifest(data)
        cid = manifest.cid
        with self._lock:
            existing = self.find(cid)
            if name is None:
                name = existing.name if existing else (default_name or f"pipeline-{cid[:8]}")
            if not _NAME_RE.fullmatch(name) or _CID_RE.fullmatch(name):
                raise InvalidModel(
                    f"pipeline name must be 1-64 letters, digits, '.', '_', '-'; got {name!r:.80}"
                )
            holder = next((e for e in self.list() if e.name == name and e.cid != cid), None)
            if holder is not None:
                name = f"{name}-{cid[:8]}"
            entry = PipelineEntry(
                cid=cid,
                name=name,
                manifest=manifest,
                source=existing.source if existing else source,
                added_at=existing.added_at if existing else time.time(),
            )
            body = {
                "name": entry.name,
                "source": entry.source,
                "added_at": entry.added_at,
                "manifest": manifest.to_dict(),
            }
            self._write(self.root / f"{cid}.json", json.dumps(body, indent=2, sort_keys=True))
        log.info("added pipeline %s (%s, %d stages)", entry.name, cid, len(manifest.stages))
        return entry

    def remove(self, ref: str) -> PipelineEntry:
        entry = self.get(ref)
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{entry.cid}.json").unlink()
        return entry

    def _read(self, path: Path) -> PipelineEntry | None:
        try:
            if path.stat().st_size > 4 * MAX_MANIFEST_BYTES:
                raise ValueError("file too large")
            body = json.loads(path.read_bytes())
            manifest = PipelineManifest.from_dict(body["manifest"])
            entry = PipelineEntry(
                cid=manifest.cid,
                name=str(body["name"]),
                manifest=manifest,
                source=str(body["source"]),
                added_at=float(body["added_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("ignoring unreadable pipeline file %s: %s", path, exc)
            return None
        if entry.cid != path.stem:
            log.warning("ignoring pipeline file %s: its manifest hashes to %s", path, entry.cid)
            return None
        return entry

    def _write(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
