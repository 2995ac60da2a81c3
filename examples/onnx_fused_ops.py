"""What ONNX Runtime makes of an exported graph: the operators of its optimised form, counted.

    python examples/onnx_fused_ops.py export/bbc-r3/model.int8.onnx

ONNX Runtime rewrites a graph when a session loads it (``ORT_ENABLE_ALL``: constant folding, layer-norm
and GELU fusion, int8 matrix products fused with their quantisation). The counts tell whether the frozen
matrices of an int8 export run as fused ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` kernels and
whether attention became one ``Attention`` node.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

FUSED = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger", "Attention", "FusedMatMul", "MatMul")


def optimised_operator_counts(onnx_path: str | Path, threads: int = 1) -> collections.Counter[str]:
    """Operator counts of the graph ONNX Runtime runs for ``onnx_path`` (CPU, every optimisation on)."""
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as directory:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(directory) / "optimised.onnx")
        options.intra_op_num_threads = threads
        onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="an ONNX file, e.g. coda export's model.onnx or model.int8.onnx")
    counts = optimised_operator_counts(parser.parse_args().onnx)
    print(f"{sum(counts.values())} nodes after ONNX Runtime's optimisations")
    for name in FUSED:
        print(f"  {name}: {counts.get(name, 0)}")


if __name__ == "__main__":
    main()
