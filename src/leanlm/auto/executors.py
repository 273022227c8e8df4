"""Where trials run: in this process (one at a time), in local worker processes (`jobs`), or as Ray actors
on a cluster (`ray`). Each worker loads the original model once; every executor hands back
concurrent.futures Futures, so the search loop is the same for all three."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

from leanlm.auto.trial import Candidate, SearchJob, TrialRunner, init_worker, run_in_worker
from leanlm.errors import ConfigError


class InlineExecutor:
    """One trial at a time in this process: the default on a small machine, and what SIGTERM interrupts."""
    slots = 1

    def __init__(self, job: SearchJob):
        self.runner = TrialRunner(job)

    def submit(self, cand: Candidate) -> Future:
        future: Future = Future()
        future.set_result(self.runner.run(cand))
        return future

    def shutdown(self) -> None:
        pass


class ProcessExecutor:
    """`jobs` local worker processes, the machine's cores shared out between them."""

    def __init__(self, job: SearchJob, jobs: int):
        self.slots = jobs
        job.threads = job.threads or max(1, (os.cpu_count() or 1) // jobs)
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=init_worker, initargs=(job,))

    def submit(self, cand: Candidate) -> Future:
        return self.pool.submit(run_in_worker, cand)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayExecutor:
    """Trials as Ray actor calls: `address` is a cluster (`ray://host:10001`, `auto`) or `local`, which starts
    one in this process. Each actor holds the original model; `jobs` actors, `cpus` cores each."""

    def __init__(self, job: SearchJob, address: str, jobs: int, cpus: int | None = None):
        try:
            import ray
        except ImportError as err:
            raise ConfigError("--ray needs Ray: pip install 'leanlm[auto]'") from err
        self.ray = ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=max(jobs, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        cpus = cpus or max(1, int(ray.cluster_resources().get("CPU", jobs)) // jobs)
        job.threads = job.threads or cpus
        actor = ray.remote(num_cpus=cpus)(TrialRunner)
        self.idle = [actor.remote(job) for _ in range(jobs)]
        self.slots = jobs
        self.busy: dict[Future, object] = {}

    def submit(self, cand: Candidate) -> Future:
        worker = self.idle.pop()
        future = worker.run.remote(cand).future()
        self.busy[future] = worker
        future.add_done_callback(lambda f: self.idle.append(self.busy.pop(f)))
        return future

    def shutdown(self) -> None:
        for worker in [*self.idle, *self.busy.values()]:
            self.ray.kill(worker)
        self.idle, self.busy = [], {}


def make_executor(job: SearchJob, jobs: int = 1, ray: str | None = None):
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if ray:
        return RayExecutor(job, ray, jobs)
    return InlineExecutor(job) if jobs == 1 else ProcessExecutor(job, jobs)
