"""The factor store: user and item factors in Zarr, double-buffered, with the checkpoint state.

Layout::

    MODEL/                  attrs: kind, format_version, config, interactions, n_users, n_items,
                                   row_block, checkpoint {step, slots, pending_user_reg},
                                   loss_history, complete
      user/0, user/1        (n_users, f) factor slots; checkpoint.slots["user"] is the current one
      user/gram             (2, f, f) float64: Y^T Y of each slot, for the other side's solves
      item/0, item/1, item/gram

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
from ..store.format import check_complete, open_group
from ..store.reader import InteractionStore

MODEL_KIND = "wals-ooc/model"
MODEL_FORMAT_VERSION = 1
SIDE_ORDER = ("user", "item")


def default_model_location(interactions_location: str) -> str:
    """``plays.zarr`` -> ``plays-model.zarr`` beside it."""
    base = interactions_location.rstrip("/")
    return (base[: -len(".zarr")] if base.endswith(".zarr") else base) + "-model.zarr"


def interactions_identity(store: InteractionStore) -> dict[str, Any]:
    """What identifies the data a model was trained on (a resume must see the same)."""
    return {
        "location": store.location,
        "store_id": store.attrs().get("store_id"),
        "n_users": store.n_users,
        "n_items": store.n_items,
        "nnz": store.nnz,
    }


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

    # -- creation and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        location: str,
        config: WALSConfig,
        interactions: InteractionStore,
        seed: int,
        storage_options: dict | None = None,
    ) -> FactorStore:
        group = open_group(location, "w", storage_options)
        shapes = {"user": interactions.n_users, "item": interactions.n_items}
        for side in SIDE_ORDER:
            side_group = group.create_group(side)
            for slot in (0, 1):
                side_group.create_array(
                    str(slot),
                    shape=(shapes[side], config.factors),
                    dtype=config.np_dtype,
                    chunks=(interactions.row_block, config.factors),
                    compressors=None,
                    fill_value=0,
                )
            side_group.create_array(
                "gram", shape=(2, config.factors, config.factors), dtype=np.float64,
                chunks=(1, config.factors, config.factors), compressors=None, fill_value=0,
            )
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
    def open(cls, location: str | os.PathLike, mode: str = "r", storage_options: dict | None = None) -> FactorStore:
        group = open_group(location, mode, storage_options)
        if group.attrs.get("kind") != MODEL_KIND:
            raise FileNotFoundError(f"{location} is not a wals-ooc model store")
        return cls(location, group, storage_options)

    @classmethod
    def exists(cls, location: str, storage_options: dict | None = None) -> bool:
        try:
            cls.open(location, "r", storage_options)
            return True
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.GroupNotFoundError):
            return False

    # -- state ----------------------------------------------------------------------------------
    @property
    def config(self) -> WALSConfig:
        return WALSConfig.from_dict(self.group.attrs["config"])

    @property
    def seed(self) -> int:
        return int(self.group.attrs["seed"])

    @property
    def checkpoint(self) -> Checkpoint | None:
        data = self.group.attrs.get("checkpoint")
        return None if data is None else Checkpoint.from_dict(data)

    @property
    def loss_history(self) -> list[dict]:
        return list(self.group.attrs.get("loss_history", []))

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def commit(self, checkpoint: Checkpoint, loss_history: list[dict] | None = None, **extra) -> None:
        """Record a finished half-sweep: one atomic write of the group's attributes."""
        update: dict[str, Any] = {"checkpoint": checkpoint.to_dict()}
        if loss_history is not None:
            update["loss_history"] = loss_history
        update.update(extra)
        self.group.attrs.update(update)

    def refresh(self) -> None:
        self.group = open_group(self.location, "r+", self.storage_options)

    # -- factor arrays --------------------------------------------------------------------------
    def slot(self, side: str, slot: int) -> zarr.Array:
        return self.group[side][str(slot)]

    def current(self, side: str) -> zarr.Array:
        """The current (last completed) factors of a side, as a Zarr array (nothing loaded)."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            raise RuntimeError(f"{self.location} has no trained factors yet")
        return self.slot(side, checkpoint.slots[side])

    def gram(self, side: str, slot: int) -> np.ndarray:
        """Y^T Y (float64) of a side's slot, recorded when the slot was written."""
        return self.group[side]["gram"][slot]

    def set_gram(self, side: str, slot: int, gram: np.ndarray) -> None:
        self.group[side]["gram"][slot] = gram

    def read_rows(self, side: str, start: int, stop: int) -> np.ndarray:
        return self.current(side)[start:stop]


def check_interactions_match(model: FactorStore, interactions: InteractionStore) -> None:
    """Refuse to resume a model on other data than it was started on."""
    recorded = dict(model.group.attrs["interactions"])
    now = interactions_identity(interactions)
    for key in ("store_id", "n_users", "n_items", "nnz"):
        if recorded.get(key) != now.get(key):
            raise ValueError(
                f"model {model.location} was trained on other interactions ({key}: {recorded.get(key)} "
                f"vs {now.get(key)}); pass resume=False to start over"
            )


def open_model_group(location: str, storage_options: dict | None = None) -> zarr.Group:
    group = open_group(location, "r", storage_options)
    check_complete(group, MODEL_KIND, location, MODEL_FORMAT_VERSION)
    return group
