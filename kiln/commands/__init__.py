"""CLI command groups; kiln/cli.py registers each module's commands on the one typer app."""
