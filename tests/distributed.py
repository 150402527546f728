"""Start and watch the processes a test needs: gloo workers running a test's function, and
train.py (or any script) as a user would type it.

    from distributed import spawn, spawn_each
    results = spawn(fn, 4, arg1, arg2)      # fn(arg1, arg2) on ranks 0..3, results in rank order
    runs = spawn_each(train.main, 4, [argv1, argv2])    # runs[1][rank]: train.main(argv2)'s

Each worker is a fresh Python process (multiprocessing's "spawn" start method) with torchrun's
variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port) and one
thread (OMP_NUM_THREADS=1: four workers share two cores without oversubscribing them). fn calls
`parallel.init_distributed(device="cpu")` itself, exactly as train.py would under torchrun. A
worker that raises fails the test with its traceback; a group still running after `timeout`
seconds is killed and fails the test, so a stuck collective never hangs the suite. fn must be
importable by the child (a module-level function of a test file or of the project) and return
picklable values.

What a worker measures, for its test to compare with a closed form or with planner.py's
prediction: `record_collectives` logs every collective launched (axis, op, bytes) and `tally`
counts them as planner.comm_per_step does; `saved_bytes_of_layer` and `held_bytes` weigh what
autograd keeps (saved_tensors_hooks), `state_bytes` a stage's weights, gradients and optimizer
state. (Every torch.distributed call, and each wait, is recorded by p2p_rules.py, which replays
them under NCCL's rules.)

For whole programs: `python(...)` runs one to its end, `start(...)` and `torchrun(...)` leave it
running, `wait_for_step` watches its metrics.jsonl until a step is logged, `losses` reads them,
and `children` finds the workers torchrun started (to kill one).
"""

import json
import os
import pickle
import queue
import socket
import subprocess
import sys
import time
import traceback

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd.graph import saved_tensors_hooks


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository


# --- gloo workers running a test's function ----------------------------------------------------

def free_port() -> int:
    """A TCP port on localhost that no one listens on now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict:
    """The variables torchrun sets for one rank of a job on this machine."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _run(rank, world_size, port, fn, args, results):
    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(1)
    try:
        # NOTE: sent as bytes: a tensor put on a torch.multiprocessing queue travels as a shared
        # memory handle, which dies with this process if it exits before the test reads it.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """fn(*args) on world_size gloo workers; their return values in rank order."""
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


def _each_in_a_fresh_group(fn, items, ports):
    results = []
    for item, port in zip(items, ports):
        os.environ["MASTER_PORT"] = str(port)
        results.append(fn(item))
    return results


def spawn_each(fn, world_size: int, items: list, timeout: float = 180.0) -> list:
    """fn(item) for each item, one after the other on the same world_size workers (train.main
    once per configuration, say); per item, the results of ranks 0..world_size-1.

    NOTE: each item's call joins a fresh process group on its own port: the previous group's
    store may still hold the old one while a slower rank leaves it."""
    ports = [free_port() for _ in items]
    by_rank = spawn(_each_in_a_fresh_group, world_size, fn, items, ports, timeout=timeout)
    return [list(results) for results in zip(*by_rank)]


# --- what a worker measures ---------------------------------------------------------------------

@contextmanager
def record_collectives(grid, events=None):
    """Patch torch.distributed to log (axis, op, payload bytes) for every collective launched."""
    events = [] if events is None else events
    real = {name: getattr(dist, name) for name in
            ("all_reduce", "all_gather_single", "reduce_scatter_single")}

    def logged(name):
        def call(*args, **kwargs):
            group = kwargs.get("group")
            axis = "tp" if group is grid.tp_group else "dp" if group is grid.dp_group else "?"
            payload = args[1] if name == "reduce_scatter_single" else args[0]  # the full tensor
            nbytes = payload.numel() * payload.element_size()
            events.append((axis, name.replace("_single", ""), nbytes))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        setattr(dist, name, logged(name))
    try:
        yield events
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def tally(events) -> dict:
    """record_collectives' events as planner.comm_per_step counts them: {"tp all_gather": (calls,
    payload bytes), ...}."""
    table = {}
    for axis, op, nbytes in events:
        calls, total = table.get(f"{axis} {op}", (0, 0))
        table[f"{axis} {op}"] = (calls + 1, total + nbytes)
    return table


def weight_copies(params):
    """A test for the bf16 copies of weights that autocast makes and saves (as they are, or as
    their transpose): the planner counts those with the weights, 2 bytes per parameter."""
    by_numel = {}
    for p in params:
        by_numel.setdefault(p.numel(), []).append(p)

    def is_copy(t):
        for p in by_numel.get(t.numel(), []):
            if t.dtype != p.dtype and t.dim() == p.dim():
                for view in (t, t.t()) if t.dim() == 2 else (t,):
                    if view.shape == p.shape and torch.equal(view, p.detach().to(t.dtype)):
                        return True
        return False
    return is_copy


