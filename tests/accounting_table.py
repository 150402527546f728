"""Prints the README's accounting table: activation bytes saved per layer and collectives per
step, predicted by planner.py's formulas and measured on 4 gloo workers (saved_tensors_hooks,
counted calls). Run from the repository root: `PYTHONPATH=. python tests/accounting_table.py`."""
import os, sys; sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import torch, model as M, parallel as P, planner
from distributed import spawn, saved_bytes_of_layer, record_collectives, tally

B, T = 4, 256
ROWS = [("none", 1, False, "none"), ("tp", 2, False, "none"), ("tp+sp", 2, True, "none"),
        ("tp+sp+selective", 2, True, "selective"), ("tp+sp+full", 2, True, "full"),
        ("tp4", 4, False, "none"), ("tp4+sp", 4, True, "none"), ("tp4+sp+selective", 4, True, "selective")]

def worker():
    world = P.init_distributed(device="cpu")
    try:
        grids = {tp: P.make_grid(world, tp=tp) for tp in (1, 2, 4)}
        args = M.preset("tiny")
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=gen)
        act, comm = {}, {}
        for label, tp, sp, rc in ROWS:
            torch.manual_seed(0)
            m = P.parallelize(M.Transformer(args), grids[tp], sp=sp); P.apply_recompute(m, rc)
            act[label] = saved_bytes_of_layer(m, tokens[:, :-1])
            act[label, "bf16"] = saved_bytes_of_layer(m, tokens[:, :-1], amp=True)
            m.zero_grad()
            sync = P.GradSync(m, grids[tp], overlap=True)
            with record_collectives(grids[tp]) as calls:
                P.loss_fn(m(tokens[:, :-1]), tokens[:, 1:], grids[tp]).backward()
                sync.finish(); P.clip_grad_norm(m, 1.0, grids[tp])
            comm[label] = tally(calls)
        return act, comm
    finally:
        P.destroy(world)

if __name__ == "__main__":
    act, comm = spawn(worker, 4, timeout=600)[0]
    args = M.preset("tiny")
    print(f"activation bytes saved per layer, tiny preset, B={B} T={T} (MiB)")
    print("| config | fp32 predicted | fp32 measured | bf16 autocast predicted | bf16 measured |")
    for label, tp, sp, rc in ROWS:
        pred = [planner.activation_bytes_per_layer(args, B, T, tp=tp, sp=sp, recompute=rc, bytes_per_el=b) for b in (4, 2)]
        print(f"| {label} | {pred[0]/2**20:.3f} | {act[label]/2**20:.3f} | {pred[1]/2**20:.3f} | {act[label, 'bf16']/2**20:.3f} |")
    print("\ncollectives per step (one micro-batch), per rank; payload MiB; wire MiB = ring formula")
    for label, tp, sp, rc in ROWS:
        dp = 4 // tp
        pred = planner.comm_per_step(args, B, T, tp=tp, dp=dp, sp=sp, recompute=rc)
        for key in sorted(set(pred) | set(comm[label])):
            pc, pb = pred.get(key, (0, 0)); mc, mb = comm[label].get(key, (0, 0))
            n = tp if key.startswith("tp") else dp
            print(f"| {label} (dp{dp}) | {key} | {pc} / {mc} | {pb/2**20:.2f} / {mb/2**20:.2f} | {planner.wire_bytes(key.split()[1], n, pb)/2**20:.2f} |")
