"""``evaluate`` on a held-out split: users/s and peak RSS of each metric mode, and how far into the
catalogue the bounded scan goes for top-K and for AUC.

Each run is a fresh process (so its peak RSS, VmHWM, is its own) that loads the model, warms the
kernels (not timed) and times one ``model.evaluate(test, k)``; runs alternate between modes,
``--repeats`` times, and medians are printed. Modes:

- ``topk``: precision, recall, ndcg, map at k only (``auc=False``);
- ``auc``: every metric, AUC exact for every evaluated user (the default of ``evaluate``);
- ``auc=F``: every metric, AUC exact for a seeded share F of the users (``auc_fraction=F``).

``--before DIR`` also times ``auc`` with the wals_ooc package found in DIR (e.g. an export of an
older commit: ``git archive <commit> wals_ooc | tar -x -C DIR``) on ``--before-fraction`` of the
users, for a before/after ratio in the same run.

The scan-depth line samples ``--depth-users`` test users, scores them against every item in norm
order (NumPy, not timed) and reports the share of the catalogue the bound makes each scan: for the
top K (as recommend) and for AUC (until every held-out score is outside +-the bound).

    python tools/bench_evaluate.py --model M --train TR --test TE --modes topk,auc=0.01 --user-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
from wals_ooc import load
from wals_ooc.kernels.warm import warm_serving_kernels
from wals_ooc.memory import peak_rss, warm_libraries
args = json.loads(sys.argv[1])
warm_libraries()
warm_serving_kernels()
model = load(args["model"], interactions=args["train"], memory_budget=args["budget"], threads=args["threads"])
options = {} if args["auc"] == "default" else {"auc": args["auc"] != "off"}
if args.get("auc_fraction") is not None:
    options["auc_fraction"] = args["auc_fraction"]
start, cpu = time.perf_counter(), time.process_time()
metrics = model.evaluate(args["test"], k=args["k"], user_fraction=args["user_fraction"], seed=args["seed"], **options)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": peak_rss(), "metrics": metrics}))
"""


def run_child(args, mode: str, code_dir: str | None, user_fraction: float | None) -> dict:
    auc, fraction = ("off", None) if mode == "topk" else ("on", None) if mode == "auc" else ("on", float(mode[4:]))
    if code_dir is not None:  # an older wals_ooc may not know auc=: its default computed AUC
        auc = "default"
    spec = dict(model=args.model, train=args.train, test=args.test, budget=args.memory_budget, threads=args.threads,
                k=args.k, user_fraction=user_fraction, seed=args.seed, auc=auc, auc_fraction=fraction)
    env = dict(os.environ)
    if code_dir is not None:
        env["PYTHONPATH"] = code_dir
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, env=env,
                          cwd=code_dir or os.getcwd())
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["users_per_s"] = out["metrics"]["users"] / out["seconds"]
    return out


