"""Prints the fault-injection table (stage × backend → kiln resources left after gc) at the end of the run."""

from __future__ import annotations

import pytest

ORDER = ("fetch_base", "launch", "wait_boot", "customize", "sanitize", "snapshot", "verify", "register",
         "SIGINT at launch")  # fmt: skip


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.faults import test_faults

    results = test_faults.RESULTS
    if not results:
        return
    backends = sorted({backend for _, backend in results})
    stages = [s for s in ORDER if any(s == stage for stage, _ in results)]
    width = max(len(s) for s in stages) + 2
    terminalreporter.section("fault injection: kiln resources of the killed build left after `kiln gc`")
    terminalreporter.write_line("stage".ljust(width) + "".join(b.ljust(10) for b in backends))
    for stage in stages:
        terminalreporter.write_line(stage.ljust(width) + "".join(results.get((stage, b), "-").ljust(10)
                                                                 for b in backends))  # fmt: skip
    for line in test_faults.SCANNED:
        terminalreporter.write_line(line)
