"""recommend_all of wals-ooc against implicit's batched ``recommend`` over every user, side by side.

The same factors (the 16M bench's model: bench_vs_implicit.py's lastfm-360k-shaped store,
trained here once and kept under /work/data/shared) are served by both:

- wals-ooc: ``model.recommend_all(N, filter_already_liked=True, format="parquet")``: the whole
  path, factors read from the Zarr factor store, liked items from the interaction store, one
  Parquet file per user shard with original ids, 2 task threads, under the memory budget;
- implicit: the same factors loaded with ``model.to_implicit()``, one batched ``recommend(user
  ids, user_items, N, filter_already_liked_items=True)`` with ``num_threads=2`` and BLAS at one
  thread (implicit's own advice), the CSR of liked items already in memory (not timed). implicit
  scores every item for every user, so its users/s does not depend on which users: it is
  measured on ``--implicit-users`` evenly spaced users (36,000 of 360,000 by default) to keep
  the run short.

wals-ooc's exact scan visits items by descending norm and stops a user when no remaining item
can enter its top N (``wals_ooc/serve/scoring.py``); the same kernels with that bound switched
off (every item scored, ``model.recommend`` on implicit's users in as many threads) are
reported too, so the two sources of the speed-up can be told apart.

Each runs in its own fresh process (so peak RSS is its own), alternating, ``--repeats`` times;
printed: users/s of each run, medians, the ratio wals-ooc / implicit, peak RSS, and how many of
the top-N lists agree (ids equal where the scores differ by more than float rounding).

    python tools/bench_recommend.py                   # the 16M bench's model, N=10, 3 repeats
    python tools/bench_recommend.py --scale 0.1       # a 10x smaller store, quick look
    python tools/bench_recommend.py --ann --model M --ann-sample random --ann-users 2000 \
        --ann-index M-hnsw.ann=64,128 --ann-index M-ivf.ann=16,64   # saved indexes against exact
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_implicit import ensure_store  # noqa: E402

SHARED_DIR = "/work/data/shared"
DEFAULT_DIR = SHARED_DIR if os.path.isdir(SHARED_DIR) else os.path.join(tempfile.gettempdir(), "wals-bench")
CHECK_EVERY = 20  # every 20th user of implicit's sample has its lists compared
TRAIN_SETTINGS = dict(factors=64, regularization=0.01, alpha=1.0, iterations=6, solver="cg", cg_steps=3, random_state=0)


def ensure_model(store: str, location: str, factors: int) -> None:
    """Train the bench's model on ``store`` unless a finished one is already at ``location``."""
    import wals_ooc
    from wals_ooc.train.factors import FactorStore

    if FactorStore.exists(location):
        model = wals_ooc.load(location)
        if model.factors_store.complete:
            return
    started = time.perf_counter()
    settings = {**TRAIN_SETTINGS, "factors": factors}
    wals_ooc.WALS(**settings, memory_budget="4GB", threads=2).fit(store, location, progress=False)
    print(f"trained {location} ({settings}) in {time.perf_counter() - started:.0f}s", flush=True)


def sample_rows(n_users: int, count: int) -> "np.ndarray":
    """Evenly spaced user rows (implicit's sample, and the brute-force comparison's)."""
    import numpy as np

    return np.unique(np.linspace(0, n_users - 1, min(n_users, count)).astype(np.int64))


def child_wals(args) -> dict:
    import numpy as np

    import wals_ooc
    from wals_ooc.kernels.warm import warm_serving_kernels
    from wals_ooc.memory import peak_rss
    from wals_ooc.serve import scoring

    warm_serving_kernels()
    model = wals_ooc.load(args.model, memory_budget=args.memory_budget, threads=args.threads)
    output = os.path.join(args.workdir, "bench-recommend-wals.parquet")
    started = time.perf_counter()
    model.recommend_all(N=args.n, output=output, filter_already_liked=True, format="parquet", overwrite=True)
    seconds = time.perf_counter() - started
    peak = peak_rss()
    import pyarrow.parquet as pq
    from threadpoolctl import threadpool_limits

    store = model.interactions
    # the same kernels with the norm bound switched off (every item scored), on implicit's users,
    # in as many threads: what the tiling and selection alone give
    rows = sample_rows(store.n_users, args.implicit_users)
    scoring.PRUNE = False
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(store.ids("user")[rows], args.threads)
    model.recommend(parts[0][:100], N=args.n)
    with threadpool_limits(1, "blas"), ThreadPoolExecutor(args.threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda part: model.recommend(part, N=args.n), parts))
        brute_seconds = time.perf_counter() - started
    scoring.PRUNE = True
    checked = store.ids("user")[rows[:: CHECK_EVERY]]
    table = pq.read_table(output, filters=[("user", "in", checked.tolist())]).to_pandas().sort_values(["user", "rank"])
    return {"seconds": seconds, "users": store.n_users, "peak_rss": peak,
            "brute_users_per_s": len(rows) / brute_seconds,
            "sample_users": table["user"].tolist(), "sample_items": table["item"].tolist(),
            "sample_scores": table["score"].tolist()}


