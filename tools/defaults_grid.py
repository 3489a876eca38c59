"""Measure candidate default settings across data sets: which defaults do well everywhere.

For each data set, a validation split is carved from its training split (the test split of
tools/quality_real.py is never looked at), and every candidate trains with f=64, 15 iterations,
seed 0; the table gives validation ndcg@10 and, per data set, the ratio to the best candidate.
The defaults to pick are those with the best worst-case ratio.

    python tools/defaults_grid.py                    # Last.fm, MovieLens 100K, synthetic
    python tools/defaults_grid.py --datasets synthetic --candidates "log,1,0.01,1,0" "linear,1,0.01,1,0"

A candidate is "confidence,alpha,regularization,alpha0,nu".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quality_real import carve_validation, prepare  # noqa: E402

CANDIDATES = [
    "linear,1,0.01,1,0",  # the defaults before issue 13 (implicit's, Hu et al.'s form)
    "log,0.3,0.01,1,0", "log,1,0.01,1,0", "log,3,0.01,1,0",
    "log,1,0.1,1,0", "log,1,1,1,0", "log,3,1,1,0", "log,1,10,1,0",
    "log,1,0.001,1,0.5", "log,1,0.0001,1,1",
]


def synthetic(workdir: str):
    import wals_ooc
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    full = os.path.join(workdir, "synthetic.zarr")
    train, test = os.path.join(workdir, "synthetic-train.zarr"), os.path.join(workdir, "synthetic-test.zarr")
    if not all(os.path.exists(os.path.join(p, "zarr.json")) for p in (full, train, test)):
        write_synthetic_store(SyntheticSpec(n_users=20_000, n_items=5_000, rows=600_000, clusters=30, seed=7), full,
                              progress=False, overwrite=True)
        wals_ooc.split(full, train, test, test_fraction=0.2, seed=1, overwrite=True, progress=False)
    return train, test, "random"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=("lastfm", "ml100k", "synthetic"),
                        default=["lastfm", "ml100k", "synthetic"])
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wals-quality-real"))
    args = parser.parse_args()

    import wals_ooc
    from wals_ooc.evaluate.metrics import evaluate

    os.makedirs(args.workdir, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    for name in args.datasets:
        train, _, method = synthetic(args.workdir) if name == "synthetic" else prepare(name, args.workdir)
        part, validation = carve_validation(train, method, 0, args.workdir, name)
        scores[name] = {}
        for candidate in args.candidates:
            confidence, alpha, reg, alpha0, nu = candidate.split(",")
            model = wals_ooc.WALS(factors=64, iterations=15, confidence=confidence, alpha=float(alpha),
                                  regularization=float(reg), alpha0=float(alpha0), nu=float(nu), random_state=0,
                                  threads=2)
            started = time.perf_counter()
            model.fit(part, os.path.join(args.workdir, "defaults-grid.zarr"), resume=False, progress=False)
            metrics = evaluate(model.factors_store, model.interactions, wals_ooc.open_store(validation), k=10,
                               threads=2, auc=False)
            scores[name][candidate] = metrics["ndcg@10"]
            print(f"{name} {candidate}: ndcg@10 {scores[name][candidate]:.4f} ({time.perf_counter() - started:.1f}s)",
                  file=sys.stderr, flush=True)
    best = {name: max(values.values()) for name, values in scores.items()}
    print("validation ndcg@10 (ratio to the best candidate of the data set); candidate = confidence,alpha,reg,alpha0,nu")
    print(f"  {'candidate':22s}" + "".join(f"{name:>20s}" for name in scores) + f"{'worst ratio':>14s}")
    rows = []
    for candidate in args.candidates:
        ratios = [scores[name][candidate] / best[name] for name in scores]
        rows.append((min(ratios), candidate))
        cells = "".join(f"{scores[name][candidate]:11.4f} ({scores[name][candidate] / best[name]:.3f})" for name in scores)
        print(f"  {candidate:22s}{cells}{min(ratios):14.3f}")
    worst, pick = max(rows)
    print(f"best worst-case: {pick} (worst ratio {worst:.3f})")


if __name__ == "__main__":
    main()