def scan_depth(args) -> str:
    """Share of the catalogue the bounded scan visits per sampled user, for top K and for AUC."""
    import numpy as np

    from wals_ooc import open_store
    from wals_ooc.serve.scoring import BOUND_MARGIN, NormOrder
    from wals_ooc.train.factors import FactorStore

    model, train, test = FactorStore.open(args.model), open_store(args.train), open_store(args.test)
    order = NormOrder.of(model.current("item"))
    n_items = order.rows.shape[0]
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(test.n_rows("user"), min(args.depth_users, test.n_rows("user")), replace=False))
    topk_depth, auc_depth = [], []
    for r in rows:
        held = test.rows("user", int(r), int(r) + 1).indices
        if not len(held):
            continue
        user = int(train.index_of("user", test.ids_of("user", np.array([r]), as_arrow=True), missing="mark")[0])
        items = train.index_of("item", test.ids_of("item", held, as_arrow=True), missing="mark")
        items = items[items >= 0]
        if user < 0 or not len(items):
            continue
        liked = train.rows("user", user, user + 1).indices.astype(np.int64)
        query = np.asarray(model.current("user")[user], np.float32)
        scores = order.rows @ query
        scores[order.positions[liked]] = -np.inf
        bounds = float(np.linalg.norm(query.astype(np.float64))) * order.norms.astype(np.float64) * BOUND_MARGIN
        kth = np.partition(scores, -args.k)[-args.k]
        # top K: the first position whose bound the K-th best exceeds (the scan stops at tile ends: a lower bound)
        below = np.flatnonzero(kth > bounds)
        topk_depth.append((below[0] if len(below) else n_items) / n_items)
        held_scores = scores[order.positions[items]]
        settled = np.ones(n_items, bool)
        for s in held_scores:
            settled &= (s >= bounds) | (s < -bounds)
        # AUC: the first position from which every later bound leaves every held-out score outside it
        open_at = np.flatnonzero(~settled)
        auc_depth.append((open_at[-1] + 1 if len(open_at) else 0) / n_items)
    def describe(values):
        v = np.asarray(values)
        return f"median {np.median(v):.2%}, mean {v.mean():.2%}, p90 {np.quantile(v, 0.9):.2%}, max {v.max():.2%}"
    norms = order.norms
    return (f"item norms median {np.median(norms):.3g}, p90 {np.quantile(norms, 0.9):.3g}, p99 {np.quantile(norms, 0.99):.3g}, "
            f"max {norms.max():.3g}; {len(topk_depth)} sampled test users, share of the {n_items:,} items scanned: "
            f"top {args.k}: {describe(topk_depth)}; AUC: {describe(auc_depth)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="the interaction store the model was trained on")
    parser.add_argument("--test", required=True, help="the held-out store of the split")
    parser.add_argument("--modes", default="topk,auc", help="comma-separated: topk, auc, auc=FRACTION")
    parser.add_argument("--user-fraction", type=float, default=None, help="evaluate a seeded share of the test users")
    parser.add_argument("--before", default=None, help="a directory holding an older wals_ooc package to time too")
    parser.add_argument("--before-fraction", type=float, default=0.01, help="share of the test users the older code evaluates")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--depth-users", type=int, default=0, help="test users sampled for the scan-depth line (0: none)")
    args = parser.parse_args()

    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in modes:
            out = run_child(args, mode, None, args.user_fraction)
            runs.setdefault(mode, []).append(out)
            print(f"  {mode:10s} {out['metrics']['users']:>9,} users in {out['seconds']:8.2f} s = {out['users_per_s']:>9,.0f} users/s,"
                  f" ({out['metrics']['users'] / out['cpu']:,.0f} per CPU second), peak RSS {out['peak'] / 2**30:.2f} GiB", flush=True)
        if args.before:
            out = run_child(args, "auc", args.before, args.before_fraction)
            runs.setdefault("before", []).append(out)
            print(f"  before     {out['metrics']['users']:>9,} users in {out['seconds']:8.2f} s = {out['users_per_s']:>9,.0f} users/s,"
                  f" ({out['metrics']['users'] / out['cpu']:,.0f} per CPU second), peak RSS {out['peak'] / 2**30:.2f} GiB"
                  f" ({args.before}, AUC of every user)", flush=True)
    print(f"model {args.model}, test {args.test}, k={args.k}, {args.threads} threads, budget {args.memory_budget}, "
          f"user fraction {args.user_fraction}, {args.repeats} repeat(s)")
    medians = {mode: statistics.median(r["users_per_s"] for r in rs) for mode, rs in runs.items()}
    for mode, rs in runs.items():
        metrics = rs[-1]["metrics"]
        shown = ", ".join(f"{name} {value:.6f}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items())
        ratio = f"  = {medians[mode] / medians['before']:.1f}x before" if "before" in medians and mode != "before" else ""
        print(f"{mode:10s} median {medians[mode]:>9,.0f} users/s, peak RSS {max(r['peak'] for r in rs) / 2**30:.2f} GiB{ratio}\n"
              f"           {shown}")
    if args.depth_users:
        print(scan_depth(args))


if __name__ == "__main__":
    main()
