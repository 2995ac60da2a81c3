"""Where an exported graph spends its time: ONNX Runtime's profiler, kernel time per operator type.

    python examples/onnx_profile.py export/bbc-r3/model.onnx --batch-size 8 --seq-len 512

Runs the graph on a batch of random word pieces (every token real: the work per call is set by the shapes,
not the values) a few times with profiling on, after one call left out, and prints each operator type's
share of the kernel time.
In a CoDA export the frozen layers' matrix products should dominate; routing (TopK, Gather, ScatterND) and
padding masks (Where) are the overhead this shows.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np


def kernel_time_by_operator(
    onnx_path: str | Path, batch_size: int = 8, seq_len: int = 512, threads: int = 1, calls: int = 3
) -> dict[str, float]:
    """Milliseconds of kernel time per call for each operator type, largest first."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as directory:
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(directory) / "profile")
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        input_ids = np.random.default_rng(0).integers(1000, 20000, (batch_size, seq_len), dtype=np.int64)
        feeds = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
        for _ in range(1 + calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    warmed_up = runs[0][1]  # the first call (allocations, caches) is left out
    micros: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warmed_up:
            micros[event["args"]["op_name"]] += event["dur"]
    return {op: total / 1000 / calls for op, total in micros.most_common()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="an ONNX file, e.g. coda export's model.onnx or model.int8.onnx")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    times = kernel_time_by_operator(args.onnx, args.batch_size, args.seq_len, args.threads, args.calls)
    total = sum(times.values())
    shape = f"{args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s)"
    print(f"{total:.0f} ms of kernel time per call ({shape})")
    for op, ms in times.items():
        if ms >= total / 1000:
            print(f"  {op:<24} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
