"""``otel-cmbagent tree / timeline / events`` on a big run: time to the first line printed, total time, peak RSS.

Run:  .venv/ag2/bin/python benchmarks/bench_cli.py   (--sizes 500,100000 --repeat 3; printed, never asserted)

One SQLite file per run size, written by ``bench_viewer.py``'s writer (setup_tracing's SQL sink, flushed every
1,000 events so every row is written; agent / LLM / tool spans and messages under steps). Each command runs as a
subprocess (the console script, ``COLUMNS=160``, stdout a pipe): time to its first line on stdout, to its exit,
and its peak RSS (``wait4``). The tree, the timeline and the events table print one page (500 rows; ``--limit``,
``--offset``), ``events --json`` streams every row; ``tree --limit 0`` (the whole tree, as before paging) is the
reference for what paging saves. The interpreter's start and imports (``--version``) are measured as a floor.
Timings depend on the machine's load: compare the ratios against the 500-event baseline of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_viewer import WRITER

CLI = Path(sys.executable).parent / "otel-cmbagent"
COMMANDS = (("--version",), ("tree",), ("timeline",), ("events",), ("events", "--json"), ("tree", "--limit", "0"))


def _write(db: Path, run_id: str, size: int) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(db), run_id, str(size), "0", "0"], input="\n", text=True,
                   check=True, capture_output=True)


def _once(args: list[str]) -> tuple[float, float, float, int, float]:
    """(seconds to the first line, seconds to exit, peak RSS MB, lines, CPU seconds) of one run of the console
    script."""
    env = {**os.environ, "COLUMNS": "160"}
    started = time.perf_counter()
    process = subprocess.Popen([str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    first_line = process.stdout.readline()
    first = time.perf_counter() - started
    lines = 1 if first_line else 0
    for _line in process.stdout:
        lines += 1
    _pid, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - started
    assert os.waitstatus_to_exitcode(status) == 0, f"{args} failed"
    return first, total, usage.ru_maxrss / 1024, lines, usage.ru_utime + usage.ru_stime


def measure(db: Path, run_id: str, repeat: int) -> list[dict]:
    out = []
    for command in COMMANDS:
        args = list(command) if command[0] == "--version" else [command[0], run_id, "--db", str(db), *command[1:]]
        runs = [_once(args) for _ in range(repeat)]
        out.append({"command": " ".join(command), "first_s": statistics.median(r[0] for r in runs),
                    "total_s": statistics.median(r[1] for r in runs), "rss_mb": max(r[2] for r in runs),
                    "lines": runs[-1][3], "cpu_s": statistics.median(r[4] for r in runs)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,100000", help="run sizes (events), baseline first")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 and 2,000 events, 1 run each")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeat = "200,2000", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for size in sizes:
            db = Path(tmp) / f"run-{size}.db"
            _write(db, f"bench-{size}", size)
            results[size] = measure(db, f"bench-{size}", args.repeat)
    print(f"otel-cmbagent on one run (median of {args.repeat}; stdout a pipe, COLUMNS=160; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"{'command':<22}" + "".join(f"{f'{size} events: first line / exit / CPU / peak RSS / lines':>62}"
                                       for size in sizes))
    for i, command in enumerate(COMMANDS):
        cells = [results[size][i] for size in sizes]
        print(f"{' '.join(command):<22}" + "".join(
            f"{c['first_s'] * 1000:>18.0f} ms {c['total_s'] * 1000:>8.0f} ms {c['cpu_s'] * 1000:>7.0f} ms "
            f"{c['rss_mb']:>6.0f} MB {c['lines']:>8}"
            for c in cells))
    if len(sizes) > 1:
        base, big = results[sizes[0]], results[sizes[-1]]
        print(f"ratios {sizes[-1]} / {sizes[0]} events, time to first line: " + ", ".join(
            f"{b['command']} {g['first_s'] / b['first_s']:.2f}x" for b, g in zip(base, big)))
        print(f"ratios {sizes[-1]} / {sizes[0]} events, peak RSS: " + ", ".join(
            f"{b['command']} {g['rss_mb'] / b['rss_mb']:.2f}x" for b, g in zip(base, big)))


if __name__ == "__main__":
    main()
