"""The tensor-parallel backward, overlapped against plain: two gloo processes on this machine.

At tp 2 (with and without sp), each version's backward of the same model and batch is timed,
the two alternating, and the ratio of their medians printed: plain / overlapped, so that more
than 1 means the overlap saves time. One run, not a test: the figure depends on the machine, on
how many cores the two processes and gloo's threads share, and on what else runs. On the 2 cores
of the tests' machine, another suite running (load 3): 1.03 and 1.01 without sp, 0.95 and 0.93
with sp, at the two sizes below. The overlap needs a core to spare for gloo's thread, and under
sp the overlapped backward gathers the kept shard again, an all-gather the plain one does not
make (it saved the gathered input instead).

    python tests/bench_tp_overlap.py                        # dim 1024, 4 layers, 4 x 512 tokens
    python tests/bench_tp_overlap.py --dim 128 --layers 2 --batch 16 --repeats 10
"""

import argparse
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

import torch                                                            # noqa: E402

import model as M                                                       # noqa: E402
import parallel as P                                                    # noqa: E402
from distributed import spawn                                           # noqa: E402


def backward_seconds(args, sp, repeats, batch, seq_len, threads):
    """Each version's backward times, in seconds, alternating: {tp_overlap: [s, ...]}."""
    torch.set_num_threads(threads)
    world = P.init_distributed(device="cpu")
    try:
        grid = P.make_grid(world, tp=2)
        models = {}
        for overlap in (True, False):
            torch.manual_seed(0)
            models[overlap] = P.parallelize(M.Transformer(args), grid, sp=sp, tp_overlap=overlap)
        tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        times = {True: [], False: []}
        for i in range(repeats + 1):
            for overlap, model in models.items():
                loss = P.loss_fn(model(tokens[:, :-1]), tokens[:, 1:], grid)
                P.all_reduce(torch.zeros(1), grid.tp_group)        # both ranks start together
                start = time.perf_counter()
                loss.backward()
                if i > 0:                                              # the first: warm-up
                    times[overlap].append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        return times
    finally:
        P.destroy(world)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    a = p.parse_args(argv)
    args = M.ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, vocab_size=4096,
                       max_seq_len=a.seq_len)
    for sp in (False, True):
        times = spawn(backward_seconds, 2, args, sp, a.repeats, a.batch, a.seq_len, a.threads,
                      timeout=3600)[0]
        overlapped, plain = (statistics.median(times[o]) for o in (True, False))
        print(f"tp 2{' + sp' if sp else '     '}  backward, median of {a.repeats}: overlapped "
              f"{overlapped * 1e3:7.1f} ms, plain {plain * 1e3:7.1f} ms, plain / overlapped "
              f"{plain / overlapped:.3f}")


if __name__ == "__main__":
    main()
