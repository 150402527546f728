"""Run a function on a group of gloo worker processes from inside a test.

    from distributed import spawn
    results = spawn(fn, 4, arg1, arg2)      # fn(arg1, arg2) on ranks 0..3, results in rank order

Each worker is a fresh Python process (multiprocessing's "spawn" start method) with torchrun's
variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port) and one
thread (OMP_NUM_THREADS=1: four workers share two cores without oversubscribing them). fn calls
`parallel.init_distributed(device="cpu")` itself, exactly as train.py would under torchrun. A
worker that raises fails the test with its traceback; a group still running after `timeout`
seconds is killed and fails the test, so a stuck collective never hangs the suite. fn must be
importable by the child (a module-level function of a test file) and return picklable values.
"""

import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world_size, port, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        # NOTE: sent as bytes: a tensor put on a torch.multiprocessing queue travels as a shared
        # memory handle, which dies with this process if it exits before the test reads it.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"                 # inherited by the children at start
    procs = [ctx.Process(target=_run, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    out, deadline = {}, time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"worker rank {dead[0]} died with exit code "
                                       f"{procs[dead[0]].exitcode} before reporting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} workers ran past {timeout}s "
                                       f"(ranks {sorted(set(range(world_size)) - set(out))} "
                                       "never finished: a stuck collective?)")
                continue
            if not ok:
                raise RuntimeError(f"worker rank {rank} of {fn.__name__} failed:\n{value}")
            out[rank] = pickle.loads(value)          # our own workers' results, not a file
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
