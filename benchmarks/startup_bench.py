#!/usr/bin/env python
"""Start-up time of the listing commands: `qcompiler --version`, `targets`, `passes`.

Each command runs ``--runs`` times as a fresh process (``python -m qcompiler.cli ...``, round-robin
with a bare ``python -c pass`` as the peer, so load changes fall on every row alike). Printed:
median wall time and median CPU time (user + system, from the child's rusage) per command, and
the ratio to the bare interpreter. CPU time is the number to read on a loaded machine. The
result goes to stdout as a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (peer)": ["-c", "pass"],
    "qcompiler --version": ["-m", "qcompiler.cli", "--version"],
    "qcompiler targets": ["-m", "qcompiler.cli", "targets"],
    "qcompiler passes": ["-m", "qcompiler.cli", "passes"],
}


def _once(args: list[str]) -> tuple[float, float]:
    before = os.times()
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="runs per command")
    args = p.parse_args(argv)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in COMMANDS}
    for _ in range(args.runs):
        for label, cmd in COMMANDS.items():
            times[label].append(_once(cmd))
    peer_cpu = statistics.median(c for _, c in times["python -c pass (peer)"])
    print(f"| command | wall s (median of {args.runs}) | CPU s (median) | CPU minus bare interpreter |")
    print("|---|---|---|---|")
    for label, rows in times.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {cpu - peer_cpu:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
