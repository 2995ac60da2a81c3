"""StackedCodaModel: a mixed batch, each example with its own adapter, gives what each adapter gives alone;
models that cannot stack are refused with the reason."""

import pytest
import torch

from coda_adapters import CodaConfig, StackedCodaModel, can_stack, check_stackable, get_coda_model, stack_key

from helpers import padded_batch, randomize_trainable, tiny_model

LENGTHS = [9, 5, 12, 7, 3, 12, 10]  # padded to 12: rows of every adapter have padding
ADAPTER_INDEX = torch.tensor([0, 1, 2, 1, 0, 2, 1])


def coda_models(family="bert", labels=(3, 2, 4), reductions=(3.0, 3.0, 3.0), seed=0, **settings):
    """One CoDA classifier per label count on the same tiny random base (seed), each with random non-zero
    routers, adapters and head (seeds 1, 2, ...)."""
    models = []
    for i, (num_labels, reduction) in enumerate(zip(labels, reductions, strict=True)):
        base = tiny_model(family, head=True, num_labels=num_labels, seed=seed)
        config = CodaConfig(reduction=reduction, **{"bottleneck": 8, "pooling": "mean", **settings})
        model = get_coda_model(base, config)
        randomize_trainable(model, seed=i + 1)
        models.append(model.eval())
    return models


def run_mixed_and_alone(models, lengths=LENGTHS, adapter_index=ADAPTER_INDEX):
    """Logits and routing traces of the stacked model on the mixed batch, and of each model on its rows alone."""
    ids, mask = padded_batch(lengths, max(lengths))
    stacked = StackedCodaModel(models)
    with torch.no_grad():
        mixed = stacked(input_ids=ids, attention_mask=mask, adapter_index=adapter_index).logits
        trace = stacked.routing_trace()
        alone = {}
        for a, model in enumerate(models):
            rows = (adapter_index == a).nonzero().squeeze(1)
            alone[a] = rows, model(input_ids=ids[rows], attention_mask=mask[rows]).logits, model.routing_trace()
    return mixed, trace, alone


def selected_positions(trace_rows):
    return [sorted(p for p in row.tolist() if p >= 0) for row in trace_rows]


@pytest.mark.parametrize(
    "family, settings",
    [
        ("bert", dict(pooling="mean", adapter="parallel")),
        ("bert", dict(pooling="routed_mean")),  # the pooled tokens and weights are each example's own router's
        ("bert", dict(router_position_bins=4)),  # each router's own position bias
        ("bert", dict(keep_first=2, keep_last=1, share_selection=True)),  # one router per adapter, kept ends
        ("bert", dict(pooling="cls", adapter="series", dense_layers=[1])),
        ("roberta", dict(pooling="mean")),  # a two-linear head reading the pooled states as its first token
        ("llama", dict(pooling="cls")),  # the score head on every token, read at the last one (always routed)
        ("bert", dict(modules_to_save=["classifier", "query"])),  # trained linears inside the frozen layers
    ],
)
def test_a_mixed_batch_gives_each_example_what_its_adapter_gives_alone(family, settings):
    models = coda_models(family, **settings)
    mixed, trace, alone = run_mixed_and_alone(models)
    assert mixed.shape == (len(LENGTHS), 4)
    for a, (rows, logits, own_trace) in alone.items():
        num_labels = logits.shape[-1]
        assert (mixed[rows, :num_labels] - logits).abs().max() <= 1e-5, a
        assert torch.all(mixed[rows, num_labels:] == float("-inf"))  # softmax: probability 0
        assert torch.allclose(mixed[rows, :num_labels].softmax(-1), mixed[rows].softmax(-1)[:, :num_labels])
        assert own_trace.keys() == trace.keys()
        for layer in trace:
            assert selected_positions(trace[layer][rows]) == selected_positions(own_trace[layer]), (a, layer)


def test_the_adapters_really_differ_so_the_comparison_means_something():
    """Each example routed and classified by another adapter would give other logits and selections."""
    models = coda_models()
    mixed, trace, _ = run_mixed_and_alone(models)
    other, other_trace, _ = run_mixed_and_alone(models, adapter_index=(ADAPTER_INDEX + 1) % 3)
    assert (mixed[:, :2] - other[:, :2]).abs().max() > 1e-2
    assert any(selected_positions(trace[layer]) != selected_positions(other_trace[layer]) for layer in trace)


