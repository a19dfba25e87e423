"""A worker's loaded models and the garbage collector (core/heap.py, workers/generation/cache.py):
a server that froze its startup objects freezes each model it loads too, and an evicted
model is still collected, reference cycles and all. Run in a process of its own: freezing
changes the collector of the whole process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import gc, json, sys, weakref
from core.heap import freeze_startup_objects
from workers.generation.cache import ModelCache

first, second = sys.argv[1], sys.argv[2]
found = {}

# a process that never froze (a test, a script) leaves the collector alone
unmanaged = ModelCache(budget_bytes=1)
unmanaged.get(first, "cpu")
found["frozen_unmanaged"] = gc.get_freeze_count()
del unmanaged
gc.collect()

freeze_startup_objects("test")
found["frozen_at_startup"] = gc.get_freeze_count()
cache = ModelCache(budget_bytes=1)  # room for one model at a time
entry, _ = cache.get(second, "cpu")
found["frozen_after_load"] = gc.get_freeze_count()
found["model_seen_by_collector"] = any(o is entry.model for o in gc.get_objects())
entry.model._cycle = {"model": entry.model}  # collected only by a full collection
gone = weakref.ref(entry.model)
del entry
cache.get(second, "cpu")  # a hit freezes nothing more
found["frozen_after_hit"] = gc.get_freeze_count()
_, outcome = cache.get(first, "cpu")  # evicts the second
found["evicted"] = list(outcome.evicted)
found["evicted_model_collected"] = gone() is None
print(json.dumps(found))
"""


def test_a_server_freezes_each_model_it_loads_and_still_collects_an_evicted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model_dir, twin)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(twin)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["frozen_unmanaged"] == 0, found
    assert found["frozen_after_load"] > found["frozen_at_startup"], found
    assert found["model_seen_by_collector"] is False, found  # frozen with the rest
    # a hit freezes nothing new (frozen objects freed since make the count go down)
    assert found["frozen_after_hit"] <= found["frozen_after_load"], found
    assert found["evicted"] == [str(twin)], found
    assert found["evicted_model_collected"] is True, found
