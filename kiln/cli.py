"""kiln's front door: the `kiln` command (typer + rich). Each command group lives in kiln/commands/."""

from __future__ import annotations

import os
from typing import Any

import click
import typer
from typer.core import TyperGroup

from core.settings import SettingsError

# kiln's own Prefect runs send nothing to Prefect Inc.: the SDK's analytics (read at `import prefect`, so set here,
# before any command imports it) and the temporary server's telemetry, which offline fails with tracebacks.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class KilnGroup(TyperGroup):
    """Every command: a setting or database kiln cannot work with is one line naming the setting and the cause,
    exit 2, never a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from kiln.commands.build import with_default_pause

        return super().parse_args(ctx, with_default_pause(args))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as exc:
            from kiln.commands.output import fail

            fail(str(exc), 2)


app = typer.Typer(
    name="kiln",
    cls=KilnGroup,
    help="Bake VM images from recipes kept in git, and remember exactly how every image was made.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold keys and credentials
    add_completion=False,
)
db_app = typer.Typer(help="The provenance database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.callback()
def main() -> None:
    """Bake VM images from recipes kept in git, and remember exactly how every image was made."""


# Command groups register themselves here, one line each (keep imports one-way: kiln -> flows -> tasks).
from kiln.commands import records; records.register(app)  # noqa: E402, E702, I001
from kiln.commands import recipes; recipes.register(app)  # noqa: E402, E702, I001
from kiln.commands import build; build.register(app)  # noqa: E402, E702, I001
from kiln.commands import lineage; lineage.register(app)  # noqa: E402, E702, I001
from kiln.commands import publish; publish.register(app)  # noqa: E402, E702, I001
from kiln.commands import audit; audit.register(app)  # noqa: E402, E702, I001
from kiln.commands import attest; attest.register(app)  # noqa: E402, E702, I001
from kiln.commands import gc; gc.register(app)  # noqa: E402, E702, I001
from kiln.commands import limits; limits.register(app)  # noqa: E402, E702, I001
from kiln.commands import status; status.register(app)  # noqa: E402, E702, I001
from kiln.commands import cache; cache.register(app)  # noqa: E402, E702, I001
from kiln.commands import hands; hands.register(app)  # noqa: E402, E702, I001
