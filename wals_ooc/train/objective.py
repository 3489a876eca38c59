"""The full training objective of any pair of factor matrices, streamed over user shards.

Used to score factors that did not come from our trainer (``implicit``'s, in the benchmark) and
to check the loss the trainer reports. X and Y may be Zarr arrays or NumPy arrays; only one user
shard's rows of X and the item rows that shard touches are read at a time.
"""

from __future__ import annotations

import numpy as np

from ..config import WALSConfig
from ..kernels.loss import observed_loss_block, regularization_sum
from ..kernels.solve import CONFIDENCE_KINDS
from ..store.reader import InteractionStore

GRAM_ROWS = 65536  # rows of Y per Gram block


def streamed_gram(Y) -> np.ndarray:
    """Y^T Y in float64, reading ``GRAM_ROWS`` rows at a time."""
    f = Y.shape[1]
    gram = np.zeros((f, f))
    for lo in range(0, Y.shape[0], GRAM_ROWS):
        block = np.asarray(Y[lo: lo + GRAM_ROWS], dtype=np.float64)
        gram += block.T @ block
    return gram


def _item_regularization(store: InteractionStore, Y, config: WALSConfig) -> float:
    total = 0.0
    for lo, hi in store.shard_ranges("item"):
        shard = store.rows("item", lo, hi)
        block = np.asarray(Y[lo:hi], dtype=np.float64)
        total += regularization_sum(shard.indptr, block, config.regularization, config.nu, config.alpha0, store.n_users)
    return total


def objective(store: InteractionStore, X, Y, config: WALSConfig) -> float:
    """sum_{u,i} c_ui (p_ui - x_u.y_i)^2 + sum_u reg_u |x_u|^2 + sum_i reg_i |y_i|^2 (float64)."""
    gram = config.alpha0 * streamed_gram(Y)
    kind = CONFIDENCE_KINDS[config.confidence]
    total = 0.0
    for lo, hi in store.shard_ranges("user"):
        shard = store.rows("user", lo, hi)
        block = np.asarray(X[lo:hi], dtype=np.float64)
        total += float(np.einsum("ij,ij->", block @ gram, block))
        total += regularization_sum(shard.indptr, block, config.regularization, config.nu, config.alpha0, store.n_items)
        if not len(shard.indices):
            continue
        touched, local = np.unique(shard.indices, return_inverse=True)
        Y_touched = np.asarray(Y[touched] if isinstance(Y, np.ndarray) else Y.get_orthogonal_selection((touched, slice(None))),
                               dtype=np.float64)
        cursor = shard.indptr[:-1].copy()
        total += observed_loss_block(shard.indptr, local.astype(np.int64), shard.values.astype(np.float64), cursor,
                                     0, len(touched), Y_touched, block, kind, config.alpha, config.alpha0, config.eps)
    return total + _item_regularization(store, Y, config)