def child_implicit(args) -> dict:
    import numpy as np
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    import wals_ooc
    from wals_ooc.memory import peak_rss

    model = wals_ooc.load(args.model, memory_budget="16GB")
    store = model.interactions
    shard = store.rows("user", 0, store.n_users)
    user_items = sp.csr_matrix((shard.values, shard.indices, shard.indptr), shape=store.shape)
    del shard
    peer = model.to_implicit()
    peer.num_threads = args.threads
    userids = sample_rows(store.n_users, args.implicit_users)
    liked = user_items[userids]
    with threadpool_limits(1, "blas"):
        peer.recommend(userids[:1000], liked[:1000], N=args.n, filter_already_liked_items=True)  # warm-up
        started = time.perf_counter()
        ids, scores = peer.recommend(userids, liked, N=args.n, filter_already_liked_items=True)
        seconds = time.perf_counter() - started
    peak = peak_rss()
    sample = np.arange(0, len(userids), CHECK_EVERY)
    user_ids_of = store.ids("user")[userids]
    item_ids = store.ids("item")
    keep = ids[sample] >= 0
    return {"seconds": seconds, "users": len(userids), "peak_rss": peak,
            "sample_users": np.repeat(user_ids_of[sample], args.n)[keep.ravel()].tolist(),
            "sample_items": item_ids[ids[sample][keep]].tolist(),
            "sample_scores": scores[sample][keep].astype(float).tolist()}


def _recall(exact, approx) -> float:
    import numpy as np

    return float(np.mean([len(set(a[a != -1]) & set(b[b != -1])) / max(1, (a != -1).sum()) for a, b in zip(exact, approx)]))


def _ann_setting(args, model, location, kind, knob, value, users, queries, liked, exact) -> dict:
    """One index at one search setting: end to end through ``model.recommend`` (median of 3),
    recall@N against ``exact``, the retrieval step alone, and faiss alone on the raw vectors."""
    import faiss
    import numpy as np

    from wals_ooc.index import approximate_top_k, forget_indexes, resolve_index

    batch = args.ann_batch
    forget_indexes()
    tuned = resolve_index(location, model.factors_store, "item", "inner_product", model.memory_budget, **{knob: value})
    model.recommend(users[:50], N=args.n, index=tuned)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        approx = np.concatenate([model.recommend(users[lo: lo + batch], N=args.n, index=tuned)[0]
                                 for lo in range(0, len(users), batch)])
        times.append(time.perf_counter() - started)
    row = {"value": value, "users_per_s": len(users) / statistics.median(times), "recall": _recall(exact, approx)}
    # the approximate step alone (queries and liked items in memory): faiss's share, rounds
    stats: dict = {}
    started = time.perf_counter()
    approximate_top_k(tuned, queries, args.n, liked, None, threads=args.threads, stats=stats)
    row["retrieve_users_per_s"] = len(users) / (time.perf_counter() - started)
    row["search_share"] = stats["search_seconds"] / (time.perf_counter() - started)
    row["second_round"] = stats["second_round"] / len(users)
    row["short"] = stats["exact"] / len(users)
    # faiss alone on the raw vectors: one call, N + N candidates, its own threads
    faiss.omp_set_num_threads(args.threads)
    k = 2 * args.n
    params = (faiss.SearchParametersHNSW(efSearch=max(value, k)) if kind == "hnsw"
              else faiss.SearchParametersIVF(nprobe=value))
    raw = queries if not tuned.l2 else np.hstack([queries, np.zeros((len(queries), 1), np.float32)])
    tuned.index.search(raw[:200], k, params=params)
    started = time.perf_counter()
    tuned.index.search(raw, k, params=params)
    row["faiss_alone_users_per_s"] = len(users) / (time.perf_counter() - started)
    forget_indexes()
    return row


