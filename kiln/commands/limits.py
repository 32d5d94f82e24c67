"""`kiln limits set|list`: how many VMs each cloud may run at once, as Prefect global concurrency limits."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from kiln.commands.output import fail, safe

limits_app = typer.Typer(
    help="Per-cloud caps on running VMs (Prefect global concurrency limits kiln-vms-<cloud>[-<region>]).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(limits_app, name="limits")


@limits_app.command("set")
def set_(
    cloud: str = typer.Argument(..., help="local, ec2-<region> (e.g. ec2-us-east-1) or openstack-<clouds.yaml entry>"),
    count: int = typer.Argument(..., help="VMs this cloud may run at once for kiln (0 pauses its builds)"),
) -> None:
    """Create or update the limit of one cloud on the Prefect server (PREFECT_API_URL)."""
    from flows.limits import normalize, set_limit

    try:
        name = normalize(cloud)
        if count < 0:
            raise ValueError(f"COUNT must be 0 or more, not {count}")
    except ValueError as exc:
        fail(str(exc), 2)
    limit = set_limit(name, count)
    Console().print(f"{safe(limit.name)}: {limit.limit} VM{'s' if limit.limit != 1 else ''} at once")


@limits_app.command("list")
def list_() -> None:
    """kiln's limits on the Prefect server, with the slots in use now."""
    from flows.limits import default_limit, list_limits, paused_slots

    found = list_limits()
    paused = paused_slots()
    table = Table(box=None, pad_edge=False)
    for column in ("limit", "VMs at once", "in use", "paused", "active"):
        table.add_column(column)
    for each in found:
        table.add_row(safe(each.name), str(each.limit), str(each.active_slots), str(paused.get(each.name, 0)),
                      "yes" if each.active else "no")
    out = Console()
    if found:
        out.print(table)
    else:
        out.print(f"no kiln limits yet: `kiln limits set local {default_limit('kiln-vms-local')}` "
                  "(and ec2-<region>, openstack-<entry> for your other clouds)")
