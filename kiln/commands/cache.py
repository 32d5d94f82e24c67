"""`kiln cache`: the layers container builds keep of their customize steps — list them, prune them."""

from __future__ import annotations

import datetime as dt
import re

import typer
from rich.table import Table

from kiln.commands.output import fail, safe, stdout

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """'20G', '512M', '0' (bytes when no unit; powers of 1024)."""
    match = _SIZE.match(text or "")
    if not match:
        raise ValueError(f"--max-size: {text!r} is not a size such as 0, 512M or 20G")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def _age(stamp: str) -> str:
    seconds = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(stamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def register(app: typer.Typer) -> None:
    cache_app = typer.Typer(help="The layer cache of container builds (one layer per customize step).",
                            no_args_is_help=True)  # fmt: skip
    app.add_typer(cache_app, name="cache")

    @cache_app.command("list")
    def list_layers() -> None:
        """Every cached layer: key, step, size, age, last use, and the build that made it (most recently used first)."""
        from operations.layer_cache import cached_layers

        layers = cached_layers()
        table = Table("key", "step", "size", "age", "last used", "made by build")
        for layer in layers:
            table.add_row(layer.key[:12], safe(layer.step), f"{layer.size / 1024**2:.1f} MiB", _age(layer.created),
                          _age(layer.last_used) + " ago", safe(layer.build_id[:12]))  # fmt: skip
        out = stdout()
        out.print(table if layers else "no cached layers")
        if layers:
            out.print(f"{len(layers)} layers, {sum(layer.size for layer in layers) / 1024**2:.1f} MiB")

    @cache_app.command("prune")
    def prune(
        max_size: str = typer.Option(None, "--max-size", help="Keep at most this much: 0, 512M, 20G"),
        older_than: str = typer.Option(None, "--older-than", help="Remove layers unused this long: 12h, 30d"),
    ) -> None:
        """Remove layers unused for longer than --older-than, then the least recently used ones until the cache
        holds at most --max-size."""
        from operations.gc import parse_duration
        from operations.layer_cache import prune_layers

        if max_size is None and older_than is None:
            fail("kiln cache prune: give --max-size, --older-than or both")
        try:
            limit = parse_size(max_size) if max_size is not None else None
            age = parse_duration(older_than) if older_than else None
        except ValueError as exc:
            fail(str(exc))
        gone = prune_layers(max_size=limit, older_than=age)
        for layer in gone:
            typer.echo(f"removed {layer.key[:12]} {layer.step} ({layer.size} bytes, last used {layer.last_used})")
        typer.echo(f"{len(gone)} layers removed, {sum(layer.size for layer in gone)} bytes freed")