def _similar_items(args, model, store) -> dict:
    """similar_items exact against each cosine index of ``--ann-similar`` at its settings and at
    each ``--similar-candidates``: items/s through ``model.similar_items`` in batches (median of
    3), recall@N against the exact lists, how many of the exact lists' items the index missed
    and how many of those score within 1e-4 (relative) of the exact N-th score, and faiss alone
    (one call, k=N, the stored vectors as queries)."""
    import faiss
    import numpy as np

    from wals_ooc.index import forget_indexes, resolve_index

    batch = args.ann_batch
    items = store.ids("item")[sample_rows(store.n_items, args.similar_items)]
    rows = model._ids().index_of("item", items)
    model.similar_items(items[:50], N=args.n)
    started = time.perf_counter()
    exact, exact_scores = zip(*[model.similar_items(items[lo: lo + batch], N=args.n)
                                for lo in range(0, len(items), batch)])
    out: dict = {"similar_exact_per_s": len(items) / (time.perf_counter() - started), "similar": [],
                 "similar_items": len(items), "similar_indexes": []}
    exact, exact_scores = np.ma.filled(np.concatenate(exact), -1), np.ma.filled(np.concatenate(exact_scores), np.nan)
    tenth = exact_scores[:, -1]
    picks = [None if c == "saved" else int(c) for c in args.similar_candidates.split(",")]
    for spec in args.ann_similar:
        location, _, values = spec.partition("=")
        forget_indexes()
        opened = resolve_index(location, model.factors_store, "item", "cosine", model.memory_budget)
        knob = "ef_search" if opened.settings.kind == "hnsw" else "nprobe"
        out["similar_indexes"].append({"location": location, "describe": opened.describe()})
        for value in [int(v) for v in (values or args.ann_settings).split(",")]:
            for candidates in picks:
                forget_indexes()
                tuned = resolve_index(location, model.factors_store, "item", "cosine", model.memory_budget,
                                      **{knob: value}, candidates=candidates)
                model.similar_items(items[:50], N=args.n, index=tuned)
                times = []
                for _ in range(3):
                    started = time.perf_counter()
                    approx = np.concatenate([np.ma.filled(model.similar_items(items[lo: lo + batch], N=args.n,
                                                                               index=tuned)[0], -1)
                                             for lo in range(0, len(items), batch)])
                    times.append(time.perf_counter() - started)
                missed = near = 0
                for q in range(len(items)):
                    got = set(approx[q][approx[q] != -1].tolist())
                    for j, item in enumerate(exact[q]):
                        if item != -1 and item not in got:
                            missed += 1
                            near += abs(exact_scores[q, j] - tenth[q]) <= 1e-4 * abs(tenth[q])
                # faiss alone: the stored vectors as queries, one call, k=N, its own threads
                queries = tuned.vectors(rows)
                faiss.omp_set_num_threads(args.threads)
                params = (faiss.SearchParametersHNSW(efSearch=max(value, args.n)) if knob == "ef_search"
                          else faiss.SearchParametersIVF(nprobe=value))
                tuned.index.search(queries[:100], args.n, params=params)
                started = time.perf_counter()
                tuned.index.search(queries, args.n, params=params)
                alone = len(items) / (time.perf_counter() - started)
                out["similar"].append({"index": location, "knob": knob, "value": value, "candidates": tuned.candidates,
                                       "per_s": len(items) / statistics.median(times), "recall": _recall(exact, approx),
                                       "missed": missed, "near": int(near), "faiss_alone_per_s": alone})
    forget_indexes()
    return out


