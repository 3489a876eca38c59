"""Diagnosis, not a protocol: the best test ndcg@10 each library's model family can reach at all.

Both searches are scored directly on the test split (train -> test), so the figure is an upper
bound that no honest search (tuned on a validation split) can beat: if the two ceilings are
within x% of each other, tuned/tuned cannot genuinely exceed (1 + x%) on that data, whatever the
search does. Each point is the mean over two initial factors (random_state 0 and 1), no pruning,
Optuna's TPE (seeded, multivariate, 15 random start-up trials), the same number of trials for both.

  wals-ooc  weight, reg (the data-scaled alpha and regularization of wals_ooc.tuning.space), alpha0,
            nu in [0, 1.5], confidence (on non-binary data), factors [16, 256], iterations [5, 30]
  implicit  weight (alpha = weight / mean value), regularization, factors [16, 256], iterations [5, 30]

weight is log-uniform in [0.05, 300], reg / regularization in [1e-5, 1e3] for both.

    python tools/quality_ceiling.py --datasets ml100k --trials 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_real as qr  # noqa: E402  (the same data, splits and evaluator)

INITS = (0, 1)


def ceiling(lib: str, train: str, test: str, trials: int, seed: int, scratch: str) -> tuple[float, dict]:
    import optuna
    from threadpoolctl import threadpool_limits

    import wals_ooc
    from wals_ooc.config import WALSConfig
    from wals_ooc.tuning.space import SearchSpace, data_summary

    train_store, test_store = wals_ooc.open_store(train), wals_ooc.open_store(test)
    user_items = qr.to_csr(train_store)
    mean_value = float(user_items.data.mean())
    data = data_summary(train_store)
    space = SearchSpace(weight=(0.05, 300.0), reg=(1e-5, 1e3), nu=(0.0, 1.5), factors=(16, 256),
                        iterations=(5, 30)).for_data(data)

    def wals_score(trial) -> tuple[float, dict]:
        settings = space.settings(space.suggest(trial), data, WALSConfig())
        scores = []
        for init in INITS:
            model = wals_ooc.WALS(**settings, random_state=init, threads=2, compute_loss=False)
            model.fit(train_store, os.path.join(scratch, "wals.zarr"), resume=False, progress=False)
            scores.append(qr.score(model.factors_store, train_store, test_store)["ndcg"])
        return float(np.mean(scores)), settings

    def implicit_score(trial) -> tuple[float, dict]:
        settings = {"alpha": trial.suggest_float("weight", 0.05, 300.0, log=True) / mean_value,
                    "regularization": trial.suggest_float("reg", 1e-5, 1e3, log=True),
                    "factors": trial.suggest_int("factors", 16, 256, log=True),
                    "iterations": trial.suggest_int("iterations", 5, 30)}
        scores = []
        for init in INITS:
            model = qr.implicit_model(settings, init)
            model.iterations = settings["iterations"]
            with threadpool_limits(1, "blas"):
                model.fit(user_items, show_progress=False)
            store = qr.factor_store(os.path.join(scratch, "implicit.zarr"), model.user_factors, model.item_factors,
                                    train_store, settings)
            scores.append(qr.score(store, train_store, test_store)["ndcg"])
        return float(np.mean(scores)), settings

    def objective(trial) -> float:
        value, settings = (wals_score if lib == "wals" else implicit_score)(trial)
        trial.set_user_attr("settings", settings)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=15))
    study.optimize(objective, n_trials=trials)
    return study.best_value, study.best_trial.user_attrs["settings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=("lastfm", "ml100k"), default=["ml100k"])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wals-quality-real"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    for name in args.datasets:
        train, test, _ = qr.prepare(name, args.workdir)
        scratch = tempfile.mkdtemp(prefix=f"{name}-ceiling-", dir=args.workdir)
        best = {lib: ceiling(lib, train, test, args.trials, args.seed, scratch) for lib in ("wals", "implicit")}
        print(f"\n{name}: best test ndcg@{qr.K} found by {args.trials} TPE trials scored on the test split "
              f"(mean of {len(INITS)} initial factors)")
        for lib, (value, settings) in best.items():
            print(f"  {lib:9s} {value:.4f}  {json.dumps(qr._rounded(settings))}")
        print(f"  ceiling ratio wals-ooc / implicit: {best['wals'][0] / best['implicit'][0]:.3f}x")
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
