"""Ranking quality of wals-ooc against implicit's ALS on the same train/test split.

Both models get the same factors, regularization, confidence (Hu et al.: c = 1 + alpha * r),
solver, iterations and seed. Both are scored by implicit's own evaluator
(``implicit.evaluation.ranking_metrics_at_k``) on the same matrices, and wals-ooc also by its
streamed evaluator, so the comparison does not depend on our metric code.

    python tools/quality_vs_implicit.py                        # generated clustered data
    python tools/quality_vs_implicit.py --store plays.zarr     # any interaction store
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import scipy.sparse as sp


def to_csr(store, rows_of=None, cols_of=None, shape=None):
    """A (small enough) store as scipy CSR, optionally re-indexed into another store's ids."""
    shard = store.rows("user", 0, store.n_users)
    rows = np.repeat(np.arange(store.n_users), np.diff(shard.indptr))
    cols = shard.indices.astype(np.int64)
    if rows_of is not None:
        rows, cols = rows_of[rows], cols_of[cols]
        keep = (rows >= 0) & (cols >= 0)
        rows, cols, values = rows[keep], cols[keep], shard.values[keep]
    else:
        values = shard.values
    return sp.csr_matrix((values, (rows, cols)), shape=shape or store.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wals-quality"))
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--regularization", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--solver", choices=["cg", "cholesky"], default="cg")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()

    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.evaluation import ranking_metrics_at_k
    from threadpoolctl import threadpool_limits

    import wals_ooc
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    os.makedirs(args.workdir, exist_ok=True)
    if args.store is None:
        args.store = os.path.join(args.workdir, "clustered.zarr")
        if not os.path.exists(os.path.join(args.store, "zarr.json")):
            write_synthetic_store(SyntheticSpec(n_users=30_000, n_items=8_000, rows=1_500_000, clusters=40, seed=3),
                                  args.store, progress=False, overwrite=True)
    train_path, test_path = (os.path.join(args.workdir, name) for name in ("train.zarr", "test.zarr"))
    wals_ooc.split(args.store, train_path, test_path, test_fraction=0.2, seed=1, overwrite=True, progress=False)
    train, test = wals_ooc.open_store(train_path), wals_ooc.open_store(test_path)

    ours = wals_ooc.WALS(factors=args.factors, iterations=args.iterations, regularization=args.regularization,
                         alpha=args.alpha, solver=args.solver, random_state=0, threads=args.threads)
    ours.fit(train, os.path.join(args.workdir, "model.zarr"), resume=False, progress=False)

    train_csr = to_csr(train)
    test_csr = to_csr(test, train.index_of("user", test.ids_of("user", np.arange(test.n_users), as_arrow=True), missing="mark"),
                      train.index_of("item", test.ids_of("item", np.arange(test.n_items), as_arrow=True), missing="mark"),
                      train.shape)
    theirs = AlternatingLeastSquares(factors=args.factors, regularization=args.regularization, alpha=1.0,
                                     iterations=args.iterations, use_cg=args.solver == "cg", num_threads=args.threads,
                                     random_state=0, calculate_training_loss=False)
    confidence = train_csr.copy()
    confidence.data = 1 + args.alpha * confidence.data
    with threadpool_limits(1, "blas"):
        theirs.fit(confidence, show_progress=False)
        scored = {
            "wals-ooc": ranking_metrics_at_k(ours.to_implicit(), train_csr, test_csr, K=args.k, show_progress=False),
            "implicit": ranking_metrics_at_k(theirs, train_csr, test_csr, K=args.k, show_progress=False),
        }
    print(f"{train.shape[0]:,} users x {train.shape[1]:,} items, train nnz {train.nnz:,}, test nnz {test_csr.nnz:,}; "
          f"f={args.factors}, {args.iterations} iterations, {args.solver}, reg {args.regularization}, alpha {args.alpha}")
    print(f"implicit's evaluator, K={args.k}:")
    for name, metrics in scored.items():
        print(f"  {name:9s} " + "  ".join(f"{m} {metrics[m]:.4f}" for m in ("precision", "ndcg", "map", "auc")))
    for m in ("precision", "ndcg", "map", "auc"):
        print(f"  ratio wals-ooc / implicit {m}: {scored['wals-ooc'][m] / scored['implicit'][m]:.4f}")
    print(f"wals-ooc's streamed evaluator: {ours.evaluate(test, k=args.k)}")


if __name__ == "__main__":
    main()
