"""Running registered models with ONNX Runtime.

``ModelRuntime`` is synchronous and thread-safe: the peer calls it from worker
threads (``trio.to_thread``). It keeps one InferenceSession per (cid,
execution provider) in an LRU cache bounded by an estimated memory budget,
checks inputs against the model's declared signature and the input limits
before a session sees them, bounds concurrent executions with a semaphore and
stops runs that pass their timeout through ``RunOptions.terminate``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import psutil

from edge_models import packaged
from edge_models.errors import ExecutionFailed, ExecutionTimeout, InvalidInput
from edge_models.limits import DEFAULT_INPUT_LIMITS, InputLimits
from edge_models.registry import Registry
from edge_models.spec import ModelEntry, TensorSpec
from protocols.tensor import STRING, numpy_dtype

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]

CPU = "CPUExecutionProvider"
# Fastest first; CPU last because it always works.
PROVIDER_PREFERENCE: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
    CPU,
)
_SHORT_NAMES = {p.removesuffix("ExecutionProvider").lower(): p for p in PROVIDER_PREFERENCE}
_SHORT_NAMES.update({"trt": "TensorrtExecutionProvider", "directml": "DmlExecutionProvider"})

# Sessions take several times their file size once weights are unpacked
# (all-MiniLM int8: 23 MB file, 95-100 MB RSS after load and a first run).
DEFAULT_MEMORY_FACTOR = 4.25
# Per-session bookkeeping beyond the weights (graph, allocator arenas' first blocks).
SESSION_OVERHEAD_BYTES = 1024 * 1024
# Latencies kept per model for the rolling p50 the capability ad carries.
_LATENCY_WINDOW = 128


def canonical_provider(name: str) -> str:
    """Accept ``CUDAExecutionProvider``, ``cuda`` or ``CUDA``; unknown names pass through."""
    return _SHORT_NAMES.get(name.removesuffix("ExecutionProvider").lower(), name)


def provider_order(available: Iterable[str], allowed: Sequence[str] = ()) -> tuple[str, ...]:
    """Providers to try, best first: our preference, limited to what onnxruntime
    reports and (when ``allowed`` is not empty) to the configured ones. CPU is
    always last and always present."""
    have = set(available)
    allow = {canonical_provider(p) for p in allowed}
    order = [p for p in PROVIDER_PREFERENCE if p != CPU and p in have and (not allow or p in allow)]
    return (*order, CPU)


# ---------------------------------------------------------------- input checks


def validate_inputs(
    entry: ModelEntry, inputs: Mapping[str, Any], limits: InputLimits = DEFAULT_INPUT_LIMITS
) -> None:
    """Check inputs against the model's declared inputs and the limits.

    Names must match exactly; dtypes must equal the declared ones (native byte
    order); ranks and fixed dims must match; a symbolic dim (e.g. ``batch``)
    must have the same size everywhere it appears. Raises InvalidInput.
    """
    where = f"model {entry.name!r}"
    if not isinstance(inputs, Mapping):
        raise InvalidInput(f"{where}: inputs must be a mapping of name to array")
    if len(inputs) > limits.max_tensors:
        raise InvalidInput(f"{where}: {len(inputs)} inputs, the limit is {limits.max_tensors}")
    specs = entry.inputs
    if len(inputs) != len(specs) or any(s.name not in inputs for s in specs):
        expected = sorted(s.name for s in specs)
        got = sorted(map(str, inputs))
        missing = [n for n in expected if n not in inputs]
        extra = [n for n in got if n not in expected]
        raise InvalidInput(
            f"{where} expects inputs {expected}, got {got} (missing {missing}, unexpected {extra})"
        )
    bound: dict[str, tuple[int, str]] = {}
    elements = 0
    nbytes = 0
    for spec in specs:
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InvalidInput(
                f"{where}: input {spec.name!r} must be a numpy array, got {type(array).__name__}"
            )
        _check_one(where, spec, array, bound, limits)
        elements += array.size
        nbytes += array.nbytes
        if elements > limits.max_elements:
            raise InvalidInput(
                f"{where}: inputs hold more than {limits.max_elements} elements "
                f"(input {spec.name!r} has {array.size})"
            )
        if nbytes > limits.max_total_bytes:
            raise InvalidInput(
                f"{where}: inputs hold more than {limits.max_total_bytes} bytes "
                f"(input {spec.name!r} has {array.nbytes})"
            )


def _check_one(
    where: str,
    spec: TensorSpec,
    array: npt.NDArray[Any],
    bound: dict[str, tuple[int, str]],
    limits: InputLimits,
) -> None:
    want = numpy_dtype(spec.dtype)
    if want is None or array.dtype != want:
        raise InvalidInput(
            f"{where}: input {spec.name!r} must be {spec.dtype}, got {array.dtype.str} "
            f"({array.dtype})"
        )
    if array.ndim > limits.max_rank:
        raise InvalidInput(
            f"{where}: input {spec.name!r} has rank {array.ndim}, the limit is {limits.max_rank}"
        )
    shape = spec.shape
    if shape is None:
        return
    if array.ndim != len(shape):
        raise InvalidInput(
            f"{where}: input {spec.name!r} must have shape {_fmt(shape)} (rank {len(shape)}), "
            f"got {tuple(array.shape)}"
        )
    for axis, (dim, size) in enumerate(zip(shape, array.shape, strict=True)):
        if isinstance(dim, int):
            if size != dim:
                raise InvalidInput(
                    f"{where}: input {spec.name!r} must have shape {_fmt(shape)}, "
                    f"got {tuple(array.shape)} (axis {axis} is {size}, expected {dim})"
                )
        elif isinstance(dim, str):
            seen = bound.setdefault(dim, (size, spec.name))
            if seen[0] != size:
                raise InvalidInput(
                    f"{where}: dimension {dim!r} is {seen[0]} in input {seen[1]!r} but {size} "
                    f"in input {spec.name!r} (axis {axis}); it must be the same everywhere"
                )


def _fmt(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def synthetic_inputs(entry: ModelEntry, dim: int = 1) -> Arrays:
    """Valid all-zero inputs (every symbolic or unknown dim = ``dim``), for warm-up."""
    out: Arrays = {}
    for spec in entry.inputs:
        shape = tuple(d if isinstance(d, int) else dim for d in (spec.shape or ()))
        if spec.dtype == STRING:
            out[spec.name] = np.full(shape, "", dtype=object)
        else:
            out[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.dtype))
    return out


def sample_inputs(entry: ModelEntry) -> Arrays:
    """Realistic inputs for known packaged models (tokenized text), else synthetic ones."""
    model = packaged.by_cid(entry.cid)
    if model is not None and model.tokenizer is not None:
        from edge_models.text import tokenizer_for  # only needed for text models

        tok = tokenizer_for(model.tokenizer)
        sample = tok.encode(["Edge inference runs this model on a peer's own hardware."])
        return {s.name: sample[s.name] for s in entry.inputs if s.name in sample}
    return synthetic_inputs(entry)


# -------------------------------------------------------------------- watchdog


@dataclass(order=True)
class _Deadline:
    at: float
    seq: int
    options: ort.RunOptions = field(compare=False)
    done: bool = field(default=False, compare=False)
    fired: bool = field(default=False, compare=False)


class _Watchdog:
    """One thread that sets ``RunOptions.terminate`` on runs past their deadline.

    Cheaper per call than a Timer thread per run: registering is a heap push
    under a lock, and the thread is only woken when a new deadline is earlier
    than the time it already plans to wake up.
    """

    def __init__(self, idle_wake: float) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[_Deadline] = []
        self._seq = itertools.count()
        self._wake_at = float("inf")
        self._idle_wake = max(idle_wake, 0.05)
        self._stopped = False
        self._thread: threading.Thread | None = None

    def register(self, timeout: float, options: ort.RunOptions) -> _Deadline:
        item = _Deadline(time.monotonic() + timeout, next(self._seq), options)
        with self._cond:
            if self._stopped:
                raise ExecutionFailed("the model runtime is closed")
            heapq.heappush(self._heap, item)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="edge-models-watchdog", daemon=True
                )
                self._thread.start()
            elif item.at < self._wake_at:
                self._cond.notify()
        return item

    def finish(self, item: _Deadline) -> None:
        with self._cond:
            item.done = True
            # Runs mostly finish in deadline order: drop finished heads now, so
            # the heap stays as small as the number of runs in flight.
            while self._heap and self._heap[0].done:
                heapq.heappop(self._heap)

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and (self._heap[0].done or self._heap[0].at <= now):
                    head = heapq.heappop(self._heap)
                    if not head.done:
                        head.fired = True
                        head.options.terminate = True
                self._wake_at = self._heap[0].at if self._heap else now + self._idle_wake
                self._cond.wait(self._wake_at - now)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()


# --------------------------------------------------------------------- runtime


@dataclass
class LoadedModel:
    """A cached session; ``p50_ms`` is measured at load, then over recent runs."""

    entry: ModelEntry
    provider: str
    providers: tuple[str, ...]
    session: ort.InferenceSession
    output_names: tuple[str, ...]
    load_ms: float
    load_p50_ms: float | None
    est_bytes: int
    rss_delta_bytes: int
    runs: int = 0
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_WINDOW))

    @property
    def cid(self) -> str:
        return self.entry.cid

    @property
    def p50_ms(self) -> float | None:
        recent = list(self._recent)
        if recent:
            return float(statistics.median(recent))
        return self.load_p50_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "cid": self.entry.cid,
            "name": self.entry.name,
            "provider": self.provider,
            "load_ms": round(self.load_ms, 3),
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 3),
            "est_bytes": self.est_bytes,
            "runs": self.runs,
        }


class ModelRuntime:
    def __init__(
        self,
        registry: Registry,
        *,
        providers: Sequence[str] = (),
        intra_op_threads: int = 0,
        cache_bytes: int = 2 * 1024**3,
        max_concurrent: int = 2,
        timeout: float = 30.0,
        limits: InputLimits = DEFAULT_INPUT_LIMITS,
        memory_factor: float = DEFAULT_MEMORY_FACTOR,
        p50_runs: int = 5,
        available_providers: Sequence[str] | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.registry = registry
        available = (
            ort.get_available_providers() if available_providers is None else available_providers
        )
        self.providers = provider_order(available, providers)
        self.intra_op_threads = intra_op_threads
        self.cache_bytes = cache_bytes
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.limits = limits
        self.memory_factor = memory_factor
        self.p50_runs = p50_runs
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._preferred: dict[str, str] = {}  # cid -> provider its default load chose
        self._cache_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._watchdog = _Watchdog(idle_wake=timeout)
        self._process = psutil.Process()

    # -- lifecycle

    def close(self) -> None:
        self._watchdog.close()
        with self._cache_lock:
            self._cache.clear()
            self._preferred.clear()

    def __enter__(self) -> ModelRuntime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- execution

    def run(self, ref: str, inputs: Mapping[str, Any], *, timeout: float | None = None) -> Arrays:
        """Validate ``inputs``, then run the model; outputs by name.

        ``timeout`` (default: the runtime's) covers waiting for an execution
        slot and the run itself; loading a model that is not cached is not
        counted. Raises ModelNotFound, InvalidInput, Timeout, ExecutionFailed.
        """
        entry = self.registry.get(ref)
        validate_inputs(entry, inputs, self.limits)
        budget = self.timeout if timeout is None else timeout
        if budget <= 0:
            raise ExecutionTimeout(
                f"model {entry.name!r}: no time left to run (timeout {budget:g} s)"
            )
        start = time.monotonic()
        # Non-blocking first: the common uncontended case skips the timed wait's setup.
        if not self._slots.acquire(blocking=False) and not self._slots.acquire(timeout=budget):
            raise ExecutionTimeout(
                f"model {entry.name!r}: no execution slot free within {budget:g} s "
                f"({self.max_concurrent} runs at a time)"
            )
        try:
            waited = time.monotonic() - start
            loaded = self._cached(entry.cid) or self.load(entry.cid)
            return self._execute(loaded, inputs, max(budget - waited, 1e-3), budget)
        finally:
            self._slots.release()

    def _execute(
        self, loaded: LoadedModel, inputs: Mapping[str, Any], remaining: float, budget: float
    ) -> Arrays:
        options = ort.RunOptions()
        options.log_severity_level = 4  # failures reach the caller as typed errors
        deadline = self._watchdog.register(remaining, options)
        t0 = time.perf_counter()
        try:
            results = loaded.session.run(None, inputs, options)
        except Exception as exc:
            if deadline.fired:
                raise ExecutionTimeout(
                    f"model {loaded.entry.name!r} ran longer than its timeout of {budget:g} s "
                    f"and was stopped"
                ) from exc
            raise ExecutionFailed(
                f"model {loaded.entry.name!r} ({loaded.cid[:12]}) failed on {loaded.provider}: "
                f"{_first_line(exc)}"
            ) from exc
        finally:
            self._watchdog.finish(deadline)
        loaded._recent.append((time.perf_counter() - t0) * 1e3)
        loaded.runs += 1
        return dict(zip(loaded.output_names, results, strict=True))

    # -- sessions

    def _cached(self, cid: str, provider: str | None = None) -> LoadedModel | None:
        with self._cache_lock:
            key = (cid, provider or self._preferred.get(cid, ""))
            loaded = self._cache.get(key)
            if loaded is not None:
                self._cache.move_to_end(key)
            return loaded

    def loaded(self) -> list[LoadedModel]:
        """Cached sessions, least recently used first."""
        with self._cache_lock:
            return list(self._cache.values())

    def cached_bytes(self) -> int:
        with self._cache_lock:
            return sum(m.est_bytes for m in self._cache.values())

    def load(self, ref: str, *, provider: str | None = None) -> LoadedModel:
        """The cached session for a model, creating (and warming up) it if needed.

        ``provider`` pins one execution provider; by default the best of
        ``self.providers`` that can create a session is used.
        """
        entry = self.registry.get(ref)
        want = canonical_provider(provider) if provider else None
        if want is not None and want not in self.providers:
            raise ExecutionFailed(
                f"provider {provider!r} is not available or not allowed here "
                f"(usable: {', '.join(self.providers)})"
            )
        found = self._cached(entry.cid, want)
        if found is not None:
            return found
        with self._load_lock:  # one load at a time: they are heavy and share the budget
            found = self._cached(entry.cid, want)
            if found is not None:
                return found
            estimate = self._estimate(entry)
            if estimate > self.cache_bytes:
                raise ExecutionFailed(
                    f"model {entry.name!r} needs an estimated {estimate} bytes of session "
                    f"memory, more than the whole cache budget of {self.cache_bytes} bytes"
                )
            self._evict_until(self.cache_bytes - estimate)
            loaded = self._create(entry, want)
            with self._cache_lock:
                self._cache[(entry.cid, loaded.provider)] = loaded
                if want is None:
                    self._preferred[entry.cid] = loaded.provider
            # The measured size may exceed the estimate: evict others, never the new one.
            self._evict_until(self.cache_bytes, keep=(entry.cid, loaded.provider))
            return loaded

    def evict(self, ref: str) -> int:
        """Drop every cached session of a model (e.g. after it was removed); returns count."""
        cid = ref if _is_cid(ref) else self.registry.get(ref).cid
        with self._cache_lock:
            keys = [k for k in self._cache if k[0] == cid]
            for k in keys:
                del self._cache[k]
            self._preferred.pop(cid, None)
        return len(keys)

    def _evict_until(self, target: int, keep: tuple[str, str] | None = None) -> None:
        with self._cache_lock:
            used = sum(m.est_bytes for m in self._cache.values())
            for key in list(self._cache):
                if used <= target:
                    break
                if key == keep:
                    continue
                victim = self._cache.pop(key)
                if self._preferred.get(key[0]) == key[1]:
                    del self._preferred[key[0]]
                used -= victim.est_bytes
                log.info(
                    "evicted %s (%s) on %s to stay within the %d-byte session budget",
                    victim.entry.name,
                    victim.cid[:12],
                    victim.provider,
                    self.cache_bytes,
                )

    def _estimate(self, entry: ModelEntry) -> int:
        return int(entry.size * self.memory_factor) + SESSION_OVERHEAD_BYTES

    def _session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # errors only; provider fallbacks are logged by us
        return so

    def _create(self, entry: ModelEntry, want: str | None) -> LoadedModel:
        path = str(self.registry.path_of(entry.cid))
        candidates = [want] if want else list(self.providers)
        rss_before = self._process.memory_info().rss
        t0 = time.perf_counter()
        session: ort.InferenceSession | None = None
        errors: list[str] = []
        for i, first in enumerate(candidates):
            # Later providers stay in the list so nodes the first cannot run fall back.
            chain = [first] if want else candidates[i:]
            try:
                session = ort.InferenceSession(path, self._session_options(), providers=chain)
                break
            except Exception as exc:
                errors.append(f"{first}: {_first_line(exc)}")
                log.warning("cannot create a session for %s on %s: %s", entry.name, first, exc)
        if session is None:
            raise ExecutionFailed(
                f"model {entry.name!r} ({entry.cid[:12]}) could not be loaded on any provider: "
                + "; ".join(errors)
            )
        load_ms = (time.perf_counter() - t0) * 1e3
        chosen = session.get_providers()[0]
        if want is not None and chosen != want:
            # onnxruntime falls back to CPU silently when a GPU provider cannot start.
            raise ExecutionFailed(
                f"model {entry.name!r}: provider {want} could not start (onnxruntime fell "
                f"back to {chosen})"
            )
        if chosen != candidates[0]:
            log.warning(
                "model %s runs on %s: %s was preferred but could not take it",
                entry.name,
                chosen,
                candidates[0],
            )
        output_names = tuple(o.name for o in session.get_outputs())
        p50 = self._warm_up(entry, session)
        rss_delta = max(self._process.memory_info().rss - rss_before, 0)
        # Budget by the estimate, not the RSS delta: that one also counts ORT's
        # one-time process setup and other threads' allocations, so it is noisy.
        est = self._estimate(entry)
        log.info(
            "loaded model %s (%s) on %s in %.0f ms; p50 %s ms; ~%.0f MB",
            entry.name,
            entry.cid[:12],
            chosen,
            load_ms,
            "n/a" if p50 is None else f"{p50:.2f}",
            est / 1e6,
        )
        return LoadedModel(
            entry=entry,
            provider=chosen,
            providers=tuple(session.get_providers()),
            session=session,
            output_names=output_names,
            load_ms=load_ms,
            load_p50_ms=p50,
            est_bytes=est,
            rss_delta_bytes=rss_delta,
        )

    def _warm_up(self, entry: ModelEntry, session: ort.InferenceSession) -> float | None:
        """One warm-up run, then the median of ``p50_runs`` timed runs (None if it fails)."""
        try:
            inputs = sample_inputs(entry)
            session.run(None, inputs)
            times = []
            for _ in range(self.p50_runs):
                t0 = time.perf_counter()
                session.run(None, inputs)
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as exc:
            # Zeros are not valid input for every model; that does not make it broken.
            log.warning("warm-up of %s failed on synthetic inputs: %s", entry.name, exc)
            return None
        return float(statistics.median(times)) if times else None


def _is_cid(ref: str) -> bool:
    return len(ref) == 64 and all(c in "0123456789abcdef" for c in ref)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
