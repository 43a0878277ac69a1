#!/usr/bin/env python3
"""CPU time per process start, system-wide: plain `true` and `python3 -I -B -c 'print(1)'`, and
each inside a minimal bubblewrap sandbox (every namespace, /usr read-only, /proc, /dev, a tmpfs),
N starts per block, the four sides in turn, three rounds.

System-wide (from /proc/stat), not per process: a network namespace is torn down later by a
kernel worker, whose CPU no rusage of the child shows. Each block ends with a 0.5 s pause so
that deferred work lands inside it. Run on an otherwise idle machine (the idle background is
printed too; it is charged to every side alike).

    python3 loadtest/bench/sandbox_cpu_cost.py [N]      # default 100
"""
import os
import subprocess
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds():
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return (sum(v) - v[3] - v[4]) / TICK  # all but idle and iowait


BWRAP = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
         "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
         "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]
PYTHON = ["/usr/bin/python3", "-I", "-B", "-c", "print(1)"]
SIDES = {"true": ["/usr/bin/true"], "bwrap true": BWRAP + ["/usr/bin/true"],
         "python": PYTHON, "bwrap python": BWRAP + PYTHON}

start = busy_seconds()
time.sleep(2)
print(f"idle background: {(busy_seconds() - start) / 2 * 1e3:.1f} ms of CPU per second")
results = {side: [] for side in SIDES}
for _ in range(3):
    for side, argv in SIDES.items():
        before = busy_seconds()
        for _ in range(N):
            subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        time.sleep(0.5)
        results[side].append((busy_seconds() - before) / N * 1e3)
for side, ms in results.items():
    print(f"{side:>13}: " + ", ".join(f"{m:.1f}" for m in ms) + " ms of CPU per start")
