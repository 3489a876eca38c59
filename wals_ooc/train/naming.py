"""Where ``fit`` writes a model when no path is given: one model per data and settings.

``<store>-model.zarr`` beside the store, unless that holds a model of other settings or other
data; then ``<store>-model-<factors>f-<tag>.zarr``, ``tag`` a digest of the store's identity and
the settings that define the objective. Fitting again with the same settings resumes the same
model; a sweep over settings gets one model per setting, side by side, without naming paths.
"""

from __future__ import annotations

import hashlib
import json

from ..config import WALSConfig
from .factors import MODEL_KIND, default_model_location


def _wanted(config: WALSConfig, have: dict | None = None) -> dict:
    wanted = config.objective_dict()
    if config.random_state is None:  # no seed asked for: any recorded seed will do
        wanted["random_state"] = None if have is None else have.get("random_state")
    return wanted


def settings_location(base: str, store_id: str | None, config: WALSConfig) -> str:
    """``<base minus .zarr>-<factors>f-<tag>.zarr``: the same for the same data and settings."""
    digest = hashlib.sha1(json.dumps({"store_id": store_id, **_wanted(config)}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    return f"{stem}-{config.factors}f-{digest}.zarr"


def model_location_for(store, config: WALSConfig, resume: bool = True) -> str:
    """The model path ``fit`` uses for ``store`` and ``config`` when none is given (see above).
    Without ``resume`` the plain default is started over, as asked."""
    from ..store.lifecycle import inspect_target

    base = default_model_location(store.location)
    if not resume:
        return base
    state = inspect_target(base, store.storage_options)
    if state.what != "store" or state.kind != MODEL_KIND:
        return base  # nothing there yet (or something the door will refuse, naming it)
    store_id = store.attrs().get("store_id")
    try:
        have = WALSConfig.from_dict(state.attrs.get("config") or {}).objective_dict()
    except (TypeError, ValueError):
        have = None
    same_data = (state.attrs.get("interactions") or {}).get("store_id") == store_id
    if have is not None and same_data and _wanted(config, have) == have:
        return base
    return settings_location(base, store_id, config)
