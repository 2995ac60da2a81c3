"""Adapters on one base model share its weights: eight served adapters cost little more memory than one."""

import json
import os
import subprocess
import sys

import pytest

MEASURE = """
import gc, json, sys
from coda_adapters.app.serving import load_adapters

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

directories = json.loads(sys.argv[1])
served = load_adapters({f"a{i}": d for i, d in enumerate(directories)})
gc.collect()
print(json.dumps({"adapters": len(served), "rss_mb": rss_mb()}))
"""


def make_minilm_adapters(root, count):
    import torch

    from coda_adapters import CodaConfig
    from coda_adapters.app.classify import build_classifier, save_task

    from helpers import randomize_trainable

    directories = []
    for i in range(count):
        torch.manual_seed(i)
        model, _ = build_classifier("minilm", CodaConfig(reduction=3, pooling="mean"), ["a", "b", "c"])
        randomize_trainable(model, seed=i, std=0.02)
        model.save_pretrained(root / f"adapter-{i}")
        save_task(root / f"adapter-{i}", "minilm", ["a", "b", "c"], max_length=256)
        directories.append(str(root / f"adapter-{i}"))
    return directories


def resident_memory(directories):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(directories)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["rss_mb"]


@pytest.mark.slow
def test_eight_minilm_adapters_use_at_most_1_3_times_the_memory_of_one(tmp_path):
    directories = make_minilm_adapters(tmp_path, 8)
    one, eight = resident_memory(directories[:1]), resident_memory(directories)
    print(f"\nresident memory: 1 adapter {one:.0f} MB, 8 adapters {eight:.0f} MB, ratio {eight / one:.2f}")
    assert eight <= 1.3 * one
