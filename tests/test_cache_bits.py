"""A kernel compiled in the running process and the same kernel loaded from numba's on-disk cache
give the same bits (README, Reproducibility): CG's path for a row longer than the gather block
(``_cg_row``, fastmath's reassoc) once rounded differently in the two cases."""

from __future__ import annotations

import json

from tests.conftest import run_python

# A small training in the kernels alone (compiling the whole pipeline would take a minute): a
# user x item matrix whose item 0 holds every user (20,000 entries, over GATHER_MAX_ENTRIES, so
# the item half-sweep solves it by ``_cg_row``) and some short rows of both kinds (the grouped,
# gathered path), three iterations of CG half-sweeps at f = 8, float32 as training runs them.
TRAINING = r"""
import hashlib, json
import numpy as np
from wals_ooc.kernels.solve import GATHER_MAX_ENTRIES, cg_solve_rows

def csr(rows, cols, vals, n):
    order = np.lexsort((cols, rows))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols[order].astype(np.int32), vals[order].astype(np.float32)

rng = np.random.default_rng(7)
n_users, n_items, f = 20_000, 300, 8
users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, 30_000)])
items = np.concatenate([np.zeros(n_users, np.int64), rng.integers(1, n_items, 30_000)])
pairs = np.unique(users * n_items + items)
users, items = pairs // n_items, pairs % n_items
values = rng.integers(1, 5, len(pairs)).astype(np.float32)
by_user, by_item = csr(users, items, values, n_users), csr(items, users, values, n_items)
assert np.diff(by_item[0]).max() > GATHER_MAX_ENTRIES
X = (rng.standard_normal((n_users, f)) * 0.1).astype(np.float32)
Y = (rng.standard_normal((n_items, f)) * 0.1).astype(np.float32)
t = np.float32
losses = []
for _ in range(3):
    for (indptr, indices, vals), fixed, solved in ((by_user, Y, X), (by_item, X, Y)):
        gram = (fixed.T @ fixed).astype(np.float32)
        losses.append(cg_solve_rows(indptr, indices, vals, fixed, gram, solved, 0, t(2.0), t(1.0), t(1.0), 0.05, 0.0,
                                    len(fixed), 3, True))
stats = cg_solve_rows.stats
# the solve's callees with fastmath arithmetic are inlined, not weak copies that the JIT may bind
# to another compilation of the callee (only the process that compiled the kernel has its IR)
weak = [] if stats.cache_hits else [line for line in cg_solve_rows.inspect_llvm(cg_solve_rows.signatures[0]).splitlines()
                                    if line.startswith("define linkonce_odr") and ("5solve4_dot" in line or "_cg_row" in line
                                                                                   or "5solve5_symv" in line)]
print(json.dumps({"X": hashlib.sha256(X.tobytes()).hexdigest(), "Y": hashlib.sha256(Y.tobytes()).hexdigest(),
                  "long_row": Y[0].tolist(), "losses": losses, "finite": bool(np.isfinite(X).all() and np.isfinite(Y).all()),
                  "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()), "weak": weak}))
"""


def _train(cache_dir: str) -> dict:
    done = run_python(TRAINING, env={"NUMBA_CACHE_DIR": cache_dir})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cold_and_a_warm_numba_cache_give_the_same_factors_bit_for_bit(tmp_path):
    cache_dir = str(tmp_path / "numba-cache")  # fresh and empty: the first run compiles
    cold = _train(cache_dir)
    warm = _train(cache_dir)
    # the first run compiled the kernel in its process, the second loaded it from the cache
    assert cold["misses"] >= 1 and cold["hits"] == 0, cold
    assert warm["hits"] >= 1 and warm["misses"] == 0, warm
    assert cold["weak"] == [], cold["weak"]
    assert cold["finite"] and any(v != 0.0 for v in cold["long_row"])
    assert (warm["X"], warm["Y"]) == (cold["X"], cold["Y"]), (cold["long_row"], warm["long_row"])
    assert warm["losses"] == cold["losses"]


# ... then three more iterations in the eigenbasis of the fixed side's Gram, as training runs them by
# default (``fixed_side.Eigenbasis``: the kernel's ``diagonal`` path, another compilation)
EIGENBASIS_HALF_SWEEPS = r"""
from wals_ooc.train.fixed_side import Eigenbasis
for _ in range(3):
    for (indptr, indices, vals), fixed, solved in ((by_user, Y, X), (by_item, X, Y)):
        basis = Eigenbasis((fixed.T @ fixed).astype(np.float32))
        rotated, rows = basis.rotated(fixed).copy(), basis.rotate_in(solved)
        losses.append(cg_solve_rows(indptr, indices, vals, rotated, basis.diagonal, rows, 0, t(2.0), t(1.0), t(1.0), 0.05,
                                    0.0, len(fixed), 4, 2, True, GATHER_MAX_ENTRIES, True))
        basis.rotate_out(rows, solved)
"""

# The same training by iALS++ (f = 16, blocks of 4, 2 sweeps: the kept block factors and the long
# row's chunked path). Its fastmath callees are still weak copies in the kernel; this checks that
# a cold and a warm cache agree for it all the same (README, Reproducibility).
IALSPP_TRAINING = (TRAINING
                   .replace("from wals_ooc.kernels.solve import GATHER_MAX_ENTRIES, cg_solve_rows",
                            "from wals_ooc.kernels.solve import GATHER_MAX_ENTRIES\n"
                            "from wals_ooc.kernels.subspace import subspace_solve_rows as cg_solve_rows")
                   .replace("n_users, n_items, f = 20_000, 300, 8", "n_users, n_items, f = 20_000, 300, 16")
                   .replace("len(fixed), 3, True))", "len(fixed), 4, 2, True))")
                   .replace("weak = [] if stats.cache_hits else", "weak = [] if True else")
                   .replace("stats = cg_solve_rows.stats", EIGENBASIS_HALF_SWEEPS + "stats = cg_solve_rows.stats"))


def test_ialspp_gives_the_same_factors_from_a_cold_and_a_warm_cache(tmp_path):
    assert IALSPP_TRAINING.count("subspace_solve_rows") == 1 and "4, 2, True))" in IALSPP_TRAINING
    assert "GATHER_MAX_ENTRIES, True))" in IALSPP_TRAINING  # the eigenbasis's half-sweeps too
    cache_dir = str(tmp_path / "numba-cache")
    done = [run_python(IALSPP_TRAINING, env={"NUMBA_CACHE_DIR": cache_dir}) for _ in range(2)]
    assert all(d.returncode == 0 for d in done), [d.stderr[-2000:] for d in done]
    cold, warm = (json.loads(d.stdout.strip().splitlines()[-1]) for d in done)
    assert cold["misses"] >= 1 and cold["hits"] == 0, cold
    assert warm["hits"] >= 1 and warm["misses"] == 0, warm
    assert cold["finite"] and any(v != 0.0 for v in cold["long_row"])
    assert (warm["X"], warm["Y"]) == (cold["X"], cold["Y"]), (cold["long_row"], warm["long_row"])
    assert warm["losses"] == cold["losses"]
