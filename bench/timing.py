"""Paired timings for the bench scripts, robust enough for a busy machine: callables run
interleaved, several repetitions, each timed by the wall clock (and by the process's CPU time)."""

import subprocess
import time

import numpy as np


def timed(run, iterations: int):
    """(wall seconds, CPU seconds of this process) per call of `run`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        run()
    return (time.perf_counter() - wall) / iterations, (time.process_time() - cpu) / iterations


def time_pair(forward, both, repeats: int, iterations: int) -> dict:
    """`forward` against `both` (forward+backward), interleaved: median ms of each, and the median
    of the per-repetition ratios by wall clock (`ratio`) and by CPU time (`cpu_ratio`). With
    spinning thread pools off, CPU time counts the work done and not the time spent descheduled,
    so `cpu_ratio` holds on a machine shared with other jobs, where `ratio` scatters."""
    forward(), both()
    forward_times, both_times = [], []
    for _ in range(repeats):
        forward_times.append(timed(forward, iterations))
        both_times.append(timed(both, iterations))
    f_wall, f_cpu = np.array(forward_times).T
    b_wall, b_cpu = np.array(both_times).T
    return {
        "forward_ms": round(1e3 * float(np.median(f_wall)), 3),
        "forward_backward_ms": round(1e3 * float(np.median(b_wall)), 3),
        "ratio": round(float(np.median(b_wall / f_wall)), 2),
        "cpu_ratio": round(float(np.median(b_cpu / f_cpu)), 2),
        "ratios": [round(float(r), 2) for r in b_wall / f_wall],
        "cpu_ratios": [round(float(r), 2) for r in b_cpu / f_cpu],
    }


def seconds(run):
    """Wall seconds of one call of `run`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def rounds(routes, count):
    """{route: [seconds per round]}: routes ({name: callable returning its seconds}) called in turn,
    one warm-up round first, so that a machine whose speed drifts slows every route alike."""
    times = {name: [] for name in routes}
    for i in range(count + 1):
        for name, run in routes.items():
            taken = run()
            if i:
                times[name].append(taken)
    return times


class Worker:
    """A Python process (another environment's `python`) running `script` with `args`: it prints
    one line first (its onnxruntime version, say), then answers each request line with a number."""

    def __init__(self, python, script, *args):
        self.process = subprocess.Popen([str(python), "-c", script, *map(str, args)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self.process.stdout.readline().strip()
        if not self.version:
            raise RuntimeError(f"the worker {python} failed to start (arguments {args})")

    def ask(self, request):
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()
