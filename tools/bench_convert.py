"""CSV -> interaction store, out of core, against a plain in-memory pandas + scipy.sparse baseline.

Generates a CSV of ``--rows`` rows (power-law users and items, count values), then in fresh
processes, alternating, ``--repeats`` times: ``wals_ooc.convert`` under a budget of (baseline +
``--allowance``), and ``pandas.read_csv`` + factorize + ``scipy.sparse`` CSR and CSC (what one
does in memory). Prints input size, budget, peak RSS and rows/s of each (medians), and the ratio.

    python tools/bench_convert.py                       # 20M rows (~300 MB), 64 MiB allowance
    python tools/bench_convert.py --rows 100000000 --allowance 256MiB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "wals-bench")


def child_wals(args) -> dict:
    import wals_ooc
    from wals_ooc.memory import current_rss, peak_rss, to_bytes, warm_libraries

    warm_libraries()
    budget = current_rss() + to_bytes(args.allowance)
    started = time.perf_counter()
    report = wals_ooc.convert(args.csv, os.path.join(args.workdir, "convert-bench.zarr"), memory_budget=budget,
                              overwrite=True, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": report.rows_read, "nnz": report.nnz, "peak_rss": peak_rss(), "budget": budget}


def child_pandas(args) -> dict:
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from wals_ooc.memory import peak_rss

    started = time.perf_counter()
    frame = pd.read_csv(args.csv, dtype={"user": np.int64, "item": np.int64, "count": np.float32})
    users, user_ids = pd.factorize(frame["user"], sort=True)
    items, item_ids = pd.factorize(frame["item"], sort=True)
    matrix = sp.csr_matrix((frame["count"].to_numpy(), (users, items)), shape=(len(user_ids), len(item_ids)))
    matrix.sum_duplicates()
    by_item = matrix.tocsc()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(frame), "nnz": int(by_item.nnz), "peak_rss": peak_rss(), "budget": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--allowance", default="64MiB", help="wals-ooc's budget above its warmed baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--child", choices=["wals", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((child_wals if args.child == "wals" else child_pandas)(args)))
        return

    from wals_ooc.memory import format_bytes
    from wals_ooc.synthetic import SyntheticSpec, write_csv

    os.makedirs(args.workdir, exist_ok=True)
    args.csv = os.path.join(args.workdir, f"convert-{args.rows}.csv")
    if not os.path.exists(args.csv):
        scale = args.rows / 23_500_000
        write_csv(SyntheticSpec(n_users=int(360_000 * scale), n_items=int(160_000 * scale), rows=args.rows, seed=5), args.csv)
    size = os.path.getsize(args.csv)
    print(f"input {args.csv}: {args.rows:,} rows, {format_bytes(size)}; wals-ooc allowance {args.allowance}", flush=True)
    runs: dict[str, list[dict]] = {"wals": [], "pandas": []}
    for repeat in range(args.repeats):
        for peer in runs:
            command = [sys.executable, __file__, "--child", peer, "--csv", args.csv, "--workdir", args.workdir,
                       "--allowance", args.allowance]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[peer].append(result)
            print(f"  run {repeat + 1} {peer:6s} {result['seconds']:7.2f} s  {result['rows'] / result['seconds']:>12,.0f} rows/s"
                  f"  peak RSS {format_bytes(result['peak_rss'])}" + (f" (budget {format_bytes(result['budget'])})" if result["budget"] else "")
                  + ("  OVER BUDGET" if result["budget"] and result["peak_rss"] > result["budget"] else ""),
                  flush=True)
    assert runs["wals"][0]["nnz"] == runs["pandas"][0]["nnz"], "the two disagree on nnz"
    medians = {peer: statistics.median(r["rows"] / r["seconds"] for r in results) for peer, results in runs.items()}
    peaks = {peer: max(r["peak_rss"] for r in results) for peer, results in runs.items()}
    print(f"\nmedian rows/s: wals-ooc {medians['wals']:,.0f}, pandas+scipy {medians['pandas']:,.0f} "
          f"(ratio {medians['wals'] / medians['pandas']:.2f}); peak RSS wals-ooc {format_bytes(peaks['wals'])} "
          f"(budget {format_bytes(runs['wals'][0]['budget'])}, input {format_bytes(size)}), pandas+scipy {format_bytes(peaks['pandas'])}; "
          f"nnz {runs['wals'][0]['nnz']:,}; wals-ooc runs over their budget: "
          f"{sum(r['peak_rss'] > r['budget'] for r in runs['wals'])} of {len(runs['wals'])}")


if __name__ == "__main__":
    main()
