import os, time
from pathlib import Path
import pytest
from ray_helpers import app_config

def cpu_ticks():
    tot = 0
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                f = Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()
                tot += int(f[11]) + int(f[12])
            except OSError:
                pass
    return tot

def measure(label):
    t0, c0 = time.monotonic(), cpu_ticks()
    time.sleep(10)
    print(label, "cores busy:", (cpu_ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0))

def test_idle(deploy, llama, ray_serve):
    t=time.monotonic(); measure("ray only")
    t=time.monotonic(); deploy("pd", **app_config(llama, kv_transport="nixl")); print("deploy pd", time.monotonic()-t)
    measure("one pd app")
    t=time.monotonic(); deploy("agg", **app_config(llama, mode="aggregated")); print("deploy agg", time.monotonic()-t)
    measure("pd+agg")
