"""Where an exported graph spends its time: ONNX Runtime's profiler, kernel time per operator type.

    python examples/onnx_profile.py export/bbc-r3/model.onnx --batch-size 8 --seq-len 512
    python examples/onnx_profile.py before/model.int8.onnx after/model.int8.onnx --threads 2 --calls 12

Runs the graph on a batch of random word pieces (every token real: the work per call is set by the shapes,
not the values) a few times with profiling on, after one call left out, and prints each operator type's
share of the kernel time. Given several graphs it times them instead, one call of each per round in a
rotating order, as `coda bench` does (so that a slow spell of the machine hits all of them), and prints
each one's median wall time per call and its speed-up over the first: how an A/B of two exports is
measured on a noisy machine.
In a CoDA export the frozen layers' matrix products should dominate; routing (TopK, Gather, ScatterND) and
padding masks (Where) are the overhead this shows.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
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
        feeds = random_feeds(batch_size, seq_len)
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


def random_feeds(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    input_ids = np.random.default_rng(0).integers(1000, 20000, (batch_size, seq_len), dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def median_call_seconds(
    onnx_paths: list[str | Path], batch_size: int = 8, seq_len: int = 512, threads: int = 1, calls: int = 12
) -> list[float]:
    """Median wall seconds per call of each graph, timed as `coda bench` times variants: one call of every
    graph per round, in a rotating order, after one untimed call each."""
    import torch

    from coda_adapters.app.bench import time_interleaved
    from coda_adapters.app.onnx_classifier import inference_session, onnx_step

    batch = {name: torch.from_numpy(array) for name, array in random_feeds(batch_size, seq_len).items()}
    # no spinning: a session's threads busy-wait after its call and would slow the next graph's (as in coda bench)
    steps = {
        f"{i}: {p}": onnx_step(inference_session(p, threads, spinning=False), batch) for i, p in enumerate(onnx_paths)
    }
    return [statistics.median(times) for times in time_interleaved(steps, calls, warmup=1).values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", nargs="+", help="ONNX files, e.g. coda export's model.onnx or model.int8.onnx")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    shape = f"{args.batch_size} x {args.seq_len} tokens, {args.threads} thread(s)"
    if len(args.onnx) > 1:
        medians = median_call_seconds(args.onnx, args.batch_size, args.seq_len, args.threads, args.calls)
        print(f"median wall time per call over {args.calls} interleaved rounds ({shape})")
        for path, seconds in zip(args.onnx, medians, strict=True):
            print(f"  {1000 * seconds:8.1f} ms  {medians[0] / seconds:5.2f}x  {path}")
        return
    times = kernel_time_by_operator(args.onnx[0], args.batch_size, args.seq_len, args.threads, args.calls)
    total = sum(times.values())
    print(f"{total:.0f} ms of kernel time per call ({shape})")
    for op, ms in times.items():
        if ms >= total / 1000:
            print(f"  {op:<24} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
