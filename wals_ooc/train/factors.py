"""The factor store: user and item factors in Zarr, double-buffered, with the checkpoint state.

Layout::

    MODEL/                  attrs: kind, format_version, config, interactions, n_users, n_items,
                                   row_block, checkpoint {step, slots, pending_user_reg},
                                   loss_history, complete
      user/0, user/1        (n_users, f) factor slots; checkpoint.slots["user"] is the current one
      user/gram             (2, f, f) float64: Y^T Y of each slot, for the other side's solves
      item/0, item/1, item/gram
      ids/                  a copy of the interaction store's id maps (``ID_NODES``), so that
                            serving what needs no interactions (scoring without filtering,
                            similar items, fold-in) works without them

``interactions`` binds the model to its data by identity: the store's ``store_id`` (and its
absolute location, shape and nnz). Serving checks it and refuses another store.
``complete`` is True once ``config.iterations`` iterations are done; before that the model is
"trained N of M iterations" (``FactorStore.status``), and serving it warns.

A half-sweep reads the current slot of the fixed side (and of its own side, for CG's warm start)
and writes the *other* slot of its side. Only when every shard has been written does one
atomic attribute update make that slot current and advance ``step`` (two per iteration: users,
then items). A crash mid-half-sweep leaves the current slots untouched, so the resumed run
redoes that half-sweep from the same inputs and ends equal to an uninterrupted run.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..config import WALSConfig
from ..errors import DataMismatchError, StoreError
from ..store.chunk_files import write_rows
from ..store.format import (
    DENSE_ATTR,
    ID_NODES,
    KIND_PREFIX,
    Mode,
    array,
    as_dict,
    as_int,
    as_list,
    create_array,
    is_local,
    local_path,
    open_group,
    read,
    subgroup,
)
from ..store.reader import IdMaps, InteractionStore

MODEL_KIND = "wals-ooc/model"
# 2: checksums, id maps copied in, bound to the interaction store by store_id and absolute location;
# 3: the id maps copied in are those of interaction format 3 (keys + bytes, see store.ids)
MODEL_FORMAT_VERSION = 3
SIDE_ORDER = ("user", "item")


def default_model_location(interactions_location: str) -> str:
    """``plays.zarr`` -> ``plays-model.zarr`` beside it."""
    base = interactions_location.rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + "-model.zarr"


def absolute_location(location: str) -> str:
    """A location that means the same from any working directory (absolute path, or the URL)."""
    return local_path(location) if is_local(location) else location


def interactions_identity(store: InteractionStore) -> dict[str, Any]:
    """What identifies the data a model was trained on (a resume and serving must see the same)."""
    return {
        "location": absolute_location(store.location),
        "store_id": store.attrs().get("store_id"),
        "n_users": store.n_users,
        "n_items": store.n_items,
        "nnz": store.nnz,
        "id_kinds": store.id_kinds,
    }


def copy_id_maps(source: zarr.Group, target: zarr.Group, names: tuple[str, ...] = ID_NODES) -> None:
    """Copy the id map nodes (``ID_NODES``: arrays and groups) one chunk at a time."""
    for name in names:
        if name in source:
            _copy_node(source[name], target, name)


def _copy_node(node, target: zarr.Group, name: str) -> None:
    if isinstance(node, zarr.Group):
        group = target.create_group(name)
        group.attrs.update(dict(node.attrs))
        for child, member in node.members():
            _copy_node(member, group, child)
        return
    compressors = [c for c in node.compressors if type(c).__name__ != "Crc32cCodec"]
    attrs = dict(node.attrs)
    array = create_array(target, name, shape=node.shape, dtype=node.dtype, chunks=node.chunks,
                         compressors=compressors or None, fill_value=node.fill_value,
                         dense=bool(attrs.pop(DENSE_ATTR, False)))
    array.attrs.update(attrs)
    if not node.ndim or not node.shape[0]:
        if node.ndim == 0:
            array[()] = node[()]
        return
    step = node.chunks[0]
    for lo in range(0, node.shape[0], step):
        array[lo : lo + step] = node[lo : lo + step]


@dataclass
class Checkpoint:
    """Completed half-sweeps (``step``; users at even steps, items at odd) and the current slots."""

    step: int
    slots: dict[str, int]
    pending_user_reg: float = 0.0

    @property
    def iteration(self) -> int:
        return self.step // 2

    def to_dict(self) -> dict:
        return {"step": self.step, "slots": dict(self.slots), "pending_user_reg": self.pending_user_reg}

    @classmethod
    def from_dict(cls, data: dict) -> Checkpoint:
        return cls(int(data["step"]), {k: int(v) for k, v in data["slots"].items()}, float(data.get("pending_user_reg", 0.0)))


class FactorStore:
    """A model's factor store on disk (local path or fsspec URL)."""

    def __init__(self, location: str | os.PathLike, group: zarr.Group, storage_options: dict | None = None):
        self.location = os.fspath(location)
        self.group = group
        self.storage_options = storage_options
        self._grams: dict[str, zarr.Array] = {}  # each side's Gram array, opened once

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        group: zarr.Group,
        location: str,
        config: WALSConfig,
        interactions: InteractionStore,
        seed: int,
        storage_options: dict | None = None,
    ) -> FactorStore:
        """Lay out a new model in an empty group (made by ``store.lifecycle``): factor slots,
        Grams, a copy of the id maps and the attributes; no factors yet (checkpoint None)."""
        shapes = {"user": interactions.n_users, "item": interactions.n_items}
        for side in SIDE_ORDER:
            side_group = group.create_group(side)
            for slot in (0, 1):
                create_array(
                    side_group,
                    str(slot),
                    shape=(shapes[side], config.factors),
                    dtype=config.np_dtype,
                    chunks=(interactions.row_block, config.factors),
                    fill_value=0,
                )
            create_array(
                side_group, "gram", shape=(2, config.factors, config.factors), dtype=np.float64,
                chunks=(1, config.factors, config.factors), fill_value=0,
            )
        ids = group.create_group("ids")
        copy_id_maps(interactions.group, ids)
        group.attrs.update(
            {
                "kind": MODEL_KIND,
                "format_version": MODEL_FORMAT_VERSION,
                "config": config.to_dict(),
                "seed": int(seed),
                "model_id": uuid.uuid4().hex,  # tells apart models written at the same path in turn
                "interactions": interactions_identity(interactions),
                "n_users": interactions.n_users,
                "n_items": interactions.n_items,
                "row_block": interactions.row_block,
                "checkpoint": None,  # set once the initial factors are written
                "loss_history": [],
                "complete": False,
            }
        )
        return cls(location, group, storage_options)

    @classmethod
    def open(cls, location: str | os.PathLike, mode: Mode = "r", storage_options: dict | None = None) -> FactorStore:
        """Open a model store of this format version (finished or not); ``StoreError`` otherwise."""
        group = open_group(location, mode, storage_options)
        kind = group.attrs.get("kind")
        if kind != MODEL_KIND:
            what = f"a {kind} store" if isinstance(kind, str) and kind.startswith(KIND_PREFIX) else "not a wals-ooc store"
            raise StoreError(f"{location} is {what}, not a model store")
        version = group.attrs.get("format_version")
        if version != MODEL_FORMAT_VERSION:
            raise StoreError(f"{location} is a model of format version {version}, this wals-ooc reads version "
                             f"{MODEL_FORMAT_VERSION}: train it again (train --no-resume)",
                             flags={"resume=False": "--no-resume"})
        return cls(location, group, storage_options)

    @classmethod
    def exists(cls, location: str, storage_options: dict | None = None) -> bool:
        try:
            cls.open(location, "r", storage_options)
            return True
        except (StoreError, FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return False

    # -- state ----------------------------------------------------------------------------------
    @property
    def config(self) -> WALSConfig:
        return WALSConfig.from_dict(as_dict(self.group.attrs["config"]))

    @property
    def seed(self) -> int:
        return as_int(self.group.attrs["seed"])

    @property
    def checkpoint(self) -> Checkpoint | None:
        data = self.group.attrs.get("checkpoint")
        return None if data is None else Checkpoint.from_dict(as_dict(data))

    @property
    def loss_history(self) -> list[dict]:
        return [as_dict(entry) for entry in as_list(self.group.attrs.get("loss_history", []))]

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    @property
    def iterations_done(self) -> int:
        """Iterations completed (both half-sweeps committed)."""
        checkpoint = self.checkpoint
        return 0 if checkpoint is None else checkpoint.iteration

    def status(self) -> str:
        """"trained N of M iterations" (and whether training is complete)."""
        done, wanted = self.iterations_done, self.config.iterations
        if self.complete:
            return f"trained {done} of {wanted} iterations (complete)"
        return f"trained {done} of {wanted} iterations (incomplete: its training stopped; run train again to finish it)"

    @property
    def binding(self) -> dict:
        """The identity of the interaction store the model was trained on."""
        found = self.group.attrs.get("interactions")
        return dict(as_dict(found)) if found else {}

    def id_maps(self) -> IdMaps:
        """The model's copy of the id maps (original ids of its users and items)."""
        return IdMaps(subgroup(self.group, "ids"), self.location, as_int(self.group.attrs["n_users"]),
                      as_int(self.group.attrs["n_items"]))

    def commit(self, checkpoint: Checkpoint, loss_history: list[dict] | None = None, **extra) -> None:
        """Record a finished half-sweep: one atomic write of the group's attributes."""
        update: dict[str, Any] = {"checkpoint": checkpoint.to_dict()}
        if loss_history is not None:
            update["loss_history"] = loss_history
        update.update(extra)
        self.group.attrs.update(update)

    def refresh(self) -> None:
        self.group = open_group(self.location, "r+", self.storage_options)
        self._grams = {}

    # -- factor arrays --------------------------------------------------------------------------
    def slot(self, side: str, slot: int) -> zarr.Array:
        return array(subgroup(self.group, side), str(slot))

    def trained(self) -> Checkpoint:
        """The checkpoint of a model with factors; ``StoreError`` when it has none yet."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            raise StoreError(f"{self.location} has no trained factors yet: its training stopped before the first "
                             "iteration; run train again")
        return checkpoint

    def current(self, side: str) -> zarr.Array:
        """The current (last completed) factors of a side, as a Zarr array (nothing loaded)."""
        return self.slot(side, self.trained().slots[side])

    def gram(self, side: str, slot: int) -> np.ndarray:
        """Y^T Y (float64) of a side's slot, recorded when the slot was written."""
        return read(self._gram_array(side), slot)

    def set_gram(self, side: str, slot: int, gram: np.ndarray) -> None:
        """Record the Gram of a slot just written (straight to its chunk file when local: the
        slot is not the checkpoint's while it is written, see ``chunk_files``)."""
        write_rows(self._gram_array(side), slot, slot + 1, np.asarray(gram, dtype=np.float64)[None])

    def _gram_array(self, side: str) -> zarr.Array:
        if side not in self._grams:
            self._grams[side] = array(subgroup(self.group, side), "gram")
        return self._grams[side]

    def read_rows(self, side: str, start: int, stop: int) -> np.ndarray:
        return read(self.current(side), slice(start, stop))


def check_interactions_match(model: FactorStore, interactions: InteractionStore, *, resuming: bool = True) -> None:
    """Refuse a model and an interaction store that do not belong together (``DataMismatchError``)."""
    recorded = model.binding
    now = interactions_identity(interactions)
    for key in ("store_id", "n_users", "n_items", "nnz"):
        if recorded.get(key) != now.get(key):
            if resuming:
                raise DataMismatchError(
                    f"model {model.location} was trained on other interactions ({key}: {recorded.get(key)} vs "
                    f"{now.get(key)} in {interactions.location}); pass resume=False to start over",
                    flags={"resume=False": "--no-resume"},
                )
            raise DataMismatchError(
                f"{interactions.location} is not the interaction store model {model.location} was trained on "
                f"({key}: {now.get(key)}, the model's: {recorded.get(key)}; it was trained on {recorded.get('location')})"
            )


def open_model_group(location: str, storage_options: dict | None = None) -> zarr.Group:
    return FactorStore.open(location, "r", storage_options).group
