"""Per-iteration time on a distributed LocalCluster of 1 and 2 worker processes (1 thread each)
against the threaded scheduler with 1 and 2 threads, on the same store.

    python tools/bench_cluster.py                      # the 16M-nnz lastfm-shaped store
    python tools/bench_cluster.py --store my.zarr --iterations 4
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_vs_implicit import DEFAULT_DIR, ensure_store


def timed_fit(store: str, model_path: str, args, client=None, threads: int | None = None) -> list[float]:
    import wals_ooc

    times: list[float] = []
    model = wals_ooc.WALS(factors=args.factors, iterations=args.iterations, random_state=0, threads=threads,
                          memory_budget=args.memory_budget)
    model.fit(store, model_path, client=client, resume=False, progress=False,
              callback=lambda it, seconds, loss: times.append(seconds))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--memory-budget", default="4GB")
    args = parser.parse_args()
    from dask.distributed import Client, LocalCluster

    os.makedirs(args.workdir, exist_ok=True)
    if args.store is None:
        args.store = os.path.join(args.workdir, f"lastfm-shape-{args.scale:g}.zarr")
        ensure_store(args.store, args.scale)
    model_path = os.path.join(args.workdir, "cluster-bench-model.zarr")
    print(f"store {args.store}, f={args.factors}, {args.iterations} iterations (median of iterations 2..)")
    results = {}
    for threads in (1, 2):
        results[f"threaded, {threads} thread(s)"] = timed_fit(args.store, model_path, args, threads=threads)
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            results[f"LocalCluster, {workers} worker process(es)"] = timed_fit(args.store, model_path, args, client=client)
    base = statistics.median(results["threaded, 2 thread(s)"][1:])
    for name, times in results.items():
        steady = statistics.median(times[1:])
        print(f"  {name:38s} {steady:7.2f} s/iteration (first {times[0]:.2f} s)  ratio to threaded/2: {steady / base:.2f}")


if __name__ == "__main__":
    main()
