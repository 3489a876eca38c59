"""Factors with their original ids, for the systems people serve from, written out of core.

- ``parquet``: a directory ``users.parquet`` and ``items.parquet``, columns ``id`` (and ``name``
  when the model has display names) and ``factors`` (fixed-size list of float32), one row group
  per row block of the factor store: read it with pyarrow/pandas/DuckDB/Spark, or stream it
  into a vector database batch by batch;
- ``npz``: one ``.npz`` (``user_ids``, ``item_ids``, ``user_factors``, ``item_factors``);
- ``implicit``: the ``.npz`` that ``implicit.als.AlternatingLeastSquares.load`` reads (its
  ``save`` format: factors and settings), with ``user_ids``/``item_ids`` beside them.

The ``.npz`` files are written entry by entry, each array's header first and then its rows
block by block, so no factor matrix is ever in memory whole. Every output goes through the
lifecycle door (built beside, swapped in when complete; an existing one replaced only with
``overwrite``).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SettingError
from ..store.lifecycle import output_file, output_store
from ..train.factors import FactorStore
from .ids import id_kind, ids_of_range, ids_of_range_arrow, model_ids, names_of_range

FORMATS = ("parquet", "npz", "implicit")
EXPORT_KIND = "wals-ooc/factors-parquet"
EXPORT_FORMAT_VERSION = 1
SIDES = ("user", "item")


def export_factors(model: FactorStore, output: str, fmt: str = "parquet", overwrite: bool = False) -> str:
    """Write ``model``'s (a ``FactorStore``) current factors with original ids to ``output``."""
    if fmt not in FORMATS:
        raise SettingError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", flags={"format": "--format"})
    output = os.fspath(output)
    if fmt == "parquet":
        with output_store(output, EXPORT_KIND, version=EXPORT_FORMAT_VERSION, overwrite=overwrite,
                          inputs=[model.location], layout="files") as out:
            for side in SIDES:
                _write_parquet(model, side, os.path.join(out.location, f"{side}s.parquet"))
        return output
    if not output.endswith(".npz"):
        raise SettingError(f"{output}: an {fmt} export is a .npz file; name it NAME.npz")
    with output_file(output, overwrite=overwrite, inputs=[model.location], owned=is_npz_export,
                     what="a factors .npz written by wals-ooc export") as temp:
        with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            maps = model_ids(model)
            for side in SIDES:
                _write_npy(archive, f"{side}_ids", _id_blocks(maps, side), *_id_layout(maps, side))
                array = model.current(side)
                _write_npy(archive, f"{side}_factors", _factor_blocks(array), tuple(array.shape), np.dtype(array.dtype))
            if fmt == "implicit":
                for key, value in _implicit_settings(model).items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as handle:
                        np.lib.format.write_array(handle, np.asarray(value), allow_pickle=False)
    return output


def is_npz_export(path: str) -> bool:
    """Whether ``path`` is a .npz this module writes (npz or implicit): a zip holding the ids
    and factors of both sides (what ``--overwrite`` may replace; any other file is the user's)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    return {f"{side}_{what}.npy" for side in SIDES for what in ("ids", "factors")} <= names


def _write_parquet(model, side: str, path: str) -> None:
    maps = model_ids(model)
    array = model.current(side)
    factors = int(array.shape[1])
    writer = None
    try:
        for lo, block in _factor_blocks(array, with_start=True):
            hi = lo + len(block)
            columns = {"id": ids_of_range_arrow(maps, side, lo, hi)}
            names = names_of_range(maps, side, lo, hi)
            if names is not None:
                columns["name"] = names
            flat = pa.array(np.ascontiguousarray(block, dtype=np.float32).ravel())
            columns["factors"] = pa.FixedSizeListArray.from_arrays(flat, factors)
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=len(block))
        if writer is None:  # no rows
            pq.write_table(pa.table({"id": pa.array([], pa.int64()),
                                     "factors": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), factors)}),
                           path)
    finally:
        if writer is not None:
            writer.close()


def _factor_blocks(array, with_start: bool = False):
    step = int(array.chunks[0])
    for lo in range(0, int(array.shape[0]), step):
        block = np.asarray(array[lo: lo + step])
        yield (lo, block) if with_start else block


def _id_layout(maps, side: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a side's ids in a .npy: int64, or fixed-width unicode as long as the
    longest id (one pass over the map, block by block)."""
    n = int(maps.n_users if side == "user" else maps.n_items)
    if id_kind(maps, side) == "int":
        return (n,), np.dtype(np.int64)
    longest = 1
    for lo in range(0, n, 1 << 20):
        block = ids_of_range(maps, side, lo, min(n, lo + (1 << 20)))
        if len(block):
            longest = max(longest, max(len(str(i)) for i in block))
    return (n,), np.dtype(f"<U{longest}")


def _id_blocks(maps, side: str):
    n = int(maps.n_users if side == "user" else maps.n_items)
    for lo in range(0, n, 1 << 20):
        yield ids_of_range(maps, side, lo, min(n, lo + (1 << 20)))


def _write_npy(archive: zipfile.ZipFile, name: str, blocks, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """One ``.npy`` entry of ``shape`` and ``dtype``: the header, then each block's bytes."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(handle, header)
        for block in blocks:
            handle.write(np.ascontiguousarray(np.asarray(block).astype(dtype, copy=False)).tobytes())


def _implicit_settings(model) -> dict:
    cfg = model.config
    return {"regularization": float(cfg.regularization), "factors": int(cfg.factors), "iterations": int(cfg.iterations),
            "use_cg": cfg.solver == "cg", "cg_steps": int(cfg.cg_steps), "calculate_training_loss": False,
            "dtype": np.dtype(model.current("item").dtype).name, "alpha": float(cfg.alpha), "num_threads": 0}
