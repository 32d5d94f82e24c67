"""Run every bench module in turn (python -m bench): each prints its own figures."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main() -> int:
    failed = []
    for module in sorted(info.name for info in pkgutil.iter_modules(bench.__path__) if not info.name.startswith("_")):
        print(f"== bench.{module}", flush=True)
        try:
            importlib.import_module(f"bench.{module}").main()
        except Exception as exc:  # one broken bench must not hide the others' figures
            print(f"bench.{module} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(module)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
