"""Train on a dask-distributed cluster: here a LocalCluster of worker processes on this machine.

    python examples/cluster_example.py [WORKDIR]

It generates a 2M-row synthetic store, trains on a LocalCluster of 2 worker processes (1 thread
each), and prints per-iteration times; watch the tasks on the dashboard it prints (task names
say the half-sweep and shard, e.g. ``solve-users-it003-shard00012``).

On a real cluster, nothing in the code changes:

1. start a scheduler and workers that can all import wals_ooc and reach the stores, e.g.
       dask scheduler                                   # on the head node, port 8786
       dask worker tcp://HEAD:8786 --nthreads 1 --nworkers 8 --memory-limit 8GB   # on each node
   (one thread per worker process: each task runs a single-threaded numba kernel; the
   training memory_budget applies per worker process, keep it under --memory-limit);
2. put the interaction store where every worker sees it: a shared file system, or an object
   store: ``wals-ooc convert data.csv s3://bucket/plays.zarr`` (credentials via the usual
   AWS variables, or ``storage_options=`` in Python);
3. point the client at the scheduler instead of a LocalCluster:
       client = Client("tcp://HEAD:8786")
       model.fit("s3://bucket/plays.zarr", "s3://bucket/model.zarr", client=client)
   or on the command line ``wals-ooc train s3://bucket/plays.zarr --scheduler tcp://HEAD:8786``.
Workers read their shards and write their factor rows straight to the stores; only small
results (Gram partials, loss pieces) travel through the scheduler. If a worker dies, its shard
is recomputed elsewhere; if the driver dies, run the same command again: it resumes from the
last completed half-sweep.
"""

from __future__ import annotations

import os
import sys
import tempfile

from dask.distributed import Client, LocalCluster

import wals_ooc
from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store


def main() -> None:
    workdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "wals-cluster-example")
    os.makedirs(workdir, exist_ok=True)
    store = os.path.join(workdir, "synthetic.zarr")
    if not os.path.exists(os.path.join(store, "zarr.json")):
        report = write_synthetic_store(SyntheticSpec(n_users=50_000, n_items=20_000, rows=2_000_000, seed=1), store,
                                       overwrite=True, progress=False)
        print(report.summary())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        print("dashboard:", client.dashboard_link)
        model = wals_ooc.WALS(factors=32, iterations=5, regularization=0.05, alpha=2.0, random_state=0,
                              memory_budget="2GB")
        model.fit(store, os.path.join(workdir, "model.zarr"), client=client, resume=False,
                  callback=lambda it, seconds, loss: print(f"iteration {it + 1}: {seconds:.2f}s loss {loss:.6g}"))
    first_user = model.interactions.ids("user", 0, 1)  # the id of row 0 (reads one chunk of the id map)
    ids, scores = model.recommend(first_user, N=5)
    print("top 5 for user", first_user[0], ":", list(zip(ids[0].tolist(), scores[0].round(3).tolist())))


if __name__ == "__main__":
    main()
