"""Prints the fault-injection table (stage × backend → kiln resources left after gc) at the end of the run;
'-' where that stage was not run on that backend (a local kill in a VM at customize or later costs real boots)."""

from __future__ import annotations

import pytest

ORDER = ("fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register",
         "SIGINT at launch")  # fmt: skip
BACKENDS = ("local container", "local vm", "moto", "openstack")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.faults import test_faults

    results = test_faults.RESULTS
    if not results:
        return
    width = max(len(s) for s in ORDER) + 2
    terminalreporter.section("fault injection: kiln resources of the killed build left after `kiln gc`")
    terminalreporter.write_line("stage".ljust(width) + "".join(b.ljust(17) for b in BACKENDS))
    for stage in ORDER:
        terminalreporter.write_line(stage.ljust(width) + "".join(results.get((stage, b), "-").ljust(17)
                                                                 for b in BACKENDS))  # fmt: skip
    for line in test_faults.SCANNED:
        terminalreporter.write_line(line)
