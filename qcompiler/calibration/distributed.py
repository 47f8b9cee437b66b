"""Running calibration jobs on shards: inline, in local worker processes, or on Dask.

Sample i goes to shard i % N; each shard runs the whole :class:`~qcompiler.calibration.engine.Job`
(its own onnxruntime session) and returns its statistics serialised; the parent merges them
in shard order. Min/max, histograms and zero counts are integers or exact extremes, so the
merge equals a single-process run bit for bit; channel sums and second moments (float32 per
batch of samples) are added in a different order and agree to float32 rounding (~1e-6 relative).

Workers read the data themselves: the calibration data object is pickled to them, so it must
be a path (reachable from every worker) or in-memory arrays.
"""

from __future__ import annotations

import dataclasses
import pickle
import uuid
from collections.abc import Iterable
from typing import Any

from ..errors import UserError
from .data import Feed
from .engine import Job, Progress, lane_threads, run_job
from .stats import Statistics

__all__ = ["run_sharded"]


def _shard_task(job: Job, data: Iterable[Feed]) -> tuple[bytes, int]:
    """Runs in a worker: the shard's statistics (serialised) and its model-run count."""
    stats, runs = run_job(job, data)
    return stats.to_bytes(), runs


def _check_picklable(data: Any) -> None:
    try:
        pickle.dumps(data)
    except Exception as exc:
        raise UserError(f"calibration data ({type(getattr(data, 'source', data)).__name__}) cannot be sent to "
                        f"worker processes ({type(exc).__name__}); use a path or in-memory arrays with "
                        f"--workers/--scheduler") from None


def _merge(results: list[tuple[bytes, int]]) -> tuple[Statistics, int]:
    stats = Statistics()
    runs = 0
    for blob, n in results:  # shard order: the merge is deterministic
        stats.merge(Statistics.from_bytes(blob))
        runs += n
    return stats, runs


def _client(scheduler: str) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise UserError(f"--scheduler {scheduler}: needs the optional Dask support "
                        f"(pip install 'qcompiler[dask]')") from None
    try:
        return Client(scheduler, timeout="20s", set_as_default=False)
    except Exception as exc:
        raise UserError(f"--scheduler {scheduler}: cannot connect ({type(exc).__name__}: {exc})") from None


def run_sharded(job: Job, data: Iterable[Feed], *, workers: int = 1, scheduler: str = "",
                progress: Progress | None = None) -> tuple[Statistics, int]:
    """Run ``job`` over ``data`` split into shards; merged statistics and total model runs."""
    if not scheduler and workers <= 1:
        return run_job(job, data, progress)
    _check_picklable(data)
    if scheduler:
        with _client(scheduler) as client:
            shards = workers if workers > 1 else max(1, len(client.scheduler_info().get("workers", {})))
            jobs = [dataclasses.replace(job, shard=i, shards=shards) for i in range(shards)]
            tag = uuid.uuid4().hex[:8]
            futures = [client.submit(_shard_task, j, data, pure=False, key=f"qcompiler-calibrate-{tag}-{j.shard}")
                       for j in jobs]
            results = client.gather(futures)
        return _merge(list(results))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    threads = lane_threads(workers * max(1, job.lanes), job.threads)  # the cores shared by every lane
    jobs = [dataclasses.replace(job, shard=i, shards=workers, threads=threads) for i in range(workers)]
    try:
        # an executor (not multiprocessing.Pool): a worker that dies surfaces as an error, not a hang
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_shard_task, jobs, [data] * workers))
    except BrokenProcessPool as exc:
        raise UserError(f"--workers {workers}: a calibration worker process died ({exc}); from a Python script, "
                        f"call compile() under `if __name__ == \"__main__\":` (worker processes are spawned)") from None
    return _merge(results)
