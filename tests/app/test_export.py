"""`coda export`: the ONNX graph keeps the routing and matches PyTorch on batches it was not traced on."""

import json
import shutil

import onnx  # the app extra installs onnx and onnxruntime: a missing one fails here, it is not skipped
import pytest
import torch

from coda_adapters.app import export
from coda_adapters.app.classify import Encoded, evaluate, load_classifier, predict_probabilities
from coda_adapters.app.data import LabelledTexts
from coda_adapters.app.export import ExportCheckError, compare_speed, export_onnx
from coda_adapters.app.onnx_classifier import OnnxClassifier, evaluate_onnx
from coda_adapters.app.onnx_tracing import traceable_routing

from helpers import load_example, padded_batch, save_tiny_base, save_tiny_classifier

LABELS = ["a", "b", "c"]
# lengths from 2 tokens ("" is [CLS] [SEP]) to past max_length (64), none batched as the export traced them
TEXTS = [
    "",
    "ok",
    "markets fell",
    "the central bank left interest rates unchanged on thursday",
    "a late goal settled the derby in front of a record crowd at the stadium",
    "word " * 100,
    "new phone, new chip, same price",
    "the film festival opened with a documentary about the history of jazz in new orleans and chicago",
    "votes",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("export") / "base")


@pytest.fixture(scope="module")
def classifier_dir(base_dir):
    """Mean pooling, as `coda train` configures it."""
    return save_tiny_classifier(base_dir, base_dir.parent / "clf", LABELS, max_length=64, pooling="mean")


