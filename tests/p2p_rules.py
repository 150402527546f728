"""Every torch.distributed call recorded on gloo, replayed under NCCL's strictest rules.

gloo buffers a send and runs the calls of different groups as they come, so code that would
hang on NCCL passes every gloo test: neighbours that both send first and receive second; a send
then a broadcast on one rank against a broadcast then the receive on the other. `replay` holds
the recorded calls to this model, at least as strict as NCCL:
  1. a rank makes its calls in program order. A blocking call (a collective without async_op, a
     send, a recv) and a wait hold the rank until that call has completed; an asynchronous one
     (async_op=True, isend, irecv, batch_isend_irecv) lets it go on to its next call.
  2. the calls of one rank on one group complete in the order it made them, however
     asynchronous they look (a group is one NCCL communicator, one stream); a batch_isend_irecv
     is one call, whose operations progress together.
  3. a collective completes when every member of its group has reached its n-th collective on
     that group, with the same op and shape; a send only together with its posted receive
     (nothing is buffered): the n-th send from a to b with the n-th receive on b from a (NCCL
     has no tags).
  4. NCCL's start-up rule: each rank's first call on a group includes every rank of the group
     (a collective; a batch of point-to-point operations must reach all of them), as torch
     requires of batch_isend_irecv when it is the group's first call.

    with Recorder() as calls:             # in each worker: wraps torch.distributed's functions
        ...                               # calls: [Call, ...] in the order this rank made them
    replay({rank: calls_of_that_rank})    # raises Deadlock, naming every stuck rank
"""

import inspect
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


class Deadlock(AssertionError):
    """The recorded calls cannot all complete under the rules, or break NCCL's start-up rule."""


@dataclass(frozen=True)
class Call:
    """One torch.distributed call of one rank, or a wait on an asynchronous one.

    what: of a collective, what its members must agree on, ((argument, its shape and dtype, or
    its value: a root, a reduction), ...); of a "p2p" call, its operations, ((kind "send" or
    "recv", peer, numel, dtype), ...).
    """
    op: str                       # the function's name; "p2p": send, recv or a batch of them
    group: str = "world"          # the group's name, one per communicator
    ranks: tuple = ()             # the group's global ranks
    what: tuple = ()
    blocking: bool = True
    waits: int = -1               # a "wait": the index, in this rank's calls, of the call awaited


def p2p(*ops, group="pp", ranks=(), blocking=False) -> Call:
    """A hand-written batch: p2p(("send", 1, 8, "f32"), ("recv", 1, 8, "f32"))."""
    return Call("p2p", group, ranks, tuple(ops), blocking)


def collective(op, group, ranks, what=(), blocking=True) -> Call:
    return Call(op, group, tuple(ranks), tuple(what), blocking)


# --- recording -----------------------------------------------------------------------------

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "broadcast",
               "reduce", "gather", "scatter", "all_to_all_single", "barrier", "gather_object",
               "all_gather_object", "broadcast_object_list", "scatter_object_list")
SINGLE = {"isend": "send", "irecv": "recv", "send": "send", "recv": "recv"}


def _group(group) -> tuple:
    group = group if group is not None else dist.group.WORLD
    return group.group_name, tuple(dist.get_process_group_ranks(group))


def _describe(value):
    """What the members of a collective must agree on about one argument: a tensor's shape and
    dtype, a number, a reduction; None for Python objects, which may differ."""
    if torch.is_tensor(value):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
        return tuple(_describe(v) for v in value)
    if isinstance(value, (int, float, str)) or type(value).__name__ in ("ReduceOp", "RedOpType"):
        return str(value)
    return None


class RecordedWork:
    """A torch.distributed Work whose wait() is recorded as a call of its own."""

    def __init__(self, work, calls, index):
        self.work, self.calls, self.index = work, calls, index

    def wait(self, *args, **kwargs):
        self.calls.append(Call("wait", waits=self.index))
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):                      # is_completed, get_future, ...
        return getattr(self.work, name)


