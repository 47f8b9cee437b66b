"""The calibration engine: what to run, in how many groups, and the loop that runs it.

A :class:`Job` is one pass over the data (one phase) for every group of observed tensors:
phase 1 records min/max, per-sample extremes, channel sums and layer input moments; phase 2
fixed-range histograms (over the phase-1 ranges). Jobs are plain data (the model as bytes), so
the same job runs inline, in a spawned process or on a Dask worker (:mod:`qcompiler.calibration.distributed`)
and gives the same statistics. Within a process, ``lanes`` samples are in flight at once on
threads sharing the session (:func:`run_job`).

Memory: onnxruntime holds every requested output of one run at once. The tensors to observe
are split into groups whose per-sample bytes fit the budget (``--calibration-memory``), and
the data is streamed once per group and phase; results are identical whatever the grouping,
because each tensor's statistics only ever see that tensor.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ..rounding import one_blas_thread
from . import stats as collectors
from .data import Feed
from .stats import PatchSpec, Statistics

__all__ = ["Job", "run_job", "trial_run", "tensor_bytes", "make_groups", "Progress", "peak_rss_mb", "reuse_sessions",
           "lane_threads"]


@dataclass
class Job:
    """One pass over the (sharded) data for each group of exposed tensors."""

    model: bytes
    groups: list[list[str]]                      # names exposed as outputs, per run
    inputs: list[str] = field(default_factory=list)  # graph inputs, observed from the feed
    track: frozenset[str] = frozenset()          # min/max
    per_sample: frozenset[str] = frozenset()     # also per-sample extremes (moving average)
    channel_axes: dict[str, int] = field(default_factory=dict)
    hist_spec: dict[str, tuple[str, float, float, int]] = field(default_factory=dict)
    moment_specs: dict[str, list[tuple[str, PatchSpec]]] = field(default_factory=dict)
    moment_limit: int = 0                        # moments from samples with index < this (0: all)
    grouped_moment_limit: int = 0                # the same for grouped (depthwise) layers
    moments_only: bool = False                   # stop at moment_limit (no histograms wanted)
    limit: int = 0                               # use samples with index < limit (0: all)
    shard: int = 0
    shards: int = 1
    threads: int = 0
    label: str = "calibrate"
    # names the session exposes (default: every group's); a job observing a subset can
    # expose the same set as another job so both see bit-identical values
    session_outputs: list[str] = field(default_factory=list)
    # initializers the model refers to by name (Model.to_proto(shared=...)): the session runs
    # on these arrays without a copy; pickled along with the job to workers
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    # samples in flight at once in this process (threads sharing the session); a fixed number,
    # not the core count, so that float sums (channel means, moments) are added in the same
    # order on every machine
    lanes: int = 2


def _placeholder_dir() -> str:
    """A directory holding the empty file shared initializers name as their external data
    (onnxruntime checks that the file exists, then takes the data from add_initializer)."""
    global _PLACEHOLDER
    if _PLACEHOLDER is None:
        import atexit
        import shutil
        import tempfile

        from ..ir.model import SHARED_LOCATION

        path = tempfile.mkdtemp(prefix="qcompiler-calib-")
        open(os.path.join(path, SHARED_LOCATION), "wb").close()
        atexit.register(shutil.rmtree, path, True)
        _PLACEHOLDER = path
    return _PLACEHOLDER


_PLACEHOLDER: str | None = None


def _options(threads: int, severity: int = 4) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Every optimization level keeps a value asked for as an output (onnxruntime never fuses
    # away a node whose output is a graph output); the full level adds the blocked-layout
    # convolutions, which run the float model 1.5-2x faster than the basic level here.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # 4 (fatal only): a failing run raises, and the exception is what reaches the user (one
    # line); onnxruntime's own copy of the message on stderr would be a second line
    so.log_severity_level = severity
    # onnxruntime's idle worker threads spin for a while after each run, competing with the
    # statistics numpy computes between runs for the same cores (measured: 2-10x slower numpy)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no preplanned block per run: with two lanes running at once it held a second copy of
    # every exposed tensor's planned memory (EfficientNet peak RSS 475 -> 445 MB, no slower)
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
    return so


_REUSE: dict[tuple[Any, ...], Any] | None = None


@contextlib.contextmanager
def reuse_sessions() -> Iterator[None]:
    """Within this block a session built for the same model, exposed names, thread count and
    shared weights is built once: the size probe, phase 1 and phase 2 of one calibration run
    on one session (each build costs 40-150 ms). Sessions are dropped when the block ends."""
    global _REUSE
    outer = _REUSE
    if outer is None:
        _REUSE = {}
    try:
        yield
    finally:
        if outer is None:
            _REUSE = None


def lane_threads(lanes: int, threads: int = 0) -> int:
    """onnxruntime threads per lane: the cores shared out, unless ``threads`` says."""
    return threads or max(1, (os.cpu_count() or 1) // max(1, lanes))


def _session(model: bytes, names: Sequence[str], threads: int,
             initializers: Mapping[str, np.ndarray] | None = None) -> Any:
    if _REUSE is None:
        return _build_session(model, names, threads, initializers)
    # the same bytes object (not a hash of 20 MB): the block keeps it alive, so its id is stable
    key = (id(model), tuple(names), threads, tuple(sorted(initializers or ())))
    if key not in _REUSE or _REUSE[key][0] is not model:
        _REUSE[key] = (model, _build_session(model, names, threads, initializers))
    return _REUSE[key][1]


def _build_session(model: bytes, names: Sequence[str], threads: int,
                   initializers: Mapping[str, np.ndarray] | None = None) -> Any:
    import onnx
    import onnxruntime as ort

    # Serialized protobuf messages merge when concatenated (a repeated field's entries are
    # appended), so the model gains these graph outputs without being parsed and serialized
    # again. A name that is already a graph output is listed twice; runs fetch it by name.
    extra = onnx.ModelProto(graph=onnx.GraphProto(output=[onnx.ValueInfoProto(name=n) for n in names]))
    data = model + extra.SerializeToString()
    if not initializers:
        return ort.InferenceSession(data, _options(threads), providers=["CPUExecutionProvider"])
    keep = [(name, ort.OrtValue.ortvalue_from_numpy(arr)) for name, arr in initializers.items()]
    so = _options(threads, severity=4)  # a refusal below is expected and handled: keep it off stderr
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", _placeholder_dir())
    for name, value in keep:
        so.add_initializer(name, value)  # the IR's array itself: no second copy of the weight
    try:
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - an optimizer wanted to read one: hand them over as copies
        so = _options(threads)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", _placeholder_dir())
        so.add_external_initializers([n for n, _ in keep], [v for _, v in keep])
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    sess._qcompiler_keep = keep  # the OrtValues must outlive the session
    return sess


def trial_run(model: bytes, names: Sequence[str], feed: Feed,
              initializers: Mapping[str, np.ndarray] | None = None) -> None:
    """Build a session exposing ``names`` and run ``feed`` once; raises what onnxruntime raises."""
    sess = _session(model, names, 0, initializers)
    collectors.run_model(sess, feed)


# A sample's channel sums and moment vectors, handed from its lane to the accumulator
Deferred = list[tuple[str, str, Any, int]]
# samples reduced by their lane and waiting for the adder: at most this many, holding at most
# this many bytes of sums and moment vectors (beyond the one a lane per sample always allowed)
_MAX_BACKLOG = 32
_BACKLOG_BYTES = 32 << 20


def _observe(stats: Statistics, job: Job, name: str, arr: np.ndarray, index: int, deferred: Deferred) -> None:
    """Reduce one fetched tensor: min/max and histograms into the lane's ``stats`` (exact, so
    merging lanes in any grouping gives the same result); channel sums and moment vectors into
    ``deferred``, added to the job's float sums in sample order by :func:`_accumulate`."""
    if job.track and name in job.track:
        stats.update_range(name, arr, index if name in job.per_sample else None)
    if name in job.hist_spec:
        stats.update_hist(name, arr)
    if name in job.channel_axes and arr.ndim:  # every sample: bias correction is sensitive to it
        total = collectors.channel_totals(arr, job.channel_axes[name])
        if total is not None:
            deferred.append(("mean", name, total, arr.size // total.size))
    if job.moment_limit and index >= job.moment_limit:
        return
    for key, spec in job.moment_specs.get(name, ()):
        if spec.group > 1 and job.grouped_moment_limit and index >= job.grouped_moment_limit:
            continue
        kind, value = collectors.sample_moments(stats.moment_columns(arr, spec))
        deferred.append((kind, key, value, 0))


def _accumulate(stats: Statistics, deferred: Deferred) -> None:
    for kind, name, value, count in deferred:
        if kind == "mean":
            stats.add_channel_totals(name, value, count)
        else:
            stats.add_moments(name, kind, value)


def _return_freed_memory() -> None:
    """Hand the heap memory the session and the lanes freed back to the OS (glibc keeps it
    per thread arena otherwise: EfficientNet's compile held 240 MB more after calibration
    than before it, on top of which insert-qdq peaked). Linux with glibc only; elsewhere the
    allocator's own policy stands."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to call
        pass


def run_job(job: Job, data: Iterable[Feed], progress: "Progress | None" = None) -> tuple[Statistics, int]:
    """Run ``job`` over this shard's samples (index % shards == shard); (statistics, model runs).

    With ``job.lanes`` > 1, that many samples are in flight at once: each lane is a thread
    that runs its samples (the shard's k-th sample goes to lane k % lanes) on the one shared
    session and reduces them: min/max and histograms into its own statistics (exact, merged
    at the end), channel sums and moment vectors handed back and added in sample order. The
    statistics are therefore the same for any number of lanes, bit for bit.
    onnxruntime and numpy's reductions release the GIL, so one lane's model run overlaps the
    other's statistics: a single run of these small models uses two cores poorly (1.3x
    faster than one), two lanes of one thread each use them fully."""
    lanes = max(1, job.lanes)
    stats = Statistics()  # the float sums (channel means, moments), added in sample order
    stats.hist_spec = dict(job.hist_spec)
    parts = [Statistics() for _ in range(lanes)]  # per lane: min/max, histograms (exact)
    for part in parts:
        part.hist_spec = dict(job.hist_spec)
    runs = [0] * lanes
    inputs = set(job.inputs)
    groups = job.groups or [[]]
    # One session for every group: all observed names are graph outputs of the same model, so
    # onnxruntime optimizes (fuses) it the same way whatever the grouping and every value is
    # bit-identical across memory budgets; a run fetches only its group's outputs, and
    # onnxruntime frees the others as ordinary intermediates (memory stays per group).
    exposed = list(dict.fromkeys(job.session_outputs or [n for g in groups for n in g]))
    sess = _session(job.model, exposed, lane_threads(lanes, job.threads), job.initializers) if exposed else None

    def one(lane: int, first_group: bool, fetch: list[str], index: int, feed: Feed) -> tuple[Deferred, int]:
        part = parts[lane]
        deferred: Deferred = []
        if sess is not None and fetch:
            outs = collectors.run_model(sess, feed, fetch)
            runs[lane] += 1
            for i, n in enumerate(fetch):
                arr, outs[i] = outs[i], None  # each tensor freed once reduced: the other lane's run reuses it
                if isinstance(arr, np.ndarray) and arr.dtype.kind == "f":
                    _observe(part, job, n, arr, index, deferred)
                del arr
            del outs
        if first_group:  # graph inputs and the sample count: once, not once per group
            part.samples += 1
            for n, arr in feed.items():
                if n in inputs and arr.dtype.kind == "f":
                    _observe(part, job, n, arr, index, deferred)
        return deferred, sum(getattr(v, "nbytes", 0) for _, _, v, _ in deferred)

    def done(result: tuple[Deferred, int]) -> None:
        deferred = result[0]
        _accumulate(stats, deferred)
        deferred.clear()  # the lane's future still holds the list: drop what it held
        if progress is not None:
            progress.tick()

    with contextlib.ExitStack() as stack:  # on exit: lanes and adder joined, then BLAS threads back
        pools: list[ThreadPoolExecutor] = []
        adder: ThreadPoolExecutor | None = None
        if lanes > 1:
            stack.enter_context(one_blas_thread())
            pools = [ThreadPoolExecutor(1, thread_name_prefix=f"qcompiler-calibrate-{i}") for i in range(lanes)]
            # the float sums are added on one more thread, in sample order, so that the lane that
            # finished a sample gets its next one at once (the moment products of a wide layer
            # take 10-30 ms; on the dispatching thread they left the lanes idle)
            adder = ThreadPoolExecutor(1, thread_name_prefix="qcompiler-calibrate-sums")
            for pool in [adder] + pools:
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        for g, names in enumerate(groups):
            fetch = [n for n in dict.fromkeys(names) if n not in inputs]
            # past the moment samples, a tensor observed only for moments is not fetched at all
            later = [n for n in fetch if n in job.track or n in job.hist_spec or n in job.channel_axes]
            if progress is not None:
                progress.start_run()
            running: deque[Future[tuple[Deferred, int]]] = deque()  # in sample order, at most one per lane
            adding: deque[tuple[Future[None], Future[tuple[Deferred, int]]]] = deque()  # the adder's queue, in order
            k = 0
            for index, feed in enumerate(data):
                if job.limit and index >= job.limit:
                    break
                if job.moments_only and job.moment_limit and index >= job.moment_limit:
                    break
                if index % job.shards != job.shard:
                    continue
                wanted = later if job.moment_limit and index >= job.moment_limit else fetch
                if adder is None:
                    done(one(0, g == 0, wanted, index, feed))
                    continue
                if len(running) == lanes:  # the oldest sample's lane is the next one free
                    running.popleft().result()
                while adding and adding[0][0].done():
                    adding.popleft()[0].result()
                # The lanes may run ahead of the adder while what waits for it is small: it
                # multiplies the moment vectors short samples queue (MiniLM's 1536-wide layers),
                # and a lane that waited for it left a core idle. Bounded by bytes and count.
                while len(adding) > lanes and (len(adding) > _MAX_BACKLOG or sum(
                        lf.result()[1] for _, lf in adding if lf.done()) > _BACKLOG_BYTES):
                    adding.popleft()[0].result()
                lane_run = pools[k % lanes].submit(one, k % lanes, g == 0, wanted, index, feed)
                running.append(lane_run)
                adding.append((adder.submit(lambda f=lane_run: done(f.result())), lane_run))
                k += 1
            while adding:
                adding.popleft()[0].result()
            if progress is not None:
                progress.end_run()
    sess = None  # noqa: F841 - release the session (the lanes are done with it) before merging
    _return_freed_memory()
    for part in parts:  # lane order: deterministic (and exact: extremes, counts)
        stats.merge(part)
    stats.moments  # noqa: B018 - multiply the queued moment vectors now, inside the worker
    return stats, sum(runs)


# -- memory ----------------------------------------------------------------------------------


def tensor_bytes(model: Any, names: Sequence[str], first: Feed, threads: int = 0,
                 serialized: bytes | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None,
                 exposed: Sequence[str] | None = None) -> tuple[dict[str, int], int]:
    """Bytes each of ``names`` takes for one sample, and the model runs spent measuring.

    Shapes come from the IR (shape inference); symbolic dims that name a graph input's dim
    are bound from the first sample; tensors still unknown are measured by running the first
    sample with them exposed (in chunks). Variable-length data: estimated from sample 0."""
    import onnx_graphsurgeon as gs

    tensors = model.graph.gs.tensors()
    bound: dict[str, int] = {}
    for v in model.graph.inputs:
        if isinstance(v, gs.Constant) or v.shape is None or v.name not in first:
            continue
        for dim, have in zip(v.shape, first[v.name].shape):
            if isinstance(dim, str):
                bound[dim] = int(have)
    sizes: dict[str, int] = {}
    unknown: list[str] = []
    for n in names:
        t = tensors.get(n)
        shape = getattr(t, "shape", None)
        dims = [d if isinstance(d, int) else bound.get(d) if isinstance(d, str) else None
                for d in shape] if shape is not None else None
        if dims is None or any(d is None or d < 0 for d in dims):
            unknown.append(n)
            continue
        try:
            itemsize = np.dtype(t.dtype).itemsize if t.dtype is not None else 4
        except TypeError:
            itemsize = 4
        sizes[n] = int(np.prod(dims, dtype=np.int64)) * itemsize
    runs = 0
    if unknown:
        proto = serialized if serialized is not None else model.to_proto().SerializeToString()
        for start in range(0, len(unknown), 128):
            chunk = unknown[start:start + 128]
            # the calibration session itself when ``exposed`` names its outputs (reused by the
            # runs that follow, see reuse_sessions); a run fetches only this chunk
            sess = _session(proto, list(exposed) if exposed is not None else chunk, threads,
                            initializers if serialized is not None else None)
            outs = collectors.run_model(sess, first, chunk)
            runs += 1
            for n, arr in zip(chunk, outs):
                sizes[n] = int(arr.nbytes) if isinstance(arr, np.ndarray) else 0
            del outs, sess
    return sizes, runs


def make_groups(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Split ``names`` (in order) into consecutive groups whose summed bytes fit ``budget``;
    a tensor larger than the budget on its own still gets a group (it must be observed)."""
    groups: list[list[str]] = []
    cur: list[str] = []
    total = 0
    for n in names:
        size = int(sizes.get(n, 0))
        if cur and total + size > budget:
            groups.append(cur)
            cur, total = [], 0
        cur.append(n)
        total += size
    if cur:
        groups.append(cur)
    return groups


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size in MB of this process over its whole life (getrusage
    ru_maxrss, the kernel's VmHWM: includes the model load before calibration), or with
    ``children`` the largest peak of any finished child process (spawned workers)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kb = resource.getrusage(who).ru_maxrss
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024  # bytes on macOS, KB on Linux
    return round(kb * scale, 1)


# -- progress ----------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: run r/R, samples done, rate, ETA. Disabled unless enabled
    (the pass enables it when stderr is a terminal and the compile is not quiet). The total
    is known once the first run has seen every sample; until then there is no ETA."""

    def __init__(self, enabled: bool, runs: int, stream: TextIO | None = None,
                 show: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled
        self.show = show  # draw through this (a pass's ``ctx.progress``) instead of on ``stream``
        self.runs = max(runs, 1)
        self.stream = stream or sys.stderr
        self.run = 0
        self.done = 0
        self.in_run = 0
        self.per_run: int | None = None
        self.start = time.perf_counter()
        self._last = 0.0

    def start_run(self) -> None:
        self.run += 1
        self.in_run = 0

    def end_run(self) -> None:
        if self.per_run is None:
            self.per_run = self.in_run
        self._draw(force=True)

    def tick(self, n: int = 1) -> None:
        self.done += n
        self.in_run += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = ""
        if self.per_run is not None and rate > 0:
            left = max(self.per_run * self.runs - self.done, 0)
            eta = f", ETA {int(left / rate) // 60}:{int(left / rate) % 60:02d}"
        text = f"run {min(self.run, self.runs)}/{self.runs}, {self.in_run} samples, {rate:.1f} samples/s{eta}"
        if self.show is not None:
            self.show(text)
            return
        self.stream.write(f"\rcalibrate: {text}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.show is None:
            self.stream.write("\n")
            self.stream.flush()
