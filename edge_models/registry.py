"""A content-addressed store of ONNX models under ``<data_dir>/models``.

Layout::

    blobs/<cid>.onnx   the model bytes; cid = sha256 hex of those bytes
    meta/<cid>.json    its ModelEntry (name, signature, size, source)
    tmp/               files being written; never read as models

A model exists once its meta file exists (written last, after the blob). Every
file is written to tmp/, fsynced, checked and renamed into place, so a crash or
a rejected model never leaves a half-written entry. Several processes may share
one store (the CLI beside a running peer): lookups that miss re-read the disk.

Being in the registry is the allow-list: the runtime runs nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import onnx

from edge_models import packaged
from edge_models.errors import AmbiguousModelRef, InvalidModel, ModelNotFound
from edge_models.limits import DEFAULT_MODEL_LIMITS, ModelLimits
from edge_models.pipelines import PipelineStore
from edge_models.spec import ModelEntry, check_model_file, inspect_model
from protocols.model_wire import CHUNK_SIZE, ipfs_cid_of

log = logging.getLogger(__name__)

_META_FORMAT = 1
_CHUNK = 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CID_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")
# Shorter prefixes match too much by accident.
MIN_PREFIX = 4
# tmp/ files older than this belong to a crashed writer.
_STALE_TMP_S = 3600.0
# How old the last full re-read may be before a lookup miss forces another.
_RESCAN_AFTER_S = 1.0


class NameTaken(InvalidModel):
    """The requested name already belongs to another model."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or _CID_RE.fullmatch(name):
        raise InvalidModel(
            f"model name must be 1-64 characters of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, and not a cid; got {name!r:.80}"
        )
    return name


