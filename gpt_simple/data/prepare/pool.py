"""The worker pool: tasks in, (task, result) out in task order, with a bounded number in flight."""
from __future__ import annotations

import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

from gpt_simple.data.prepare.sources import CHUNK_BYTES
from gpt_simple.data.prepare.tasks import Result, Task, Worker
from gpt_simple.data.tokenizer import get_tokenizer

_WORKER: Worker | None = None   # this process's tokenizer and text field, set by init_worker


def init_worker(tokenizer: str, field_name: str = "text") -> None:
    global _WORKER
    _WORKER = Worker(get_tokenizer(tokenizer), field_name)


def run_task(task: Task) -> Result:
    return task.run(_WORKER)


def default_workers(total_bytes: int) -> int:
    """One per CPU, but no more than there are tasks' worth of input."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, total_bytes // CHUNK_BYTES + 1))


def results(tasks: Iterable[Task], tokenizer: str, field_name: str, workers: int) -> Iterator[tuple[Task, Result]]:
    """(task, result) in task order; with workers > 1 a pool works ahead, at most 2 × workers + 2 tasks, so
    memory does not grow with the input and the output does not depend on the number of workers."""
    if workers <= 1:
        init_worker(tokenizer, field_name)
        for task in tasks:
            yield task, run_task(task)
        return
    # fork is cheap, but not safe once torch (and its threads) is loaded: then start clean interpreters.
    method = "fork" if "torch" not in sys.modules and sys.platform == "linux" else "spawn"
    # Not multiprocessing.Pool: its terminate() (what `with Pool` runs on an exception, e.g. a Ctrl-C) can hang for
    # good when its task thread is writing a large task into the workers' pipe (seen here: a Ctrl-C'd build that
    # never returned). The executor cancels what has not started and lets the running tasks finish.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=init_worker,
                             initargs=(tokenizer, field_name)) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(run_task, task)))
                while len(pending) >= 2 * workers + 2:
                    task_done, future = pending.popleft()
                    yield task_done, future.result()
            while pending:
                task_done, future = pending.popleft()
                yield task_done, future.result()
        except BaseException:  # an interrupt, an error, the consumer gone: drop the queued tasks
            pool.shutdown(wait=True, cancel_futures=True)
            raise