def child_ann(args) -> dict:
    """Approximate recommend against exact on ``--ann-users`` evenly spaced users of a large
    catalogue: the index built (timed, once) or reused, then per setting users/s and recall@N
    against the exact lists, liked items filtered in both; queries answered in batches of 1000
    through ``model.recommend`` as a server would, ``--threads`` faiss threads. Also: what the
    catalogue looks like (item norms, how much of it the exact scan scores before its bound
    stops it), where the approximate path's time goes, and faiss alone on the same index and
    the raw query vectors (no filtering, ids or Python around it): the ceiling."""
    import numpy as np

    import wals_ooc
    from wals_ooc.index import forget_indexes, resolve_index
    from wals_ooc.kernels.warm import warm_serving_kernels
    from wals_ooc.memory import peak_rss
    from wals_ooc.serve import recommend as serve_recommend
    from wals_ooc.serve import scoring
    from wals_ooc.serve.ids import original_ids

    warm_serving_kernels()
    model = wals_ooc.load(args.model, memory_budget=args.memory_budget, threads=args.threads)
    store = model.interactions
    if args.skip_recommend:
        result = {"items": store.n_items, "skipped": True, **_similar_items(args, model, store)}
        result["peak_rss"] = peak_rss()
        return result
    if args.ann_sample == "random":
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(store.n_users, size=min(args.ann_users, store.n_users), replace=False))
    else:
        rows = sample_rows(store.n_users, args.ann_users)
    users = store.ids("user")[rows]
    result: dict = {"items": store.n_items, "users": len(users), "settings": [], "indexes": []}
    if args.ann_index:  # indexes already built (wals-ooc index MODEL --output PATH), each with its settings
        indexes = []
        for spec in args.ann_index:
            location, _, values = spec.partition("=")
            tuned = resolve_index(location, model.factors_store, "item", "inner_product")  # refuses a stale one
            indexes.append((location, tuned.settings.kind, values or args.ann_settings))
            result["indexes"].append({"location": location, "describe": tuned.describe()})
            forget_indexes()
        result["build_seconds"] = None
    else:
        location = os.path.join(args.workdir, f"{os.path.basename(args.model.rstrip('/'))[:-5]}-{args.ann_kind}.ann")
        # (reused indexes must be built with the same name: wals-ooc index MODEL --output LOCATION)
        started = time.perf_counter()
        if args.ann_reuse and os.path.isdir(location):
            resolve_index(location, model.factors_store, "item", "inner_product")  # refuses a stale one
            result["build_seconds"] = None
        elif args.ann_kind == "hnsw":
            model.build_index(location=location, kind="hnsw", hnsw_m=args.hnsw_m,
                              ef_construction=args.ef_construction, overwrite=True)
        else:
            model.build_index(location=location, kind="ivf", overwrite=True)
        if "build_seconds" not in result:
            result["build_seconds"] = time.perf_counter() - started
        indexes = [(location, args.ann_kind, args.ann_settings)]
    batch = args.ann_batch
    model.recommend(users[:50], N=args.n)  # item factors into memory in norm order (not timed)
    started = time.perf_counter()
    exact, exact_scores = zip(*[model.recommend(users[lo: lo + batch], N=args.n) for lo in range(0, len(users), batch)])
    result["exact_users_per_s"] = len(users) / (time.perf_counter() - started)
    exact, exact_scores = np.concatenate(exact), np.concatenate(exact_scores)
    # the catalogue: item norms, and the share of items the exact scan scores before its bound
    # (|user| * |item at p| < the user's N-th score) stops it
    order = next(iter(serve_recommend._items_in_memory.values()))
    norms = order.norms
    queries = np.asarray(model.factors_store.current("user").get_orthogonal_selection((rows, slice(None))), np.float32)
    qnorms = np.linalg.norm(queries, axis=1)
    stops = np.searchsorted(-norms, -(exact_scores[:, -1] / np.maximum(qnorms, 1e-30)), side="left") / len(norms)
    result["norms"] = [float(v) for v in np.percentile(norms, [50, 90, 99, 100])]
    result["stop_share"] = [float(np.mean(stops)), float(np.percentile(stops, 90)), float(stops.max())]
    scoring.PRUNE = False  # exact with every item scored (no norm bound), on the first 500 users
    started = time.perf_counter()
    model.recommend(users[:500], N=args.n)
    result["brute_users_per_s"] = 500 / (time.perf_counter() - started)
    scoring.PRUNE = True
    # where the time of an exact batch goes outside the scan: liked items read, ids mapped
    maps = model._ids()
    started = time.perf_counter()
    for lo in range(0, len(users), batch):
        part = maps.index_of("user", users[lo: lo + batch])
        model._liked("user", part)
    result["liked_seconds_per_user"] = (time.perf_counter() - started) / len(users)
    item_rows = model.factors_store.current("item").shape[0]
    picks = np.random.default_rng(0).integers(0, item_rows, size=(len(users), args.n))
    started = time.perf_counter()
    for lo in range(0, len(users), batch):
        original_ids(maps, "item", picks[lo: lo + batch])
    result["ids_seconds_per_user"] = (time.perf_counter() - started) / len(users)
    liked = model._liked("user", rows)
    # the exact scan alone (queries and liked items in memory), as the retrieval step is timed below
    started = time.perf_counter()
    scoring.top_k(queries, scoring.FactorSource(order, 1 << 16), args.n, exclude=liked)
    result["scan_users_per_s"] = len(users) / (time.perf_counter() - started)
    for location, kind, settings in indexes:
        values = [int(v) for v in settings.split(",")]
        knob = "ef_search" if kind == "hnsw" else "nprobe"
        for value in values:
            result["settings"].append({"index": location, "knob": knob, **_ann_setting(
                args, model, location, kind, knob, value, users, queries, liked, exact)})
    if args.ann_similar:  # similar items by cosine: no norm bound applies, every exact query scans all items
        result.update(_similar_items(args, model, store))
    result["peak_rss"] = peak_rss()
    return result


