"""`kiln audit IMAGE_ID`: rebuild an image from its recorded commit and print how identical the two are."""

from __future__ import annotations

import json
from typing import NoReturn

import typer

from kiln.commands.output import fail, safe, stderr, stdout

SHOWN_PATHS = 20  # differing paths printed per kind (the record keeps more; --json prints what was recorded)


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)


def audit(
    image_id: str = typer.Argument(..., help="A local image kiln built (img-…, or its disk's sha256)."),
    repo: str | None = typer.Option(None, "--repo", help="Git repository holding the recorded commit "
                                    "(default: the recorded repository if it is here, else the current one)."),
    threshold: float = typer.Option(99.0, "--threshold", min=0, max=100, help="Percent of identical files to pass."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit as JSON."),
) -> None:
    """Repeatability audit: check out the recorded commit, verify the recipe fingerprint, rebuild the same target,
    compare packages and every file of the two disks. Exit 0 passed, 1 differs or failed, 2 bad input."""
    from flows.audit import AuditError, audit_image, audit_subject, interactive_warning
    from kiln.commands.build import quiet_prefect_console, quiet_prefect_runs
    from provenance.lineage import UnknownImage

    try:
        subject = audit_subject(image_id)  # bad input stops here, before Prefect starts or anything is rebuilt
    except (UnknownImage, AuditError) as exc:
        _fail(str(exc), 2)
    if warning := interactive_warning(subject):
        stderr().print(f"[yellow]warning:[/] {safe(warning)}")
    quiet_prefect_console()
    quiet_prefect_runs()
    try:
        report = audit_image(image_id, repo=repo, threshold=threshold)
    except AuditError as exc:
        _fail(str(exc), 1)
    except Exception as exc:  # the rebuild failed: its provenance names the stage (kiln show)
        from provenance.redact import describe

        _fail(f"audit of {image_id} failed: {describe(exc)}", 1)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)
    raise typer.Exit(0 if report["status"] == "passed" else 1)


def print_report(report: dict) -> None:
    console = stdout()
    files, packages = report["files"], report["packages"]
    colour = "green" if report["status"] == "passed" else "red"
    console.print(f"audit {report['audit_id']} of [bold]{safe(report['image_id'])}[/]: [{colour}]"
                  f"{report['status']}[/]")
    if report.get("interactive"):
        console.print("  [yellow]built interactively (kiln shell): not reproducible from its recipe alone[/]")
    console.print(f"  commit {report['commit'][:12]}, recipe fingerprint {report['fingerprint'][:16]} (verified)")
    console.print(f"  rebuilt as {safe(report['rebuild_image_id'])} (build {report['rebuild_build_id'][:12]})")
    console.print(f"  files: [bold]{files['identity']:.2f}%[/] identical ({files['identical']} of {files['compared']};"
                  f" {files['excluded']} paths excluded; threshold {report['threshold']}%)")
    for kind in ("changed", "only_original", "only_rebuild"):
        count = files["counts"][kind]
        if count:
            console.print(f"    {kind.replace('_', ' ')} ({count}):", highlight=False)
            for path in files[kind][:SHOWN_PATHS]:
                console.print(f"      {safe(path)}", highlight=False)
            if count > SHOWN_PATHS:
                console.print(f"      … {count - SHOWN_PATHS} more (kiln audit --json)", highlight=False)
    if not any(packages.values()):
        console.print("  packages: identical")
    for kind in ("added", "removed", "changed"):
        for line in packages[kind]:
            console.print(f"  package {kind}: {safe(line)}", highlight=False)


def _fail(message: str, code: int) -> NoReturn:
    fail(message, code)
