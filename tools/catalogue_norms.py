"""How realistic a generated catalogue is for serving: item-norm spread and how far the exact
norm-ordered scan reads before its bound stops each user, beside models of the real data sets.

The exact recommend path (``wals_ooc/serve/scoring.py``) visits items by descending norm and
stops a user once ``|user| x |item|`` falls below its N-th best score, so how fast exact search
is, and how hard an approximate index has it, depend on the trained item norms: a few items of
huge norm make the scan stop early and draw a graph index's search to them. This tool trains
(once) a model of each store with the same settings (default: the library's defaults) and
prints, per model: item norm quantiles (median, p90, p99, max, and their ratios to the median)
and the share of the catalogue the exact scan reads per user (mean, p90, max), on the whole
catalogue and, so catalogues of different sizes compare, within random item subsets of Last.fm
HetRec's and MovieLens 100K's sizes (a larger catalogue raises every user's N-th score, so the
scan stops earlier in it for the same norm spread).

    python tools/catalogue_norms.py                                  # the two real data sets
    python tools/catalogue_norms.py --store /work/data/ann3/cat1m.zarr --workdir /work/data/ann3
    python tools/catalogue_norms.py --model M.zarr                   # an existing model as it is

In memory (a tool for catalogues of a few million items at most): the item factors, a sample of
users' factors and liked items, and one user block's scores at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
REAL = {
    "lastfm": (os.path.join(SHARED, "hetrec2011-lastfm-2k", "user_artists.dat"),
               dict(user_col="userID", item_col="artistID", value_col="weight", delimiter="\t")),
    "ml100k": (os.path.join(SHARED, "ml-100k", "u.data"),
               dict(user_col=0, item_col=1, value_col=None, delimiter="\t", header=False)),
}
MATCHED_SIZES = (17_632, 1_682)  # Last.fm HetRec 2k's and MovieLens 100K's items


def catalogue_stats(model_path: str, users: int = 2000, n: int = 10, seed: int = 0) -> dict:
    import numpy as np

    import wals_ooc

    model = wals_ooc.load(model_path, memory_budget="4GB")
    factors = model.factors_store
    items = np.asarray(factors.current("item")[:], np.float32)
    n_users = factors.current("user").shape[0]
    rows = np.unique(np.linspace(0, n_users - 1, min(n_users, users)).astype(np.int64))
    queries = np.asarray(factors.current("user").get_orthogonal_selection((rows, slice(None))), np.float32)
    qnorms = np.maximum(np.linalg.norm(queries, axis=1), 1e-30)
    indptr, liked = model._liked("user", rows)
    norms = np.linalg.norm(items, axis=1)

    def stop_shares(subset: np.ndarray) -> np.ndarray:
        position = np.full(len(norms), -1, np.int64)
        position[subset] = np.arange(len(subset))
        descending = -np.sort(-norms[subset])
        kth = np.empty(len(rows), np.float32)
        for lo in range(0, len(rows), 64):
            scores = queries[lo: lo + 64] @ items[subset].T
            for j in range(len(scores)):
                mine = position[liked[indptr[lo + j]: indptr[lo + j + 1]]]
                scores[j, mine[mine >= 0]] = -np.inf
            kth[lo: lo + 64] = np.partition(scores, -n, axis=1)[:, -n]
        return np.searchsorted(-descending, -(kth / qnorms[: len(kth)]), side="left") / len(subset)

    p50, p90, p99, top = (float(v) for v in np.percentile(norms, [50, 90, 99, 100]))
    whole = stop_shares(np.arange(len(norms)))
    out = {"model": model_path, "items": len(norms), "users": len(rows), "norm_p50": p50, "norm_p90": p90,
           "norm_p99": p99, "norm_max": top, "p90/p50": p90 / p50, "p99/p50": p99 / p50, "max/p50": top / p50,
           "stop_mean": float(whole.mean()), "stop_p90": float(np.percentile(whole, 90)), "stop_max": float(whole.max())}
    rng = np.random.default_rng(seed)
    for size in MATCHED_SIZES:
        if size < len(norms):
            out[f"stop_mean_at_{size}"] = float(stop_shares(np.sort(rng.choice(len(norms), size, replace=False))).mean())
        elif size == len(norms):
            out[f"stop_mean_at_{size}"] = out["stop_mean"]
    return out


def ensure_model(store: str, location: str, settings: dict) -> float | None:
    import wals_ooc
    from wals_ooc.train.factors import FactorStore

    if FactorStore.exists(location) and wals_ooc.load(location).factors_store.complete:
        return None
    started = time.perf_counter()
    wals_ooc.WALS(**settings, memory_budget="4GB", threads=2).fit(store, location, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", action="append", default=[], help="an interaction store (generated) to train and measure")
    parser.add_argument("--model", action="append", default=[], help="an existing model to measure as it is")
    parser.add_argument("--real", nargs="*", default=list(REAL), choices=list(REAL), help="real data sets to include")
    parser.add_argument("--workdir", default="/work/data/ann3" if os.path.isdir("/work/data") else "/tmp/catalogue-norms")
    parser.add_argument("--settings", default="{}", help="WALS settings as JSON (default: the library's defaults)")
    parser.add_argument("--users", type=int, default=2000, help="evenly spaced users measured per model")
    args = parser.parse_args()
    import wals_ooc

    settings = {"random_state": 0, **json.loads(args.settings)}
    tag = "def" if args.settings == "{}" else str(abs(hash(args.settings)) % 10**6)
    os.makedirs(args.workdir, exist_ok=True)
    models = []
    for name in args.real:
        source, convert = REAL[name]
        if not os.path.exists(source):
            sys.exit(f"{source} is missing: the real data sets live in ../shared/data")
        store = os.path.join(args.workdir, f"{name}.zarr")
        if not os.path.isdir(store):
            wals_ooc.convert([source], store, progress=False, **convert)
        models.append((store, os.path.join(args.workdir, f"{name}-{tag}.zarr")))
    for store in args.store:
        models.append((store, f"{store.rstrip('/').removesuffix('.zarr')}-{tag}-model.zarr"))
    print(f"settings: {settings} (the rest: the library's defaults); {args.users} evenly spaced users per model; "
          f"stop = share of the items the exact scan reads before its bound stops the user", flush=True)
    header = (f"{'model':42s} {'items':>9s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'max':>7s} {'p90/50':>6s} {'p99/50':>6s} "
              f"{'max/50':>6s} {'stop':>7s} {'p90':>7s} {'max':>7s} {'@17,632':>8s} {'@1,682':>8s}")
    print(header)
    for store, location in models:
        trained = ensure_model(store, location, settings)
        measured = catalogue_stats(location, users=args.users)
        line = {**measured, "train_seconds": trained}
        print(f"{os.path.basename(location)[:42]:42s} {line['items']:9,d} {line['norm_p50']:7.3g} {line['norm_p90']:7.3g} "
              f"{line['norm_p99']:7.3g} {line['norm_max']:7.3g} {line['p90/p50']:6.1f} {line['p99/p50']:6.1f} "
              f"{line['max/p50']:6.1f} {line['stop_mean']:7.2%} {line['stop_p90']:7.2%} {line['stop_max']:7.2%} "
              + " ".join(f"{line[k]:8.2%}" if k in line else f"{'':8s}" for k in ("stop_mean_at_17632", "stop_mean_at_1682")),
              flush=True)
    for model in args.model:
        line = catalogue_stats(model, users=args.users)
        print(f"{os.path.basename(model.rstrip('/'))[:42]:42s} {line['items']:9,d} {line['norm_p50']:7.3g} {line['norm_p90']:7.3g} "
              f"{line['norm_p99']:7.3g} {line['norm_max']:7.3g} {line['p90/p50']:6.1f} {line['p99/p50']:6.1f} "
              f"{line['max/p50']:6.1f} {line['stop_mean']:7.2%} {line['stop_p90']:7.2%} {line['stop_max']:7.2%} "
              + " ".join(f"{line[k]:8.2%}" if k in line else f"{'':8s}" for k in ("stop_mean_at_17632", "stop_mean_at_1682")),
              flush=True)


if __name__ == "__main__":
    main()
