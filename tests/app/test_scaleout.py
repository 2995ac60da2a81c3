"""Scale-out on existing engines: `coda train` under `accelerate launch` (DDP, gloo on CPU) and transformers.Trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coda_adapters import CodaConfig, get_coda_model

from helpers import random_ids, tiny_model

# No dropout, so that the only difference between one and two processes is the order of float sums.
ARGS = [
    "train",
    "--reduction",
    "3",
    "--max-length",
    "32",
    "--max-train-examples",
    "64",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--min-steps",
    "0",
    "--val-size",
    "0",
    "--dropout",
    "0",
    "--lr",
    "3e-3",
]
TOLERANCE = 1e-4  # largest weight difference allowed between the two runs after 16 AdamW steps


def run(command, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *ARGS, "--out", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((Path(out) / "metrics.json").read_text())


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = run([sys.executable, "-m", "coda_adapters"], tmp_path / "one")
    accelerate = Path(sys.executable).parent / "accelerate"
    # accelerate's multi-GPU launcher starts torch.distributed processes; without GPUs they use gloo on the CPU
    double = run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "coda_adapters",
        ],
        tmp_path / "two",
    )
    assert single["processes"] == 1 and double["processes"] == 2
    assert "MULTI_CPU" in double["distributed_type"]
    one = load_file(tmp_path / "one" / "coda_model.safetensors")
    two = load_file(tmp_path / "two" / "coda_model.safetensors")
    assert one.keys() == two.keys()
    moved = max((one[n] - torch.zeros_like(one[n])).abs().max().item() for n in one)
    assert moved > 1e-3  # training did change the weights
    for name in one:
        assert (one[name] - two[name]).abs().max() <= TOLERANCE, name


@pytest.mark.slow
def test_coda_model_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_coda_model(tiny_model("bert", head=True), CodaConfig(reduction=3, bottleneck=8))
    ids = random_ids(32, 12)
    examples = [
        {"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": int(ids[i, 1] % 3)}
        for i in range(32)
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # remove_unused_columns=False: Trainer cannot read column names off CodaModel.forward(*args, **kwargs)
    arguments = TrainingArguments(
        remove_unused_columns=False,
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=examples)
    result = trainer.train()
    assert result.global_step == 6 and result.training_loss > 0
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".router." in n for n in changed) and any(".adapter." in n for n in changed)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".layer.attention." in n)
