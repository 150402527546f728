"""Point-to-point traffic recorded on gloo, replayed under NCCL's strictest rules.

gloo buffers a send, so code whose neighbours both send first and receive second passes every
gloo test and hangs on NCCL, whose send may wait for the matching receive. What NCCL promises is
only this (its docs: concurrent sends and receives must be grouped), and `replay` holds recorded
traffic to exactly that:
  1. each rank's point-to-point calls run one at a time, in the order it issued them, however
     asynchronous the call looked (an isend is a call; a batch_isend_irecv is one call);
  2. a send completes only together with its matching receive: nothing is buffered;
  3. the operations of one batch_isend_irecv progress together.
The n-th send from rank a to rank b matches the n-th receive on b from a (NCCL has no tags).

    with P2PRecorder() as calls:          # in each worker: wraps torch.distributed's functions
        ...                               # calls: [[("send", peer, numel, dtype), ...], ...]
    replay({rank: calls_of_that_rank})    # raises Deadlock, naming every stuck rank
"""

import torch.distributed as dist


class Deadlock(AssertionError):
    """The recorded calls cannot all complete under the three rules."""


class P2PRecorder:
    """While active, logs every point-to-point call of this process, in the order issued."""

    SINGLE = {"isend": "send", "irecv": "recv", "send": "send", "recv": "recv"}

    def __enter__(self):
        self.calls = []
        self.real = {name: getattr(dist, name) for name in (*self.SINGLE, "batch_isend_irecv",
                                                             "P2POp")}
        unwrap = {}

        def single(name):
            def call(tensor, peer, *args, **kwargs):
                self.calls.append([(self.SINGLE[name], peer, tensor.numel(), str(tensor.dtype))])
                return self.real[name](tensor, peer, *args, **kwargs)
            unwrap[call] = self.real[name]
            return call

        def batch(ops):
            kinds = {self.real["isend"]: "send", self.real["irecv"]: "recv"}
            self.calls.append([(kinds[o.op], o.peer, o.tensor.numel(), str(o.tensor.dtype))
                               for o in ops])
            return self.real["batch_isend_irecv"](ops)

        def p2p_op(op, *args, **kwargs):     # P2POp checks that op is the real isend or irecv
            return self.real["P2POp"](unwrap.get(op, op), *args, **kwargs)

        for name in self.SINGLE:
            setattr(dist, name, single(name))
        dist.batch_isend_irecv, dist.P2POp = batch, p2p_op
        return self.calls

    def __exit__(self, *exc):
        for name, fn in self.real.items():
            setattr(dist, name, fn)


def replay(calls: dict) -> int:
    """Play every rank's calls under the three rules; return how many calls completed.

    calls: {rank: [call, ...]}, a call a list of (kind, peer, numel, dtype). A send and its
    receive meet when each is in its rank's current call; a call completes once all of its
    operations have met, and only then does its rank move to its next call. If no call can
    complete and some remain, that is a deadlock: raised with each stuck rank's current call.
    """
    where, labels = {}, {}                   # (from, to, n-th) -> {kind: (rank, call index)}
    for rank, seq in calls.items():
        sent = {}                            # (kind, peer) -> how many so far
        labels[rank] = []
        for c, call in enumerate(seq):
            names = []
            for kind, peer, numel, dtype in call:
                n = sent[kind, peer] = sent.get((kind, peer), -1) + 1
                name = (rank, peer, n) if kind == "send" else (peer, rank, n)
                where.setdefault(name, {})[kind] = (rank, c, (numel, dtype))
                names.append((kind, name))
            labels[rank].append(names)
    for (src, dst, n), pair in where.items():
        if len(pair) == 2 and pair["send"][2] != pair["recv"][2]:
            raise Deadlock(f"send {n} from rank {src} to {dst} carries {pair['send'][2]} but "
                           f"its receive expects {pair['recv'][2]}")
    at, met, done = {rank: 0 for rank in calls}, set(), 0
    while not all(at[rank] == len(seq) for rank, seq in calls.items()):
        progress = False
        for rank, seq in calls.items():
            if at[rank] == len(seq):
                continue
            for kind, name in labels[rank][at[rank]]:
                partner = where[name].get("recv" if kind == "send" else "send")
                if partner is not None and at[partner[0]] == partner[1]:
                    met.add(name)            # both posted: this pair completes now
            if all(name in met for _, name in labels[rank][at[rank]]):
                at[rank], done, progress = at[rank] + 1, done + 1, True
        if not progress:
            stuck = [f"rank {rank} at call {at[rank]} {seq[at[rank]]}"
                     for rank, seq in calls.items() if at[rank] < len(seq)]
            raise Deadlock("no call can complete: " + "; ".join(stuck))
    return done
