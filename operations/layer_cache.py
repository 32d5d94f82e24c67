"""The layer cache's upkeep (`kiln cache`): the layers container builds keep of their customize steps, listed and
pruned."""

from __future__ import annotations

import datetime as dt

from clouds.layers import Layer, LayerCache
from core import settings


def cached_layers() -> list[Layer]:
    """Every cached layer, most recently used first."""
    return LayerCache(settings.layers_dir()).list()


def prune_layers(*, max_size: int | None, older_than: dt.timedelta | None) -> list[Layer]:
    """Remove layers unused for longer than older_than, then the least recently used ones until the cache holds at
    most max_size bytes; the removed layers."""
    return LayerCache(settings.layers_dir()).prune(max_size=max_size, older_than=older_than)
