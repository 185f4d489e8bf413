"""Processes by PID from /proc: ages and trees, as the launcher and the benchmarks read them."""
import os
import subprocess
import sys
import time

from serve_graph.procs import age, descendants, stop_tree, wait_gone


def test_age_counts_from_the_process_start():
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.0)
        child_age = age(child.pid)
        assert 0.8 <= child_age <= time.monotonic() - started + 0.1, child_age
        assert age(os.getpid()) > child_age
    finally:
        child.kill()
        child.wait()
    assert age(child.pid) == 0.


def test_stop_tree_stops_the_children_of_a_process_too():
    script = ("import subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 10
    while not descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    children = descendants(parent.pid)
    assert children
    stop_tree(parent, grace=2., linger=2.)
    assert not wait_gone(children, 5.)  # SIGKILLed by PID: gone once the kernel is done