class Recorder:
    """While active, logs every torch.distributed call of this process, in the order made, into
    a new list, or into `calls` (which something else may log into too)."""

    def __init__(self, calls=None):
        self.calls = [] if calls is None else calls

    def __enter__(self):
        names = [n for n in (*COLLECTIVES, *SINGLE, "batch_isend_irecv", "P2POp")
                 if hasattr(dist, n)]
        self.real = {name: getattr(dist, name) for name in names}
        unwrap = {}

        def wrapped(result, blocking, index):
            if blocking or result is None:
                return result
            if isinstance(result, list):
                return [RecordedWork(w, self.calls, index) for w in result]
            return RecordedWork(result, self.calls, index)

        def collective_(name):
            signature = inspect.signature(self.real[name])

            def call(*args, **kwargs):
                bound = signature.bind(*args, **kwargs).arguments
                what = tuple((k, _describe(v)) for k, v in bound.items()
                             if k not in ("group", "async_op") and _describe(v) is not None)
                blocking = not bound.get("async_op", False)
                self.calls.append(Call(name, *_group(bound.get("group")), what, blocking))
                index = len(self.calls) - 1
                return wrapped(self.real[name](*args, **kwargs), blocking, index)
            return call

        def single(name):
            def call(tensor, peer, group=None, *args, **kwargs):
                op = (SINGLE[name], peer, tensor.numel(), str(tensor.dtype))
                blocking = name in ("send", "recv")
                self.calls.append(Call("p2p", *_group(group), (op,), blocking))
                index = len(self.calls) - 1
                result = self.real[name](tensor, peer, group, *args, **kwargs)
                return wrapped(result, blocking, index)
            unwrap[call] = self.real[name]
            return call

        def batch(ops):
            kinds = {self.real["isend"]: "send", self.real["irecv"]: "recv"}
            self.calls.append(Call("p2p", *_group(ops[0].group), tuple(
                (kinds[o.op], o.peer, o.tensor.numel(), str(o.tensor.dtype)) for o in ops),
                blocking=False))
            index = len(self.calls) - 1
            return wrapped(self.real["batch_isend_irecv"](ops), False, index)

        def p2p_op(op, *args, **kwargs):     # P2POp checks that op is the real isend or irecv
            return self.real["P2POp"](unwrap.get(op, op), *args, **kwargs)

        for name in self.real:
            if name in SINGLE:
                setattr(dist, name, single(name))
            elif name in COLLECTIVES:
                setattr(dist, name, collective_(name))
        dist.batch_isend_irecv, dist.P2POp = batch, p2p_op
        return self.calls

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)


# --- replaying ------------------------------------------------------------------------------

def concat(*traces) -> list:
    """Calls recorded one after the other (the grid's start, then a step), as one list."""
    out = []
    for trace in traces:
        shift = len(out)
        out += [replace(c, waits=c.waits + shift) if c.op == "wait" else c for c in trace]
    return out


def _say(rank, i, call) -> str:
    if call.op == "wait":
        return f"rank {rank} call {i}: wait for its call {call.waits}"
    ranks = f" {list(call.ranks)}" if call.ranks else ""
    return (f"rank {rank} call {i}: {call.op} on group {call.group}{ranks}"
            + (f" {list(call.what)}" if call.op == "p2p" else ""))


def check_group_starts(calls: dict) -> None:
    """Rule 4: each rank's first call on each group includes every rank of the group."""
    for rank, seq in calls.items():
        seen = set()
        for i, call in enumerate(seq):
            if call.op == "wait" or call.group in seen:
                continue
            seen.add(call.group)
            reached = {rank} | {peer for _, peer, *_ in call.what} if call.op == "p2p" \
                else set(call.ranks)
            if call.ranks and reached != set(call.ranks):
                raise Deadlock(f"{_say(rank, i, call)} is its first call on that group and "
                               f"reaches ranks {sorted(reached)} only: NCCL needs all of "
                               f"{list(call.ranks)} in a group's first call (start every group "
                               "with a collective when it is made: parallel.start_groups)")


