"""The same wals-ooc training at growing sizes: 1M, 10M and 100M nnz (``--large`` adds 300M).

Each matrix has the lastfm-360k shape scaled to its nnz (entries per user and per item stay
fixed). For each size a fresh process trains ``--iterations`` iterations under ``--memory-budget``
and prints the median seconds per iteration (first iteration apart), the time per nnz, and the
process's peak RSS: time should grow linearly with nnz and peak RSS stay under the budget.

    python tools/bench_scale.py                     # 1M, 10M, 100M nnz
    python tools/bench_scale.py --sizes 1 10        # in millions of nnz
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


def child(args) -> None:
    import wals_ooc
    from wals_ooc.memory import peak_rss

    times: list[float] = []
    model = wals_ooc.WALS(factors=args.factors, iterations=args.iterations, random_state=0, threads=args.threads,
                          memory_budget=args.memory_budget)
    model.fit(args.store, args.store.replace(".zarr", "-model.zarr"), resume=False, progress=False,
              callback=lambda it, seconds, loss: times.append(seconds))
    store = wals_ooc.open_store(args.store)
    print(json.dumps({"times": times, "peak_rss": peak_rss(), "nnz": store.nnz, "shape": list(store.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100], help="millions of nnz")
    parser.add_argument("--large", action="store_true", help="also 300M nnz")
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from wals_ooc.memory import format_bytes, to_bytes

    os.makedirs(args.workdir, exist_ok=True)
    sizes = list(args.sizes) + ([300] if args.large else [])
    print(f"f={args.factors}, {args.iterations} iterations, {args.threads} threads, budget {args.memory_budget}")
    rows = []
    for size in sizes:
        store = os.path.join(args.workdir, f"scale-{size:g}M.zarr")
        ensure_store(store, size * 1e6 / NNZ_AT_SCALE_1, seed=7)
        command = [sys.executable, __file__, "--child", "--store", store, "--factors", str(args.factors),
                   "--iterations", str(args.iterations), "--threads", str(args.threads), "--memory-budget", args.memory_budget]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        steady = statistics.median(result["times"][1:] or result["times"])
        rows.append((size, result, steady))
        print(f"  {result['nnz']:>12,} nnz {result['shape'][0]:>10,} x {result['shape'][1]:<9,} "
              f"s/iteration {steady:8.2f} (first {result['times'][0]:.2f})  "
              f"ns per nnz {1e9 * steady / result['nnz']:6.1f}  peak RSS {format_bytes(result['peak_rss'])}", flush=True)
    budget = to_bytes(args.memory_budget)
    print(f"\nbudget {format_bytes(budget)}; largest peak RSS {format_bytes(max(r['peak_rss'] for _, r, _ in rows))}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last[2] / first[2]) / (last[1]["nnz"] / first[1]["nnz"])
        print(f"time growth / nnz growth from smallest to largest: {growth:.2f} (1.0 = linear)")


if __name__ == "__main__":
    main()