def test_adapters_at_different_reductions_route_each_example_at_its_own():
    models = coda_models(reductions=(3.0, 1.0, 2.0))
    mixed, trace, alone = run_mixed_and_alone(models)
    for a, (rows, logits, own_trace) in alone.items():
        assert (mixed[rows, : logits.shape[-1]] - logits).abs().max() <= 1e-5, a
        selected = selected_positions(trace[0][rows])
        assert selected == selected_positions(own_trace[0]), a
        want = [-(-LENGTHS[row] // int(models[a].reduction)) for row in rows.tolist()]  # k = ceil(n / r)
        assert [len(positions) for positions in selected] == want, a


def test_the_stacked_model_shares_the_frozen_weights_and_leaves_the_models_unchanged():
    models = coda_models()
    before = {name: p.clone() for name, p in models[1].state_dict().items()}
    stacked = StackedCodaModel(models)
    frozen = {p.data_ptr() for p in models[0].parameters() if not p.requires_grad}
    stacked_storage = {p.data_ptr() for p in stacked.parameters()}
    routers = {p.data_ptr() for name, p in models[0].named_parameters() if name.endswith("router.weight")}
    assert frozen - routers <= stacked_storage
    assert not {p.data_ptr() for p in models[0].parameters() if p.requires_grad} & stacked_storage
    assert all(torch.equal(before[name], p) for name, p in models[1].state_dict().items())
    ids, mask = padded_batch(LENGTHS, 12)
    with torch.no_grad():  # the originals still run alone, with their own routers
        stacked(input_ids=ids, attention_mask=mask, adapter_index=ADAPTER_INDEX)
        models[1](input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(bottleneck=16), "differ in bottleneck"),
        (dict(adapter="series"), "differ in adapter"),
        (dict(activation="gelu"), "differ in activation"),
        (dict(pooling="cls"), "differ in pooling"),
        (dict(layers=[0]), "differ in layers"),
        (dict(epsilon=0.5), "differ in epsilon"),
        (dict(lora_rank=4), "LoRA"),
        (
            dict(modules_to_save=["classifier", "query"]),
            "differ in trainable parameters.*query.weight: absent in model 0",
        ),
        (dict(seed=7), "frozen base weights differ"),  # another random base
    ],
)
def test_models_that_cannot_stack_are_refused_naming_what_differs(change, message):
    first = coda_models(labels=(3,), reductions=(3.0,))
    models = first + coda_models(labels=(2,), reductions=(5.0,), **change)  # labels and r may differ
    with pytest.raises(ValueError, match=message):
        check_stackable(models)
    with pytest.raises(ValueError, match=message):
        StackedCodaModel(models)
    assert not can_stack(models)


def test_models_that_stack_have_equal_keys_whatever_their_labels_and_reductions():
    first, second = coda_models(labels=(3, 5), reductions=(3.0, 5.0))
    assert can_stack([first, second]) and stack_key(first) == stack_key(second)
    assert hash(stack_key(first)) == hash(stack_key(second))
    (other_bottleneck,) = coda_models(labels=(3,), reductions=(3.0,), bottleneck=16)
    assert stack_key(first) != stack_key(other_bottleneck)


def test_only_coda_models_stack():
    (model,) = coda_models(labels=(3,), reductions=(3.0,))
    with pytest.raises(ValueError, match="only CodaModels stack; model 1 is a BertForSequenceClassification"):
        check_stackable([model, model.model])


def test_a_trainable_module_without_a_stacked_form_is_refused():
    models = coda_models(labels=(3, 3), reductions=(3.0, 3.0), modules_to_save=["classifier", "LayerNorm"])
    with pytest.raises(ValueError, match="LayerNorm.*only routers and nn.Linear"):
        check_stackable(models)


def test_the_adapter_index_is_checked():
    stacked = StackedCodaModel(coda_models())
    ids, mask = padded_batch(LENGTHS, 12)
    bad = [
        (torch.tensor([0, 1]), "adapter_index has 2 entries"),
        (torch.tensor([0, 1, 2, 3, 0, 1, 2]), "values must be in 0..2"),
        (torch.tensor([-1, 0, 0, 0, 0, 0, 0]), "values must be in 0..2"),
        (torch.zeros(7), "integer tensor"),
    ]
    for index, message in bad:
        with pytest.raises(ValueError, match=message):
            stacked(input_ids=ids, attention_mask=mask, adapter_index=index)
    with pytest.raises(ValueError, match="no loss"):
        stacked(input_ids=ids, attention_mask=mask, adapter_index=ADAPTER_INDEX, labels=torch.zeros(7).long())
    # a failed call leaves nothing behind: the next one runs
    with torch.no_grad():
        stacked(input_ids=ids, attention_mask=mask, adapter_index=ADAPTER_INDEX)
    assert stacked.stack_state.adapter_index is None