def ann_main(args) -> None:
    from wals_ooc.memory import format_bytes

    command = [sys.executable, __file__, "--child", "ann", "--model", args.model, "--workdir", args.workdir,
               "--threads", str(args.threads), "-n", str(args.n), "--memory-budget", str(args.memory_budget),
               "--ann-users", str(args.ann_users), "--ann-kind", args.ann_kind, "--ann-settings", args.ann_settings,
               "--hnsw-m", str(args.hnsw_m), "--ef-construction", str(args.ef_construction)]
    command += (["--ann-reuse"] if args.ann_reuse else [])
    for spec in args.ann_similar or []:
        command += ["--ann-similar", spec]
    command += ["--similar-items", str(args.similar_items), "--similar-candidates", args.similar_candidates]
    command += ["--skip-recommend"] if args.skip_recommend else []
    command += ["--ann-sample", args.ann_sample, "--seed", str(args.seed), "--ann-batch", str(args.ann_batch)]
    for spec in args.ann_index or []:
        command += ["--ann-index", spec]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"ann run failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    n = args.n
    if r.get("skipped"):
        print(f"model {args.model}: {r['items']:,} items; N={n}, {args.threads} threads (recommend not measured)")
        _print_similar(args, r)
        print(f"  peak RSS {format_bytes(r['peak_rss'])}")
        return
    sample = "evenly spaced" if args.ann_sample == "even" else f"random (seed {args.seed})"
    print(f"model {args.model}: {r['items']:,} items; {r['users']:,} {sample} users, N={n}, liked items "
          f"filtered, {args.threads} threads, batches of {args.ann_batch} users; "
          + ("indexes: " + "; ".join(i["describe"] for i in r["indexes"]) if r["indexes"] else
             f"{args.ann_kind} index " + (f"(M={args.hnsw_m}, ef_construction={args.ef_construction}) "
                                          if args.ann_kind == "hnsw" else "")
             + ("reused" if r["build_seconds"] is None else f"built in {r['build_seconds']:.1f}s")))
    p50, p90, p99, top = r["norms"]
    mean, s90, smax = r["stop_share"]
    print(f"  catalogue: item norms median {p50:.3g}, p90 {p90:.3g}, p99 {p99:.3g}, max {top:.3g}; the exact scan "
          f"scores {mean:.2%} of the items per user before its bound stops it (p90 {s90:.2%}, max {smax:.2%})")
    print(f"  exact            {r['exact_users_per_s']:10,.0f} users/s  recall@{n} 1.0000  (items by norm, each user "
          f"stopped at its bound)")
    print(f"  exact, all items {r['brute_users_per_s']:10,.0f} users/s  recall@{n} 1.0000  (every item scored)")
    print(f"  exact scan alone {r['scan_users_per_s']:10,.0f} users/s  (queries and liked items in memory, as "
          f"'retrieval step alone' below)")
    print(f"  per user, outside scoring (both paths): liked items read {1e6 * r['liked_seconds_per_user']:.0f} us, "
          f"item ids mapped {1e6 * r['ids_seconds_per_user']:.0f} us")
    shown = None
    for row in r["settings"]:
        knob = row["knob"]
        if len(r["indexes"]) > 1 and row["index"] != shown:
            shown = row["index"]
            print(f"  index {shown}:")
        print(f"  {knob}={row['value']:<6d}  {row['users_per_s']:10,.0f} users/s  recall@{n} {row['recall']:.4f}  "
              f"{row['users_per_s'] / r['exact_users_per_s']:6.2f}x exact, "
              f"{row['users_per_s'] / r['brute_users_per_s']:6.1f}x all-items exact  (median of 3)")
        print(f"      retrieval step alone {row['retrieve_users_per_s']:10,.0f} users/s ({row['search_share']:.0%} in faiss; "
              f"{row['second_round']:.1%} searched again, {row['short']:.2%} answered exactly);  "
              f"faiss alone (k={2 * n}, raw vectors, one call) {row['faiss_alone_users_per_s']:10,.0f} users/s = "
              f"{row['faiss_alone_users_per_s'] / r['exact_users_per_s']:.2f}x exact, "
              f"{row['faiss_alone_users_per_s'] / r['scan_users_per_s']:.2f}x the exact scan alone")
    _print_similar(args, r)
    print(f"  peak RSS {format_bytes(r['peak_rss'])}")


