#!/usr/bin/env python3
"""Where the machine's CPU goes, phase by phase, while the throughput benchmark runs.

usage: bench/census.py COMMAND [ARG...]
  e.g. BENCH_RUNS=1 BENCH_SCALE=0.5 BENCH_EVENTS=0 bench/census.py \\
         cargo bench -p system-tests --bench throughput

Runs COMMAND, passing its stdout through and copying its stderr; at each phase the benchmark
announces on stderr ("  <phase> (load average ...)") it reads every process's CPU time from
/proc/<pid>/stat and names PostgreSQL's backends by their application_name (each pool of ours
names its sessions, e.g. "command-api committer"). At the end it prints, per phase, each
process's (or session's) share of all cores; a process that ends within a phase is not
counted in it (the services and sessions live through every phase). Linux only; needs psql on PATH and PGHOST etc. if
PostgreSQL is not at 127.0.0.1 as user postgres. See docs/benchmarks.md, "Decision 71".
"""
import collections
import os
import re
import subprocess
import sys
import time

PHASE = re.compile(r"^\s+(\S.*?) \(load average")
HZ = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def cpu_ticks():
    """pid -> (command name, user + system ticks) for every process still there."""
    ticks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks[int(pid)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def session_names():
    """PostgreSQL backend pid -> application_name (or the backend's type)."""
    query = (
        "SELECT pid, coalesce(nullif(application_name, ''), backend_type) FROM pg_stat_activity"
    )
    env = {"PGHOST": "127.0.0.1", "PGUSER": "postgres", **os.environ}
    try:
        out = subprocess.run(
            ["psql", "-Atc", query], capture_output=True, text=True, timeout=5, env=env
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():
        pid, _, name = line.partition("|")
        if pid.isdigit():
            names[int(pid)] = name
    return names


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    child = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, text=True)
    marks = []
    for line in child.stderr:
        sys.stderr.write(line)
        found = PHASE.match(line)
        if found:
            marks.append((found.group(1), time.monotonic(), cpu_ticks(), session_names()))
    marks.append(("end", time.monotonic(), cpu_ticks(), session_names()))
    status = child.wait()
    names = {}
    for mark in marks:
        names.update(mark[3])
    print("\n### CPU census (share of all cores, per phase)\n")
    for (phase, start, before, _), (_, end, after, _) in zip(marks, marks[1:]):
        seconds = end - start
        shares = collections.Counter()
        for pid, (name, ticks) in after.items():
            spent = ticks - before[pid][1] if pid in before else ticks
            if spent <= 0:
                continue
            if pid in names:
                name = "postgres: " + names[pid]
            shares[name] += spent
        busy = sum(shares.values()) / HZ / seconds / CORES
        print(f"{phase}: {seconds:.1f} s, {100 * busy:.1f} % busy")
        for name, spent in shares.most_common(15):
            print(f"  {100 * spent / HZ / seconds / CORES:5.1f} %  {name}")
    sys.exit(status)


if __name__ == "__main__":
    main()