class Registry:
    def __init__(self, root: Path, *, limits: ModelLimits = DEFAULT_MODEL_LIMITS) -> None:
        self.root = Path(root)
        self.limits = limits
        self._blobs = self.root / "blobs"
        self._meta = self.root / "meta"
        self._tmp = self.root / "tmp"
        for d in (self._blobs, self._meta, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._by_name: dict[str, ModelEntry] = {}
        self._seen: tuple[int, float] = (-1, 0.0)
        # Pipelines (manifests over stage models) live beside the models: <root>/pipelines.
        self.pipelines = PipelineStore(self.root / "pipelines")
        self._clean_stale_tmp()
        self.refresh()

    # ------------------------------------------------------------------ reads

    def refresh(self) -> None:
        """Re-read the store from disk (another process may have changed it)."""
        self._seen = (self._meta_mtime(), time.monotonic())
        entries: dict[str, ModelEntry] = {}
        for meta in self._meta.glob("*.json"):
            cid = meta.stem
            if not _CID_RE.fullmatch(cid) or not self._blob(cid).exists():
                continue
            try:
                entry = ModelEntry.from_dict(json.loads(meta.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable model metadata %s: %s", meta, exc)
                continue
            if entry.cid == cid:
                entries[cid] = entry
        with self._lock:
            self._set_index(entries)

    def _meta_mtime(self) -> int:
        try:
            return self._meta.stat().st_mtime_ns
        except OSError:
            return -1

    def _maybe_changed(self) -> bool:
        # A miss re-reads the disk only if meta/ changed (or a clock tick may have
        # hidden a change), so lookups of unknown names stay cheap.
        mtime, at = self._seen
        return self._meta_mtime() != mtime or time.monotonic() - at > _RESCAN_AFTER_S

    def list(self) -> list[ModelEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.name, e.cid))

    def get(self, ref: str) -> ModelEntry:
        """A model by name, full cid, or unique cid prefix (at least 4 hex digits)."""
        found = self._lookup(ref)
        if found is None and self._maybe_changed():
            self.refresh()
            found = self._lookup(ref)
        if found is None:
            known = ", ".join(e.name for e in self.list()) or "none"
            raise ModelNotFound(
                f"no model matches {ref!r:.80} (expected a name, a cid or a cid prefix of "
                f"at least {MIN_PREFIX} hex digits; models here: {known})"
            )
        return found

    def path_of(self, cid: str) -> Path:
        path = self._blob(cid) if _CID_RE.fullmatch(cid) else None
        if path is None or not path.exists():
            raise ModelNotFound(f"no model file for cid {cid!r:.80}")
        return path

    def __contains__(self, ref: object) -> bool:
        return isinstance(ref, str) and self._lookup(ref) is not None

    # ----------------------------------------------------------------- writes

    def add_file(
        self,
        path: Path,
        name: str | None = None,
        *,
        source: str | None = None,
        expected_cid: str | None = None,
    ) -> ModelEntry:
        """Copy a model file into the store (idempotent: same bytes, same entry).

        ``expected_cid`` makes the add fail unless the bytes hash to it (for
        models fetched from peers or pinned by a package).
        """
        path = Path(path)
        if name is not None:
            check_name(name)
        try:
            st = path.stat()
        except OSError as exc:
            raise InvalidModel(f"cannot read model file {path}: {exc.strerror or exc}") from exc
        if not path.is_file():
            raise InvalidModel(f"{path} is not a regular file")
        self._check_size(st.st_size, path)
        with self._temp_file() as (tmp_path, tmp):
            try:
                with path.open("rb") as src:
                    self._copy(src, tmp, path)
            except OSError as exc:
                raise InvalidModel(f"cannot read model file {path}: {exc}") from exc
            return self._admit(
                tmp_path,
                tmp,
                name=name,
                default_name=path.stem,
                source=source or f"file:{path.resolve()}",
                expected_cid=expected_cid,
            )

    def add_bytes(
        self,
        data: bytes,
        name: str | None = None,
        *,
        source: str,
        expected_cid: str | None = None,
    ) -> ModelEntry:
        if name is not None:
            check_name(name)
        self._check_size(len(data), "model")
        with self._temp_file() as (tmp_path, tmp):
            tmp.write(data)
            return self._admit(
                tmp_path,
                tmp,
                name=name,
                default_name="model",
                source=source,
                expected_cid=expected_cid,
            )

    @contextlib.contextmanager
    def partial_file(self, prefix: str = "fetch-") -> Iterator[Path]:
        """A fresh path under ``tmp/`` to write a model into (e.g. from the network).

        Hand it to ``install_partial`` once complete; whatever is left at the
        path when the block exits (a failed or abandoned write) is deleted, so
        nothing half-written stays in the store.
        """
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix=prefix, suffix=".part")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def install_partial(
        self,
        path: Path,
        name: str | None = None,
        *,
        source: str,
        expected_cid: str | None = None,
        default_name: str = "model",
    ) -> ModelEntry:
        """Admit a file written through ``partial_file``: moved into place, never copied.

        ``default_name`` (e.g. the name a provider gives the model) is used when
        ``name`` is None; if another model has it, ``-<cid[:8]>`` is appended.

        The same checks as ``add_file`` (size cap, hash, ONNX parse, no external
        data, allowed op domains, ``onnx.checker``); a rejected file is deleted.
        """
        path = Path(path)
        if path.parent.resolve() != self._tmp.resolve():
            raise ValueError(f"{path} is not a partial file of this registry")
        if name is not None:
            check_name(name)
        try:
            with path.open("r+b") as f:
                self._check_size(os.fstat(f.fileno()).st_size, "model")
                return self._admit(
                    path,
                    f,
                    name=name,
                    default_name=default_name,
                    source=source,
                    expected_cid=expected_cid,
                )
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def add_packaged(self, name: str, *, as_name: str | None = None) -> ModelEntry:
        """Add a model shipped inside an installed Python package (no network)."""
        model = packaged.get(name)
        return self.add_file(
            model.path(),
            as_name or model.name,
            source=model.source(),
            expected_cid=model.sha256,
        )

    def ensure_ipfs_cid(self, cid: str) -> str:
        """The model's IPFS CIDv1, computed (and stored) for entries added before it existed."""
        entry = self.get(cid)
        if entry.ipfs_cid:
            return entry.ipfs_cid
        whole, ipfs_cid = _hash_file(self.path_of(entry.cid))
        if whole != entry.cid:
            raise InvalidModel(f"model file of {entry.cid} is corrupt on disk (hashes to {whole})")
        with self._lock:
            current = self._entries.get(entry.cid)
            if current is not None and not current.ipfs_cid:
                updated = dataclasses.replace(current, ipfs_cid=ipfs_cid)
                self._write_meta(updated)
                self._set_index({**self._entries, entry.cid: updated})
        return ipfs_cid

    def remove(self, ref: str) -> ModelEntry:
        entry = self.get(ref)
        with self._lock:
            # Meta first: without it the blob is an orphan that nobody reads.
            with contextlib.suppress(FileNotFoundError):
                self._meta_path(entry.cid).unlink()
            with contextlib.suppress(FileNotFoundError):
                self._blob(entry.cid).unlink()
            _fsync_dir(self._meta)
            _fsync_dir(self._blobs)
            entries = dict(self._entries)
            entries.pop(entry.cid, None)
            self._set_index(entries)
        log.info("removed model %s (%s)", entry.name, entry.cid)
        return entry

    # -------------------------------------------------------------- internals

    def _blob(self, cid: str) -> Path:
        return self._blobs / f"{cid}.onnx"

    def _meta_path(self, cid: str) -> Path:
        return self._meta / f"{cid}.json"

    def _set_index(self, entries: dict[str, ModelEntry]) -> None:
        # Readers use these dicts without the lock: replace, never mutate.
        self._entries = entries
        self._by_name = {e.name: e for e in entries.values()}

    def _lookup(self, ref: str) -> ModelEntry | None:
        if not isinstance(ref, str) or not ref:
            return None
        entry = self._by_name.get(ref) or self._entries.get(ref)
        if entry is not None:
            return entry
        ref_l = ref.lower()
        if len(ref_l) < MIN_PREFIX or not _HEX_RE.fullmatch(ref_l):
            return None
        matches = [e for cid, e in self._entries.items() if cid.startswith(ref_l)]
        if len(matches) > 1:
            names = ", ".join(f"{e.name} ({e.cid[:12]})" for e in matches)
            raise AmbiguousModelRef(
                f"cid prefix {ref!r} matches {len(matches)} models ({names}); give more digits"
            )
        return matches[0] if matches else None

    def _check_size(self, size: int, what: object) -> None:
        if size > self.limits.max_model_bytes:
            raise InvalidModel(
                f"{what} is {size} bytes, above the model size limit of "
                f"{self.limits.max_model_bytes} bytes"
            )

    def _copy(self, src: IO[bytes], dst: IO[bytes], what: object) -> None:
        total = 0
        while chunk := src.read(_CHUNK):
            total += len(chunk)
            # The file may grow while we read it: enforce the cap on what we copy.
            self._check_size(total, what)
            dst.write(chunk)

    @contextlib.contextmanager
    def _temp_file(self) -> Iterator[tuple[Path, IO[bytes]]]:
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="add-", suffix=".part")
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                yield tmp_path, f
        finally:
            # After a successful admit the file was renamed away; otherwise drop it.
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()

    def _admit(
        self,
        tmp_path: Path,
        tmp: IO[bytes],
        *,
        name: str | None,
        default_name: str,
        source: str,
        expected_cid: str | None,
    ) -> ModelEntry:
        """Verify, inspect and publish a fully written temp file."""
        tmp.flush()
        os.fsync(tmp.fileno())
        # Hash what is on disk, not what we meant to write: this verifies the copy.
        # Streamed, and parsed from a read-only map of the file, so the model's
        # bytes are never held in memory twice (the page cache backs the map).
        cid, ipfs_cid = _hash_file(tmp_path)
        if expected_cid is not None and cid != expected_cid.lower():
            raise InvalidModel(f"model bytes hash to {cid}, expected {expected_cid}")
        sig = inspect_model(_parse_onnx(tmp_path), self.limits.allowed_domains, check=False)
        check_model_file(str(tmp_path))  # after the parsed model is gone: one copy at a time
        with self._lock:
            existing = self._entries.get(cid)
            chosen = self._choose_name(name, default_name, cid, existing)
            if existing is not None:
                if existing.name == chosen:
                    return existing
                entry = dataclasses.replace(existing, name=chosen)
            else:
                entry = ModelEntry(
                    cid=cid,
                    name=chosen,
                    size=tmp_path.stat().st_size,
                    inputs=sig.inputs,
                    outputs=sig.outputs,
                    opset=sig.opset,
                    source=source,
                    added_at=time.time(),
                    ipfs_cid=ipfs_cid,
                )
                os.replace(tmp_path, self._blob(cid))
                _fsync_dir(self._blobs)
            self._write_meta(entry)
            self._set_index({**self._entries, cid: entry})
        log.info("added model %s (%s, %d bytes) from %s", entry.name, cid, entry.size, source)
        return entry

    def _choose_name(
        self, name: str | None, default_name: str, cid: str, existing: ModelEntry | None
    ) -> str:
        if name is None:
            if existing is not None:
                return existing.name
            base = re.sub(r"[^A-Za-z0-9._-]", "-", default_name).strip("-._")[:48] or "model"
            name = base if _NAME_RE.fullmatch(base) and not _CID_RE.fullmatch(base) else "model"
            holder = self._by_name.get(name)
            # A default name never steals another model's: suffix the cid.
            return name if holder is None or holder.cid == cid else f"{name}-{cid[:8]}"
        holder = self._by_name.get(name)
        if holder is not None and holder.cid != cid:
            raise NameTaken(
                f"name {name!r} is already used by model {holder.cid[:12]}; "
                "remove that model or choose another name"
            )
        return name

    def _write_meta(self, entry: ModelEntry) -> None:
        body = json.dumps({"format": _META_FORMAT, **entry.to_dict()}, indent=2, sort_keys=True)
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="meta-", suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self._meta_path(entry.cid))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        _fsync_dir(self._meta)

    def _clean_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for p in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256 hex, IPFS CIDv1) of a file, read once in 256 KiB chunks (kubo's leaves)."""
    whole = hashlib.sha256()
    hashes: list[bytes] = []
    sizes: list[int] = []
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            whole.update(chunk)
            hashes.append(hashlib.sha256(chunk).digest())
            sizes.append(len(chunk))
    return whole.hexdigest(), ipfs_cid_of(hashes, sizes) if hashes else ""


def _parse_onnx(path: Path) -> onnx.ModelProto:
    model = onnx.ModelProto()
    if path.stat().st_size == 0:
        return model  # mmap refuses empty files; the checker says what is missing
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                model.ParseFromString(view)  # type: ignore[arg-type]  # upb takes buffers
            finally:
                view.release()
    except OSError as exc:
        raise InvalidModel(f"not an ONNX model (cannot read it: {exc})") from exc
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModel(f"not an ONNX model (protobuf parse failed: {exc})") from exc
    return model


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; not supported everywhere (e.g. Windows).
    with contextlib.suppress(OSError):
        _fsync_path(path)