def saved_bytes_of_layer(model, tokens, index=0, amp=False):
    """Bytes of the distinct storages autograd saves during the forward of layers[index], under
    bf16 autocast if amp (the weights' bf16 copies left out: see weight_copies)."""
    params = list(model.parameters())
    static = {t.untyped_storage().data_ptr() for t in [*params, *model.buffers()]}
    is_copy, seen, recording = weight_copies(params), {}, [False]

    def pack(t):
        storage = t.untyped_storage()
        if recording[0] and storage.data_ptr() not in static and not is_copy(t):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    layer = model.layers[index]
    hooks = [layer.register_forward_pre_hook(lambda *_: recording.__setitem__(0, True)),
             layer.register_forward_hook(lambda *_: recording.__setitem__(0, False))]
    with saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        model(tokens)
    for h in hooks:
        h.remove()
    return sum(seen.values())


def held_bytes(stage, rows, grid, m, schedule, amp=False):
    """One pipeline step; the most bytes of activations the stage holds at once, measured.

    Each chunk-forward is charged the floating-point storages autograd saves while it and its
    loss run (not parameters or buffers), its received input and its output, both held by
    pipeline_step until its backward (the input once where autograd saves it too); the
    schedule's order then says which are held together."""
    # NOTE: imported here: gpu_check.py imports this file before the repository is on its path.
    import parallel as P
    static = {t.untyped_storage().data_ptr() for t in [*stage.parameters(), *stage.buffers()]}
    is_copy = weight_copies(list(stage.parameters()))
    charged, recording = [], [False]

    def charge(t):
        storage = t.untyped_storage()
        if recording[0] and t.is_floating_point() and storage.data_ptr() not in static \
                and not is_copy(t):
            charged[-1][storage.data_ptr()] = storage.nbytes()
        return t

    def forward_starts(module, args):
        charged.append({})
        recording[0] = True
        charge(args[0])                     # a received activation (token ids: integers)

    def forward_ends(module, args, out):
        if args[1] * grid.pp + grid.pp_rank < grid.pp * stage.virtual_stages - 1:
            charge(out)                                          # held for the backward call

    real_backward = torch.autograd.backward

    def backward(*args, **kwargs):
        recording[0] = False
        return real_backward(*args, **kwargs)

    hooks = [stage.register_forward_pre_hook(forward_starts),
             stage.register_forward_hook(forward_ends)]
    torch.autograd.backward = backward
    try:
        with saved_tensors_hooks(charge, lambda t: t):
            P.pipeline_step(stage, rows, grid, m, schedule,
                            amp=torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp))
    finally:
        torch.autograd.backward = real_backward
        for h in hooks:
            h.remove()
    order = P.schedule_order(schedule, grid.pp, m, stage.virtual_stages, grid.pp_rank)
    forwards = iter(sum(c.values()) for c in charged)
    sizes, held, most = {}, 0, 0
    for op, i, k in order:
        if op == "F":
            sizes[i, k] = next(forwards)
        held += sizes[i, k] if op == "F" else -sizes[i, k]
        most = max(most, held)
    return most


def state_bytes(stage, opt) -> dict:
    """Bytes of the stage's weights, gradients and AdamW's two moments, measured."""
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return dict(weights=nbytes(stage.parameters()),
                grads=nbytes(p.grad for p in stage.parameters()), optimizer=nbytes(moments))


# --- whole programs, as a user runs them ---------------------------------------------------------

def python(*args, **kw) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root to its end, as a user would type it; its
    output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def start(*args, **kw) -> subprocess.Popen:
    """Start `python ARGS` from the repository root and return it running (text mode; say where
    its output goes with stdout= and stderr=)."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, **kw)


def torchrun(*args) -> subprocess.Popen:
    """Start `torchrun ARGS` (as python -m torch.distributed.run, the same program), its workers
    one thread each, stdout and stderr together in its .stdout."""
    return start("-m", "torch.distributed.run", *args, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def children(pid: int) -> list:
    """The processes whose parent is pid (read off /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def losses(out) -> dict:
    """{step: loss} of the steps that train.py logged to OUT/metrics.jsonl with a finite loss.

    NOTE: the last line may be cut short, by a write in progress or by a kill; it is skipped. A
    damaged line before it is an error (train.py drops a torn line when it resumes)."""
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(lines[-1])] if lines else []
    except json.JSONDecodeError:
        pass
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def wait_for_step(out, step: int, proc: subprocess.Popen, timeout: float = 120,
                  poll: float = 0.05):
    """Wait until the run writing OUT/metrics.jsonl has logged the loss of `step`; fail if proc
    ends, or `timeout` seconds pass, first."""
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.monotonic() + timeout
    while not (os.path.exists(metrics) and max(losses(out), default=0) >= step):
        if proc.poll() is not None:
            said = "".join(text for text in proc.communicate() if text)   # what was piped
            raise AssertionError(f"{' '.join(map(str, proc.args[1:]))} ended (exit "
                                 f"{proc.returncode}) before step {step}:\n{said}")
        assert time.monotonic() < deadline, f"no step {step} in {metrics} after {timeout} s"
        time.sleep(poll)
