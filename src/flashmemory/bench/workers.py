"""Benchmark worker processes: each loads the model once and decodes whole samples with every method.

Batch-1 decoding of a small model is bound by the Python and kernel-launch overhead of one CPU core, not by the
GPU, so several processes sharing one GPU (or spread over several) finish a benchmark grid several times sooner.
The parent keeps everything that must happen once: it hands out (task, length, index) items, writes every row to
``results.jsonl`` as it arrives and owns the deadline and the progress bar. Workers generate and tokenize their
items' prompts themselves (the same settings give the same ids in every process), then run the rows.
"""

from __future__ import annotations

import builtins
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Callable

import torch

from ..config import LSAConfig
from .methods import get_method
from .row import run_row
from .sample_source import SampleSource

OnRow = Callable[[dict], None]
# Exceptions a worker re-raises in the parent with their own type, so bad input still reads as one clear line.
_PASSED_THROUGH = ("ValueError", "FileNotFoundError", "NotImplementedError", "OSError")


def _serve(rank: int, workers: int, load, model_name: str, device: str, methods: list[str], seed: int,
           lsa: LSAConfig, family: str, source: SampleSource, jobs, results) -> None:  # fmt: skip
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        if device.startswith("cuda") and ":" not in device and torch.cuda.device_count() > 1:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        model, tokenizer = load(model_name, device)
        runners = {name: get_method(name, seed=seed) for name in methods}
        while (job := jobs.get()) is not None:
            task, length, index, todo = job
            got = source.get(task, tokenizer, length, index)
            if got is None:  # published data can hold fewer items
                results.put(("absent", rank, (task, length, index)))
                continue
            sample, enc = got
            for name in todo:
                results.put(("row", rank, run_row(runners[name], model, tokenizer, enc, sample, lsa, family)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent, which re-raises it
        results.put(("error", rank, (type(exc).__name__, str(exc), traceback.format_exc())))
        return
    results.put(("exit", rank, None))


class WorkerError(RuntimeError):
    """A benchmark worker failed with an error that is not the user's (its traceback is in the message)."""


class WorkerPool:
    """``workers`` processes that run (sample, methods) jobs and send back one row per method.

    Args:
        workers: number of processes (each holds its own copy of the model).
        load: ``(model_name, device) -> (model, tokenizer)``; must be picklable (a module-level function).
        model_name: passed to ``load``.
        device: ``cpu`` or ``cuda``; with several GPUs, worker ``i`` uses GPU ``i % count``.
        methods: names of the methods a job may ask for.
        seed: seed of the ``random`` baseline.
        lsa: LSA settings of every row.
        family: task set family (decides the scorer).
        source: where workers take each item's prompt from.

    Attributes:
        absent: ``(task, length, index)`` items the data does not have, as workers report them.
    """

    def __init__(self, workers: int, *, load, model_name: str, device: str, methods: list[str], seed: int,
                 lsa: LSAConfig, family: str, source: SampleSource) -> None:  # fmt: skip
        # spawn: the parent may already hold CUDA state, which a forked child cannot use.
        ctx = mp.get_context("spawn")
        self._jobs = ctx.Queue(maxsize=workers)  # bounded, so a deadline stops new work within one job per worker
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(
                    rank,
                    workers,
                    load,
                    model_name,
                    device,
                    methods,
                    seed,
                    lsa,
                    family,
                    source,
                    self._jobs,
                    self._results,
                ),
                daemon=True,
            )
            for rank in range(workers)
        ]
        self._exited: set[int] = set()
        self.absent: list[tuple[str, int, int]] = []
        for proc in self._procs:
            proc.start()

    def submit(self, task: str, length: int, index: int, methods: list[str], on_row: OnRow) -> None:
        """Queue one item for ``methods``; rows that arrive meanwhile go to ``on_row``."""
        self._put((task, length, index, list(methods)), on_row)
        while self._receive(on_row, timeout=0):
            pass

    def close(self, on_row: OnRow) -> None:
        """Let the workers finish the queued jobs, hand every remaining row to ``on_row`` and stop them."""
        for _ in self._procs:
            self._put(None, on_row)
        while len(self._exited) < len(self._procs):
            self._receive(on_row, timeout=0.5)
        for proc in self._procs:
            proc.join()

    def terminate(self) -> None:
        """Stop every worker now (after an error or an interrupt)."""
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join()

    def _put(self, item, on_row: OnRow) -> None:
        # Rows keep arriving while the job queue is full; taking them meanwhile keeps results.jsonl current.
        while True:
            try:
                self._jobs.put(item, timeout=0.2)
                return
            except queue.Full:
                self._receive(on_row, timeout=0.2)

    def _receive(self, on_row: OnRow, timeout: float) -> bool:
        try:
            kind, rank, payload = self._results.get(timeout=timeout) if timeout else self._results.get_nowait()
        except queue.Empty:
            self._check_alive()
            return False
        if kind == "row":
            on_row(payload)
        elif kind == "absent":
            self.absent.append(payload)
        elif kind == "exit":
            self._exited.add(rank)
        else:
            self.terminate()
            name, message, trace = payload
            error = getattr(builtins, name, None)
            if name in _PASSED_THROUGH and isinstance(error, type):
                raise error(message)
            raise WorkerError(f"benchmark worker {rank} failed:\n{trace}")
        return True

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs):
            if rank not in self._exited and proc.exitcode not in (None, 0):
                # Died without a word (killed for memory, a crash in native code): no message will come. A zero
                # exit code means its last message is still in the queue.
                self.terminate()
                raise WorkerError(f"benchmark worker {rank} died with exit code {proc.exitcode}")

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


__all__ = ["WorkerError", "WorkerPool"]