@pytest.fixture(scope="module")
def exported(classifier_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "onnx"
    report = export_onnx(classifier_dir, out, quantize_int8=True)
    return out, report


@pytest.fixture(scope="module")
def pytorch(classifier_dir):
    return load_classifier(classifier_dir)


def torch_probabilities(pytorch, texts, batch_size):
    model, tokenizer, task = pytorch
    return predict_probabilities(model, Encoded(tokenizer, texts, None, task["max_length"]), batch_size)[0]


@pytest.mark.parametrize("batch_size", [1, 4, len(TEXTS)])
def test_onnx_probabilities_equal_pytorch_on_other_batch_sizes_and_lengths(exported, pytorch, batch_size):
    out, _ = exported
    onnx_probabilities = OnnxClassifier(out).predict_probabilities(TEXTS, batch_size)
    assert onnx_probabilities.shape == (len(TEXTS), len(LABELS))
    assert (onnx_probabilities - torch_probabilities(pytorch, TEXTS, batch_size)).abs().max() <= 1e-3


def test_ragged_padded_batch_equals_pytorch_row_by_row(exported, pytorch):
    """Rows of 1, 2, 17, 40 and 64 valid tokens in one batch: each row gets its own k, empty slots are masked."""
    model = pytorch[0]
    lengths = [17, 2, 64, 1, 40]
    ids, mask = padded_batch(lengths, 64, seed=3)
    ids = ids * 50 + 1000  # ordinary word pieces of the real vocabulary
    got = OnnxClassifier(exported[0]).predict_logits(ids, mask).softmax(-1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
        alone = torch.cat([model(input_ids=ids[i : i + 1, :n]).logits.softmax(-1) for i, n in enumerate(lengths)])
    assert (got - want).abs().max() <= 1e-3
    assert (got - alone).abs().max() <= 1e-3


def test_graph_routes_with_topk_and_has_dynamic_int64_inputs(exported):
    graph = onnx.load(exported[0] / "model.onnx").graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("TopK") >= 2  # the router's top-k in each of the two routed layers
    # the frozen layers' updates come back as whole-row scatters that sum (empty slots point at [CLS])
    scatters = [n for n in graph.node if n.op_type == "ScatterND"]
    assert len(scatters) == 2 and all(
        any(a.name == "reduction" and a.s == b"add" for a in n.attribute) for n in scatters
    )
    # traced with eager attention: no NaN guard on the attention probabilities, as torch's SDPA exports with
    producer = {output: node.op_type for node in graph.node for output in node.output}
    assert ops.count("Softmax") >= 2
    assert not [n for n in graph.node if n.op_type == "IsNaN" and producer.get(n.input[0]) == "Softmax"]
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    [output] = graph.output
    assert output.name == "logits"
    assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert output.type.tensor_type.shape.dim[1].dim_value == len(LABELS)


def test_export_directory_is_deployable_on_its_own(exported, tmp_path):
    out, report = exported
    copy = shutil.copytree(out, tmp_path / "elsewhere")
    names = {p.name for p in copy.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "coda_task.json", "coda_export.json", "tokenizer.json"} <= names
    assert not any(name.startswith(".coda-export-") for name in names)  # no staging left behind
    classifier = OnnxClassifier(copy)
    assert classifier.label_names == LABELS and classifier.max_length == 64
    assert classifier.predict_probabilities([], 4).shape == (0, 3)
    assert report["check"]["max_probability_difference"] <= 1e-3
    assert report["check"]["batch_shapes"][0] == [len(export.CHECK_TEXTS), 64]
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}


def test_onnx_runtime_fuses_every_frozen_and_adapter_matrix_of_the_int8_graph(exported, pytorch):
    """examples/onnx_fused_ops.py: each of the 6 frozen matrices per layer and each adapter matrix runs as a
    fused int8 product; the routers stay float32 (their scores pick the tokens)."""
    example = load_example("onnx_fused_ops")
    model = pytorch[0]
    layers = model.model.config.num_hidden_layers
    adapter_matrices = [name for name, m in model.named_modules() if ".adapter." in name and hasattr(m, "weight")]
    assert adapter_matrices  # the tiny classifier has adapters
    int8 = example.optimised_operator_counts(exported[0] / "model.int8.onnx")
    assert int8["DynamicQuantizeMatMul"] + int8["MatMulIntegerToFloat"] == 6 * layers + len(adapter_matrices)
    quantized = onnx.load(exported[0] / "model.int8.onnx").graph
    floats = {i.name for i in quantized.initializer if i.data_type == onnx.TensorProto.FLOAT}
    routers = [n for n in quantized.node if n.op_type == "MatMul" and "/router/" in n.name]
    routed = [layer for layer in model.conditional_layers().values() if layer.router is not None]
    assert len(routers) == len(routed) and all(n.input[1] in floats for n in routers)
    float_graph = example.optimised_operator_counts(exported[0] / "model.onnx")
    assert float_graph["DynamicQuantizeMatMul"] + float_graph["MatMulIntegerToFloat"] == 0


def test_every_weight_product_of_the_graph_is_a_matrix_product(exported):
    """No MatMul with a 1-D weight (the router's scores): ONNX Runtime ran one 8x slower than the same
    product with a one-column weight (0.25 against 2.1 ms at 8 x 512 x 384), 9% of an int8 graph's time."""
    graph = onnx.load(exported[0] / "model.onnx").graph
    weights = {initializer.name: initializer for initializer in graph.initializer}
    products = [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    assert [node.name for node in products if "/router/" in node.name]  # the routers' scores are among them
    assert all(len(weights[node.input[1]].dims) == 2 for node in products)


def test_the_profile_example_times_the_routed_graphs_operators(exported):
    """examples/onnx_profile.py: kernel time per operator type, with the routing's scatter among them."""
    times = load_example("onnx_profile").kernel_time_by_operator(exported[0] / "model.onnx", 2, 32, calls=2)
    assert times["MatMul"] > 0 and times["ScatterND"] > 0
    assert list(times.values()) == sorted(times.values(), reverse=True)


def test_the_profile_example_times_several_graphs_side_by_side(exported):
    """examples/onnx_profile.py with several graphs: one median per graph, in the order given."""
    paths = [exported[0] / "model.onnx", exported[0] / "model.int8.onnx"]
    medians = load_example("onnx_profile").median_call_seconds(paths, 2, 32, calls=2)
    assert len(medians) == 2 and all(0 < seconds < 10 for seconds in medians)


def test_int8_model_is_written_and_agrees_on_most_argmaxes(exported, pytorch):
    out, report = exported
    assert report["int8"]["onnx"] == "model.int8.onnx"
    assert 0 <= report["int8"]["max_probability_difference"] < 0.2
    int8 = OnnxClassifier(out, int8=True).predict_probabilities(TEXTS, 4)
    agreement = (int8.argmax(-1) == torch_probabilities(pytorch, TEXTS, 4).argmax(-1)).float().mean()
    assert agreement >= 0.75


def test_evaluate_onnx_gives_the_pytorch_metrics(exported, pytorch):
    model, tokenizer, task = pytorch
    data = LabelledTexts(TEXTS, [i % 3 for i in range(len(TEXTS))])
    want = evaluate(model, tokenizer, data, LABELS, task["max_length"], 4)
    got = evaluate_onnx(OnnxClassifier(exported[0]), data, 4)
    for key in ("accuracy", "macro_f1", "confusion_matrix", "eval_examples"):
        assert got[key] == want[key]
    assert got["eval_examples_per_second"] > 0


def test_export_friendly_routing_computes_what_the_library_computes(pytorch):
    """The equivalents swapped in while tracing must not drift from the library's functions."""
    model = pytorch[0]
    ids, mask = padded_batch([9, 3, 1, 12], 12, seed=5)
    ids = ids * 50 + 1000
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with traceable_routing():
            got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_a_difference_from_pytorch_is_an_error_and_writes_nothing(classifier_dir, tmp_path, monkeypatch):
    original = export.torch_probabilities
    monkeypatch.setattr(export, "torch_probabilities", lambda *args: original(*args).roll(1, dims=-1))
    with pytest.raises(ExportCheckError, match="differs from PyTorch: max .probability difference"):
        export_onnx(classifier_dir, tmp_path / "out", opset=18)
    assert list((tmp_path / "out").iterdir()) == []


def test_cls_pooling_and_another_opset_export_and_pass_their_check(base_dir, tmp_path):
    clf = save_tiny_classifier(base_dir, tmp_path / "clf", LABELS, seed=1, max_length=64, pooling="cls")
    report = export_onnx(clf, tmp_path / "out", opset=18, check_texts=TEXTS)
    assert report["opset"] == 18 and report["int8"] is None
    assert report["check"]["max_probability_difference"] <= 1e-3
    assert not (tmp_path / "out" / "model.int8.onnx").exists()


def test_missing_or_corrupt_adapter_directory_is_a_clear_value_error(classifier_dir, tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        export_onnx(tmp_path / "nowhere", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="coda_task.json: no such file"):
        export_onnx(empty, tmp_path / "out")
    corrupt = shutil.copytree(classifier_dir, tmp_path / "corrupt")
    (corrupt / "coda_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors"):
        export_onnx(corrupt, tmp_path / "out")
    with pytest.raises(ValueError, match="opset must be an int from 16 to 20"):
        export_onnx(classifier_dir, tmp_path / "out", opset=11)
    with pytest.raises(ValueError, match="no such file .export with `coda export --int8`"):
        OnnxClassifier(tmp_path / "empty", int8=True)


def test_compare_speed_times_pytorch_and_onnxruntime_side_by_side(classifier_dir, exported):
    report = compare_speed(classifier_dir, exported[0], seq_len=256, batch_size=2, repeats=2, warmup=1, threads=1)
    assert set(report["latency_ms"]) == {"pytorch", "onnxruntime", "onnxruntime int8"}
    assert all(value > 0 for value in report["latency_ms"].values())
    assert set(report["speedup_vs_pytorch"]) == {"onnxruntime", "onnxruntime int8"}
    assert all(value > 0 for value in report["speedup_vs_pytorch"].values())


@pytest.mark.slow
def test_minilm_classifier_exports_within_tolerance(minilm_path, tmp_path):
    """The real MiniLM (6 layers, hidden 384, 512 positions) with a random adapter: wider router scores."""
    clf = save_tiny_classifier(minilm_path, tmp_path / "clf", LABELS, max_length=512, pooling="mean")
    report = export_onnx(clf, tmp_path / "out", quantize_int8=True)
    assert report["check"]["max_probability_difference"] <= 1e-3
    assert report["check"]["batch_shapes"][0] == [len(export.CHECK_TEXTS), 512]
    assert report["int8"]["argmax_agreement"] >= 0.5
    # a padded batch of short and 512-token rows, on two threads: with two updates to one row (every empty slot
    # at position 0) ONNX Runtime's ScatterND lost one at random, in about 3 of 8 runs by up to 0.004
    onnx = OnnxClassifier(tmp_path / "out", threads=2)
    runs = torch.stack(
        [onnx.predict_probabilities(list(export.CHECK_TEXTS), len(export.CHECK_TEXTS)) for _ in range(8)]
    )
    assert (runs - runs[0]).abs().max() <= 1e-5


def test_coda_export_and_eval_with_onnxruntime_from_the_command_line(classifier_dir, tmp_path, capsys):
    from coda_adapters.app.cli import main

    out = tmp_path / "export"
    assert main(["export", "--adapter", str(classifier_dir), "--out", str(out)]) == 0
    assert "max probability difference" in capsys.readouterr().out
    data = tmp_path / "test.csv"
    data.write_text("text,label\n" + "".join(f"some text number {i},{LABELS[i % 3]}\n" for i in range(12)))
    runs = {}
    for runtime, adapter in (("pytorch", classifier_dir), ("onnxruntime", out)):
        metrics = tmp_path / f"{runtime}.json"
        argv = ["eval", "--adapter", str(adapter), "--data", str(data), "--runtime", runtime, "--json", str(metrics)]
        assert main(argv) == 0
        runs[runtime] = json.loads(metrics.read_text())
    assert runs["onnxruntime"]["confusion_matrix"] == runs["pytorch"]["confusion_matrix"]
    bf16 = ["eval", "--adapter", str(out), "--data", str(data), "--runtime", "onnxruntime", "--quantize", "bf16"]
    assert main(bf16) == 2
    assert "--quantize bf16 runs on --runtime pytorch only" in capsys.readouterr().err
    assert main(["export", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "settings",
    [
        dict(pooling="routed_mean"),  # reads the last router's selection and λ: both must be in the graph
        dict(pooling="mean", router_position_bins=4),  # the bins come from each batch's attention mask
        dict(pooling="mean", keep_first=3, keep_last=2, share_selection=True),  # kept ends can raise k per row
    ],
)
def test_routing_options_export_and_equal_pytorch_on_a_ragged_batch(base_dir, tmp_path, settings):
    clf = save_tiny_classifier(base_dir, tmp_path / "clf", LABELS, max_length=64, **settings)
    report = export_onnx(clf, tmp_path / "onnx")
    assert report["check"]["max_probability_difference"] <= 1e-3
    model = load_classifier(clf)[0]
    lengths = [17, 2, 64, 1, 40]
    ids, mask = padded_batch(lengths, 64, seed=4)
    ids = ids * 50 + 1000
    got = OnnxClassifier(tmp_path / "onnx").predict_logits(ids, mask).softmax(-1)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)
    assert (got - want).abs().max() <= 1e-3


def test_eager_attention_is_only_for_the_trace(classifier_dir):
    model = load_classifier(classifier_dir)[0]
    before = model.model.config._attn_implementation
    with export.eager_attention(model):
        assert model.model.config._attn_implementation == "eager"
    assert model.model.config._attn_implementation == before == "sdpa"


def test_the_mask_ab_example_exports_transformers_mask_as_a_larger_graph_and_restores_ours(
    classifier_dir, exported, tmp_path
):
    """examples/routed_mask_ab.py: the `old/` export really has transformers' [batch, 1, k, k] mask (more nodes),
    passes the export's check against PyTorch, and the binding's own mask is back afterwards."""
    from coda_adapters.bindings import bert

    example, ours = load_example("routed_mask_ab"), bert.selected_keys_mask
    with example.transformers_mask():
        assert bert.selected_keys_mask is not ours
        export_onnx(classifier_dir, tmp_path / "old")
    assert bert.selected_keys_mask is ours
    old_nodes = len(onnx.load(str(tmp_path / "old" / "model.onnx")).graph.node)
    assert old_nodes > len(onnx.load(str(exported[0] / "model.onnx")).graph.node)