def _print_similar(args, r: dict) -> None:
    """The similar_items lines of an --ann run."""
    n = args.n
    if "similar" not in r:
        return
    print(f"  similar_items (cosine; {r['similar_items']:,} evenly spaced items, batches of {args.ann_batch}): exact "
          f"{r['similar_exact_per_s']:,.0f} items/s (every item scored: no norm bound for cosine)")
    shown = None
    for row in r["similar"]:
        if row["index"] != shown:
            shown = row["index"]
            print("  index " + next(i["describe"] for i in r["similar_indexes"] if i["location"] == shown) + ":")
        print(f"  {row['knob']}={row['value']:<5d} candidates {row['candidates']:<4d} {row['per_s']:9,.0f} items/s  "
              f"recall@{n} {row['recall']:.4f}  {row['per_s'] / r['similar_exact_per_s']:6.1f}x exact (median of 3); "
              f"missed {row['missed']:,} of {n * r['similar_items']:,}, {row['near']:,} of them within 1e-4 of the "
              f"exact {n}th score; faiss alone (k={n}) {row['faiss_alone_per_s']:,.0f}/s")


def run_child(peer: str, args) -> dict:
    command = [sys.executable, __file__, "--child", peer, "--model", args.model, "--workdir", args.workdir,
               "--threads", str(args.threads), "-n", str(args.n), "--memory-budget", str(args.memory_budget),
               "--implicit-users", str(args.implicit_users)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{peer} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(a: dict, b: dict) -> tuple[float, int]:
    """Share of the checked users' (user, rank) slots where both list the same item, counting
    slots whose scores tie to float rounding as agreeing (either order is right there)."""
    def lists(run):
        out: dict = {}
        for user, item, score in zip(run["sample_users"], run["sample_items"], run["sample_scores"]):
            out.setdefault(user, []).append((item, score))
        return out

    la, lb = lists(a), lists(b)
    same = total = 0
    for user in set(la) | set(lb):
        xa, xb = la.get(user, []), lb.get(user, [])
        total += max(len(xa), len(xb))
        same += sum(ia == ib or abs(sa - sb) <= 1e-5 * max(1.0, abs(sa)) for (ia, sa), (ib, sb) in zip(xa, xb))
    return same / max(1, total), len(set(la) | set(lb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="interaction store (default: the 16M bench's, generated if missing)")
    parser.add_argument("--model", help="factor store (default: trained on --store if missing)")
    parser.add_argument("--workdir", default=DEFAULT_DIR, help="where the store and model are kept")
    parser.add_argument("--outdir", default=None, help="where outputs go (default: /work/data/serve or a temp dir)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the generated matrix relative to 16M nnz")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--memory-budget", default="4GB", help="wals-ooc's budget (implicit has none)")
    parser.add_argument("--implicit-users", type=int, default=36_000,
                        help="users implicit (and the brute-force check) recommend for, evenly spaced; "
                             "its users/s does not depend on how many")
    parser.add_argument("--ann", action="store_true",
                        help="instead: approximate (faiss index) against exact recommend on --model's catalogue")
    parser.add_argument("--ann-users", type=int, default=4000)
    parser.add_argument("--ann-kind", choices=["hnsw", "ivf"], default="hnsw")
    parser.add_argument("--ann-settings", default="64,128,256", help="ef_search (hnsw) or nprobe (ivf) values")
    parser.add_argument("--ann-reuse", action="store_true", help="use the index already built beside --model")
    parser.add_argument("--ann-similar", action="append", default=None, metavar="PATH[=V1,V2]",
                        help="also similar_items exact vs a cosine item index at this path (wals-ooc index MODEL "
                             "--metric cosine --output PATH) at these ef_search/nprobe values (default "
                             "--ann-settings); repeat for several")
    parser.add_argument("--similar-items", type=int, default=1000, help="evenly spaced items for --ann-similar")
    parser.add_argument("--similar-candidates", default="saved",
                        help="candidates re-scored per similar_items query, comma-separated: integers, or 'saved' "
                             "(the index's own setting)")
    parser.add_argument("--skip-recommend", action="store_true",
                        help="--ann: measure similar_items only (no recommend, no index over inner products)")
    parser.add_argument("--ann-index", action="append", default=None, metavar="PATH[=V1,V2]",
                        help="measure this index (built by `wals-ooc index MODEL --output PATH`) at these ef_search "
                             "(hnsw) or nprobe (ivf) values (default --ann-settings); repeat for several indexes")
    parser.add_argument("--ann-sample", choices=["even", "random"], default="even",
                        help="--ann-users evenly spaced, or drawn at random (--seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ann-batch", type=int, default=1000, help="users per model.recommend call (--ann)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--child", choices=["wals", "implicit", "ann"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = {"wals": child_wals, "implicit": child_implicit, "ann": child_ann}[args.child](args)
        print(json.dumps(result))
        return
    if args.ann:
        if not args.model:
            raise SystemExit("--ann needs --model (a model of a catalogue of >= 1M items)")
        args.workdir = args.outdir or ("/work/data/serve" if os.path.isdir("/work/data") else tempfile.mkdtemp())
        ann_main(args)
        return

    os.makedirs(args.workdir, exist_ok=True)
    if args.store is None:
        args.store = os.path.join(args.workdir, f"lastfm-shape-{args.scale:g}.zarr")
        ensure_store(args.store, args.scale)
    if args.model is None:
        args.model = os.path.join(args.workdir, f"{os.path.basename(args.store)[:-5]}-f{args.factors}-model.zarr")
        ensure_model(args.store, args.model, args.factors)
    outdir = args.outdir or ("/work/data/serve" if os.path.isdir("/work/data") else tempfile.mkdtemp())
    os.makedirs(outdir, exist_ok=True)
    args.workdir = outdir

    from wals_ooc.memory import format_bytes

    print(f"model {args.model}; N={args.n}, liked items filtered, {args.threads} threads, {args.repeats} repeats, "
          f"wals-ooc budget {args.memory_budget}", flush=True)
    runs: dict[str, list[dict]] = {"wals": [], "implicit": []}
    for repeat in range(args.repeats):
        for peer in ("wals", "implicit"):
            result = run_child(peer, args)
            runs[peer].append(result)
            print(f"  run {repeat + 1} {peer:8s} {result['users']:8,} users {result['seconds']:7.2f} s  {result['users'] / result['seconds']:10,.0f} users/s"
                  f"  peak RSS {format_bytes(result['peak_rss'])}", flush=True)
    summary = {}
    for peer, results in runs.items():
        summary[peer] = {
            "users_per_s": statistics.median(r["users"] / r["seconds"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss": max(r["peak_rss"] for r in results),
        }
    print(f"\nmedian of {args.repeats} runs (wals-ooc: all {runs['wals'][0]['users']:,} users written to Parquet; "
          f"implicit: {runs['implicit'][0]['users']:,} evenly spaced users, in memory)")
    for peer, row in summary.items():
        print(f"  {peer:8s} {row['seconds']:7.2f} s  {row['users_per_s']:10,.0f} users/s  peak RSS {format_bytes(row['peak_rss'])}")
    ratio = summary["wals"]["users_per_s"] / summary["implicit"]["users_per_s"]
    print(f"  ratio wals-ooc / implicit throughput: {ratio:.2f}x")
    brute = statistics.median(r["brute_users_per_s"] for r in runs["wals"])
    print(f"  wals-ooc with the norm bound off (every item scored; recommend() on implicit's users, {args.threads} threads): "
          f"{brute:,.0f} users/s, ratio to implicit {brute / summary['implicit']['users_per_s']:.2f}x")
    share, users = agreement(runs["wals"][0], runs["implicit"][0])
    print(f"  top-{args.n} lists equal to implicit's on {users} checked users: {share:.4f} of slots")


if __name__ == "__main__":
    main()
