"""The same wals-ooc training at growing sizes: 1M, 10M and 100M nnz (``--large`` adds 300M).

Each matrix has the lastfm-360k shape scaled to its nnz (entries per user and per item stay
fixed). For each size a fresh process trains ``--iterations`` iterations under ``--memory-budget``
and prints the median seconds per iteration (first iteration apart), the time per nnz, the
bytes it read per iteration (``rchar`` of /proc/PID/io: page cache included) and the process's
peak RSS: time should grow linearly with nnz and peak RSS stay under the budget.

With ``--resident-budget`` each size is trained twice, side by side: under ``--memory-budget``
(the plan the budget allows, "blocked" when the factors do not fit) and under the larger
resident budget, and the ratio of their per-iteration times, their losses, and how many times
each half-sweep read the fixed side are printed.

Stores are generated once into ``--data-dir`` and reused (read only) afterwards; models are
written to ``--workdir``.

    python tools/bench_scale.py                     # 1M, 10M, 100M nnz
    python tools/bench_scale.py --sizes 1 10        # in millions of nnz
    python tools/bench_scale.py --sizes 300 --memory-budget 1.5GB --resident-budget 8GB \\
        --data-dir /work/data/shared --workdir /work/data/me
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_vs_implicit import DEFAULT_DIR, ensure_store

NNZ_AT_SCALE_1 = 16_449_626  # distinct entries the lastfm-shaped generator makes at scale 1


def _io() -> dict:
    """This process's I/O counters (Linux), or zeros."""
    try:
        with open("/proc/self/io") as counters:
            return {k: int(v) for k, v in (line.split(":") for line in counters)}
    except OSError:
        return {"rchar": 0, "read_bytes": 0}


def _cpu() -> float:
    """CPU seconds (user + system) this process has used so far, every thread counted."""
    times = os.times()
    return times.user + times.system


def child(args) -> None:
    import wals_ooc
    from wals_ooc.memory import peak_rss

    times: list[float] = []
    reads: list[dict] = []
    cpu: list[float] = []
    last = [_io()]
    last_cpu = [_cpu()]

    def callback(it, seconds, loss):
        now = _io()
        reads.append({k: now[k] - last[0][k] for k in ("rchar", "read_bytes")})
        last[0] = now
        cpu.append(_cpu() - last_cpu[0])
        last_cpu[0] = _cpu()
        times.append(seconds)
        print(f"    {os.path.basename(args.model)}: iteration {it}: {seconds:.2f} s, loss {loss:.8g}", file=sys.stderr, flush=True)

    model = wals_ooc.WALS(factors=args.factors, iterations=args.iterations, random_state=0, threads=args.threads,
                          memory_budget=args.memory_budget, solver=args.solver)
    plan = model.plan(args.store, factors_store=args.model, resume=False)  # what fit will do, as it plans it
    plans = [plan.user.describe(), plan.item.describe()]
    model.fit(args.store, args.model, resume=False, progress=False, callback=callback)
    store = wals_ooc.open_store(args.store)
    print(json.dumps({"times": times, "reads": reads, "cpu": cpu, "peak_rss": peak_rss(), "nnz": store.nnz, "shape": list(store.shape),
                      "history": model.loss_history, "plans": plans,
                      "fixed_bytes": {"user": store.n_items * args.factors * 4, "item": store.n_users * args.factors * 4}}))


def run(args, store: str, budget: str, label: str) -> dict:
    model = os.path.join(args.workdir, os.path.basename(store).replace(".zarr", f"-{label}-model.zarr"))
    command = [sys.executable, __file__, "--child", "--store", store, "--model", model, "--factors", str(args.factors),
               "--iterations", str(args.iterations), "--threads", str(args.threads), "--memory-budget", budget,
               "--solver", args.solver]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # the child's per-iteration lines go to stderr as they come
    if done.returncode:
        raise SystemExit(f"{label} run failed (exit {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(label: str, result: dict, fmt) -> float:
    steady = statistics.median(result["times"][1:] or result["times"])
    print(f"  {label:9s} {result['nnz']:>12,} nnz {result['shape'][0]:>10,} x {result['shape'][1]:<9,} "
          f"s/iteration {steady:8.2f} (first {result['times'][0]:.2f})  ns per nnz {1e9 * steady / result['nnz']:6.1f}  "
          f"peak RSS {fmt(result['peak_rss'])}  loss {result['history'][-1]['loss']:.8g}", flush=True)
    for plan in result["plans"]:
        print("      " + plan.replace("\n", "\n      "))
    last = result["history"][-1]
    for side in ("user", "item"):
        fixed = result["fixed_bytes"][side]
        read = last.get(f"{side}_fixed_bytes", 0)
        print(f"      {side} half-sweep (last iteration): {last[f'{side}_seconds']:.2f} s, read {fmt(read)} of the fixed side "
              f"({fmt(fixed)}): {read / fixed:.1f} passes")
    rchar = statistics.median(r["rchar"] for r in result["reads"][1:] or result["reads"])
    disk = statistics.median(r["read_bytes"] for r in result["reads"][1:] or result["reads"])
    print(f"      bytes read per iteration (/proc/PID/io): rchar {fmt(rchar)}, from disk {fmt(disk)}")
    if result.get("cpu"):
        busy = statistics.median(result["cpu"][1:] or result["cpu"])
        print(f"      CPU seconds per iteration (user + system, every thread): {busy:.2f} ({busy / steady:.2f} cores busy)")
    return steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100], help="millions of nnz")
    parser.add_argument("--large", action="store_true", help="also 300M nnz")
    parser.add_argument("--workdir", default=DEFAULT_DIR, help="where models are written")
    parser.add_argument("--data-dir", default=None, help="where stores are generated or found (default: --workdir)")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solver", default="cg")
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--resident-budget", default=None, help="also train under this budget and compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from wals_ooc.memory import format_bytes, to_bytes

    os.makedirs(args.workdir, exist_ok=True)
    data_dir = args.data_dir or args.workdir
    sizes = list(args.sizes) + ([300] if args.large else [])
    print(f"f={args.factors}, {args.iterations} iterations, {args.threads} threads, solver {args.solver}, "
          f"budget {args.memory_budget}" + (f", resident budget {args.resident_budget}" if args.resident_budget else ""))
    rows = []
    for size in sizes:
        store = os.path.join(data_dir, f"scale-{size:g}M.zarr")
        ensure_store(store, size * 1e6 / NNZ_AT_SCALE_1, seed=7)
        result = run(args, store, args.memory_budget, "budget")
        steady = report("budget", result, format_bytes)
        rows.append((size, result, steady))
        if args.resident_budget:
            resident = run(args, store, args.resident_budget, "resident")
            resident_steady = report("resident", resident, format_bytes)
            loss, resident_loss = result["history"][-1]["loss"], resident["history"][-1]["loss"]
            print(f"  ratio budget / resident: time {steady / resident_steady:.3f}x, loss after {args.iterations} iterations "
                  f"{loss / resident_loss:.7f}x; peak RSS {format_bytes(result['peak_rss'])} under budget "
                  f"{format_bytes(to_bytes(args.memory_budget))}", flush=True)
    budget = to_bytes(args.memory_budget)
    print(f"\nbudget {format_bytes(budget)}; largest peak RSS {format_bytes(max(r['peak_rss'] for _, r, _ in rows))}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last[2] / first[2]) / (last[1]["nnz"] / first[1]["nnz"])
        print(f"time growth / nnz growth from smallest to largest: {growth:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