def replay(calls: dict) -> int:
    """Play every rank's calls under the four rules; return how many calls completed.

    calls: {rank: [Call, ...]}, ranks global. Raises Deadlock when a rank's first call on a
    group leaves some of its ranks out, when the members of a collective disagree (op, shapes),
    when a send and its receive disagree (numel, dtype), or when no call can complete and some
    remain: then with the calls each stuck rank has made and not completed.
    """
    check_group_starts(calls)
    # Number the calls: the n-th collective of a group is matched with its members' n-th, the
    # n-th send from a to b on a group with the n-th receive on b from a.
    on_group, members, ops = {}, {}, {}
    for rank, seq in calls.items():
        counts = {}
        for i, call in enumerate(seq):
            if call.op == "wait":
                continue
            on_group.setdefault((rank, call.group), []).append(i)
            if call.op != "p2p":
                n = counts[call.group] = counts.get(call.group, -1) + 1
                members.setdefault((call.group, n), {})[rank] = i
            for j, (kind, peer, numel, dtype) in enumerate(call.what if call.op == "p2p" else ()):
                pair = (rank, peer) if kind == "send" else (peer, rank)
                n = counts[kind, call.group, pair] = counts.get((kind, call.group, pair), -1) + 1
                ops.setdefault((call.group, pair, n), {})[kind] = ((rank, i, j), (numel, dtype))
    partner, collective_of = {}, {}
    for (group, (src, dst), n), pair in ops.items():
        if len(pair) == 2:
            (send, sent), (recv, expected) = pair["send"], pair["recv"]
            if sent != expected:
                raise Deadlock(f"send {n} from rank {src} to {dst} carries {sent} but its "
                               f"receive expects {expected}")
            partner[send], partner[recv] = recv, send
    for (group, n), by_rank in members.items():
        (r0, i0), *others = by_rank.items()
        for r, i in others:
            if (calls[r][i].op, calls[r][i].what) != (calls[r0][i0].op, calls[r0][i0].what):
                raise Deadlock(f"collective {n} of group {group} disagrees: "
                               f"{_say(r0, i0, calls[r0][i0])} {list(calls[r0][i0].what)}, "
                               f"but {_say(r, i, calls[r][i])} {list(calls[r][i].what)}")
        for r, i in by_rank.items():
            collective_of[r, i] = by_rank

    made = {rank: 0 for rank in calls}            # how many calls each rank has made
    pending = {rank: set() for rank in calls}     # made and not completed
    head = {key: 0 for key in on_group}           # each (rank, group)'s first call not completed
    met, completed = set(), 0

    def active(rank, i):
        """Made, and first of its rank's calls on its group not completed (rule 2)."""
        key = (rank, calls[rank][i].group)
        return i in pending[rank] and on_group[key][head[key]] == i

    def complete(rank, i):
        nonlocal completed
        pending[rank].discard(i)
        completed += 1
        if calls[rank][i].op != "wait":           # it was its group's first: the next is
            head[rank, calls[rank][i].group] += 1

    progress = True
    while progress:
        progress = False
        for rank, seq in calls.items():           # rule 1: make calls up to a blocking one
            while made[rank] < len(seq) and not (made[rank] - 1 in pending[rank] and (
                    seq[made[rank] - 1].blocking or seq[made[rank] - 1].op == "wait")):
                pending[rank].add(made[rank])
                made[rank], progress = made[rank] + 1, True
        for rank, seq in calls.items():
            for i in sorted(pending[rank]):
                call = seq[i]
                if i not in pending[rank]:        # completed with its collective's members
                    continue
                if call.op == "wait":
                    ready = call.waits not in pending[rank]
                elif not active(rank, i):
                    continue
                elif call.op == "p2p":            # rule 3: each operation with its partner
                    for j in range(len(call.what)):
                        other = partner.get((rank, i, j))
                        if other is not None and active(*other[:2]):
                            met.update(((rank, i, j), other))
                    ready = all((rank, i, j) in met for j in range(len(call.what)))
                else:
                    group = collective_of[rank, i]
                    ready = set(group) == set(call.ranks) and all(active(r, k)
                                                                  for r, k in group.items())
                    if ready:
                        for r, k in group.items():
                            if r != rank:
                                complete(r, k)
                if ready:
                    complete(rank, i)
                    progress = True
    stuck = ["; ".join(_say(rank, i, seq[i]) for i in sorted(pending[rank]))
             for rank, seq in calls.items() if pending[rank]]
    if stuck:
        raise Deadlock("no call can complete: " + " | ".join(stuck))
    return completed
