"""CodaModel on BERT-like text models and MiniLM: equivalences with independent dense computations, routing,
training, pooling. (What every family must satisfy is in test_family_invariants.py.)"""

import copy
import math

import pytest
import torch
from transformers.masking_utils import create_bidirectional_mask

from coda_adapters import CodaConfig, get_coda_model, soft_topk

from helpers import (
    ATTENTION,
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens,
    dense_with_hand_adapters,
    padded_batch,
    random_ids,
    randomize_trainable,
    tiny_model,
)


def test_reduction_one_equals_dense_parallel_adapter_on_minilm(minilm, minilm_tokenizer):
    dense, plain = copy.deepcopy(minilm), copy.deepcopy(minilm)
    coda = get_coda_model(minilm, CodaConfig(reduction=1))
    randomize_trainable(coda, std=0.05)
    dense_with_hand_adapters(dense, coda)
    batch = minilm_tokenizer(
        ["A man is eating food.", "Conditional adapters make fine-tuned transformers fast at inference time."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        got = coda(**batch).last_hidden_state
        want = dense(**batch).last_hidden_state
        frozen = plain(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert (got - want)[valid].abs().max() <= 1e-5
    assert (want - frozen)[valid].abs().max() > 1e-2  # the adapters do matter


def test_fresh_adapters_at_reduction_one_equal_the_frozen_base_model(minilm, minilm_tokenizer):
    base = copy.deepcopy(minilm)
    coda = get_coda_model(minilm, CodaConfig(reduction=1))
    batch = minilm_tokenizer(["The cat sat on the mat.", "A short one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = coda(**batch).last_hidden_state, base(**batch).last_hidden_state
    assert (got - want)[batch["attention_mask"].bool()].abs().max() <= 1e-5


def test_padding_invariance_on_minilm(minilm, minilm_tokenizer):
    coda = get_coda_model(minilm, CodaConfig(reduction=3))
    randomize_trainable(coda, std=0.05)
    texts = ["Short text here.", "A much longer sentence that forces padding onto the first example in the batch."]
    batch = minilm_tokenizer(texts, padding=True, return_tensors="pt")
    alone = minilm_tokenizer(texts[:1], return_tensors="pt")
    with torch.no_grad():
        together = coda(**batch).last_hidden_state
        single = coda(**alone).last_hidden_state
    length = alone["input_ids"].shape[1]
    assert (together[0, :length] - single[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("attn", ATTENTION)
def test_routed_layer_computes_the_frozen_layer_on_the_selected_tokens_only(attn, straight_through):
    base = tiny_model("bert", attn=attn)
    frozen_layer = copy.deepcopy(base.encoder.layer[0])
    config = CodaConfig(reduction=3, bottleneck=8, epsilon=0.5, straight_through=straight_through)
    coda = get_coda_model(base, config)
    randomize_trainable(coda)

    def frozen_on_selected(x_sel, positions):
        return frozen_layer(x_sel, create_bidirectional_mask(base.config, x_sel, torch.ones(1, len(positions))))

    ids, mask = padded_batch([15, 9], 15)
    assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected)
    selection = coda.routing_state.selections[0]
    whole_update = torch.equal(selection.weights, selection.slot_mask.float())
    assert whole_update == straight_through  # straight-through: every selected token gets λ = 1


def test_output_hidden_states_have_full_length_for_every_layer():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=4, bottleneck=8))
    ids, mask = padded_batch([12, 12], 12)
    with torch.no_grad():
        out = coda(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert all(h.shape == (2, 12, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_routing_trace_lists_sorted_positions_padded_with_minus_one():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, bottleneck=8))
    ids, mask = padded_batch([12, 4], 12)
    with torch.no_grad():
        coda(input_ids=ids, attention_mask=mask)
    trace = coda.routing_trace()
    assert sorted(trace) == [0, 1]
    for positions in trace.values():
        assert positions.dtype == torch.long and positions.shape == (2, 4)
        assert positions[0, 0] == 0 and positions[1, 0] == 0  # [CLS] kept
        assert (positions[1, 2:] == -1).all() and (positions[1, :2] >= 0).all()


def test_the_reduction_can_change_between_forwards_but_not_below_one():
    model = get_coda_model(tiny_model("bert"), CodaConfig(reduction=4))
    ids = random_ids(2, 12)
    model(input_ids=ids)
    assert model.reduction == 4.0 and model.routing_trace()[0].shape == (2, 3)
    model.reduction = 2
    model(input_ids=ids)
    assert model.routing_trace()[0].shape == (2, 6) and model.coda_config.reduction == 4.0  # the saved setting stays
    with pytest.raises(ValueError, match="reduction must be a finite number >= 1, got 0.5"):
        model.reduction = 0.5
    assert model.reduction == 2.0


def test_the_epsilon_can_change_between_forwards_and_back_but_not_to_zero():
    """Every router follows the model's epsilon (the soft top-k weights scale what the frozen layer adds), the
    saved setting stays, and the configured value gives the first output back exactly."""
    model = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, epsilon=0.1)).eval()
    ids, mask = padded_batch([12, 9], 12)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.epsilon = 2.0
        softer = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert {layer.router.epsilon for layer in model.conditional_layers().values()} == {2.0}
        assert model.epsilon == 2.0 and model.coda_config.epsilon == 0.1
        assert not torch.allclose(first, softer, atol=1e-4)
        model.epsilon = 0.1
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, first)
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0, got 0"):
        model.epsilon = 0
    assert model.epsilon == 0.1


def test_keep_pooled_token_false_lets_the_router_drop_cls():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=4, keep_pooled_token=False))
    router = coda.conditional_layers()[0].router
    with torch.no_grad():
        router.weight.copy_(-coda.model.embeddings.word_embeddings.weight[5])  # any fixed direction
        ids = random_ids(16, 12)
        coda(input_ids=ids)
    assert (coda.routing_trace()[0][:, 0] != 0).any()


def test_only_routers_adapters_and_head_train():
    coda = get_coda_model(tiny_model("bert", head=True), CodaConfig(reduction=3, bottleneck=8))
    trainable = {name for name, p in coda.named_parameters() if p.requires_grad}
    assert all(".router." in n or ".adapter." in n or "classifier" in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"router", "down", "up", "classifier"}
    randomize_trainable(coda)
    coda.train()
    ids, mask = padded_batch([12, 8, 10], 12)
    coda(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is None for p in coda.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in coda.parameters() if p.requires_grad)


def test_every_router_gets_a_gradient_from_a_token_level_loss():
    # (with a [CLS]-pooled head, the last layer's router gets none: only [CLS], always kept, is read)
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, bottleneck=8, epsilon=1.0))
    randomize_trainable(coda)
    ids, mask = padded_batch([12, 8, 10], 12)
    hidden = coda(input_ids=ids, attention_mask=mask).last_hidden_state
    (hidden * torch.randn_like(hidden)).sum().backward()
    for layer in coda.conditional_layers().values():
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_router_z_loss_squares_the_logsumexp_of_each_layers_router_scores_over_its_input():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, bottleneck=8))
    randomize_trainable(coda)
    lengths = [12, 8, 10]
    ids, mask = padded_batch(lengths, 12)
    coda.train()
    out = coda(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():  # hidden_states[i] is layer i's input; the loss is the mean over layers and examples
        per_layer = [
            torch.stack([torch.logsumexp(out.hidden_states[i][row, :n] @ layer.router.weight, 0) for row, n in
                         enumerate(lengths)]).square().mean()
            for i, layer in coda.conditional_layers().items()
        ]  # fmt: skip
    torch.testing.assert_close(coda.router_z_loss(), torch.stack(per_layer).mean())
    coda.eval()
    with torch.no_grad():
        coda(input_ids=ids, attention_mask=mask)
    assert coda.router_z_loss().item() == 0.0  # a training term: evaluation computes none


def test_random_router_has_no_trainable_weight_and_changes_its_choice():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, router="random"))
    assert not any(".router." in n for n, p in coda.named_parameters() if p.requires_grad)
    ids = random_ids(4, 30)
    traces = []
    with torch.no_grad():
        for _ in range(2):
            coda(input_ids=ids)
            traces.append(coda.routing_trace()[0])
    assert not torch.equal(traces[0], traces[1])


def test_layers_option_converts_only_those_layers():
    coda = get_coda_model(tiny_model("bert", num_hidden_layers=3), CodaConfig(layers=[1]))
    assert list(coda.conditional_layers()) == [1]
    with torch.no_grad():
        coda(input_ids=random_ids(2, 9))
    assert list(coda.routing_trace()) == [1]


def test_dense_layers_run_every_token_with_their_adapter_and_leave_no_trace():
    base = tiny_model("bert", num_hidden_layers=3)
    reference = copy.deepcopy(base)
    coda = get_coda_model(base, CodaConfig(reduction=3, dense_layers=[0, 2]))
    randomize_trainable(coda)
    assert [name for name, p in coda.named_parameters() if ".router." in name] == [
        "model.encoder.layer.1.router.weight"
    ]
    ids, mask = padded_batch([12, 9], 12)
    with torch.no_grad():
        got = coda(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        dense_with_hand_adapters(reference, coda)  # F(x) + A(x) at every layer, the hand-written adapter
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    valid = mask.bool()
    torch.testing.assert_close(got[1][valid], expected[1][valid], atol=1e-5, rtol=0)  # layer 0: dense
    assert not torch.allclose(got[2][valid], expected[2][valid], atol=1e-3)  # layer 1 routes a third of them
    assert list(coda.routing_trace()) == [1]


def test_shared_selection_runs_the_first_routed_layers_tokens_and_weights_in_every_routed_layer():
    """One router (the first routed layer's, after the dense ones); each later layer computes
    x + λ (F(x_sel) - x_sel) + A(x) on its tokens with its λ."""
    base = tiny_model("bert", num_hidden_layers=4)
    frozen_layer = copy.deepcopy(base.encoder.layer[3])
    config = CodaConfig(reduction=3, bottleneck=8, epsilon=1.0, dense_layers=[0], share_selection=True)
    coda = get_coda_model(base, config)
    randomize_trainable(coda)
    assert [name for name, p in coda.named_parameters() if ".router." in name] == [
        "model.encoder.layer.1.router.weight"
    ]
    ids, mask = padded_batch([12, 9], 12)
    hidden = coda(input_ids=ids, attention_mask=mask).last_hidden_state
    traces, selections = coda.routing_trace(), coda.routing_state.selections
    assert list(traces) == [1, 2, 3] and all(torch.equal(traces[1], traces[i]) for i in (2, 3))
    assert all(torch.equal(selections[1].weights, selections[i].weights) for i in (2, 3))
    (hidden * torch.randn_like(hidden)).sum().backward()
    assert coda.conditional_layers()[1].router.weight.grad.abs().sum() > 0

    def frozen_on_selected(x_sel, positions):
        return frozen_layer(x_sel, create_bidirectional_mask(base.config, x_sel, torch.ones(1, len(positions))))

    assert_layer_runs_the_frozen_layer_on_the_selected_tokens(coda, ids, mask, frozen_on_selected, layer=3)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_kept_first_and_last_tokens_are_always_routed_and_can_raise_k(padding):
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=4, keep_first=3, keep_last=2))
    randomize_trainable(coda)
    ids, mask = padded_batch([20, 16, 4], 20)
    if padding == "left":
        mask = mask.flip(-1)
    with torch.no_grad():
        coda(input_ids=ids, attention_mask=mask)
    for positions in coda.routing_trace().values():
        for row, length in enumerate([20, 16, 4]):
            real = mask[row].nonzero().flatten().tolist()
            kept = [p for p in positions[row].tolist() if p >= 0]
            must = set(real[:3]) | set(real[-2:])
            assert must <= set(kept) and set(kept) <= set(real)
            assert len(kept) == max(-(-length // 4), len(must))  # 5, 5 (4 + 1 raised), 4 (all of them)


def test_dense_layers_must_be_converted_layers():
    with pytest.raises(ValueError, match=r"dense_layers must be indices among layers \[1, 2\], got \[0\]"):
        CodaConfig(layers=[1, 2], dense_layers=[0])
    with pytest.raises(ValueError, match="dense_layers must be None or a list of distinct layer indices"):
        CodaConfig(dense_layers=[1, 1])
    with pytest.raises(ValueError, match=r"dense_layers \[5\] are not among the converted layers \[0, 1\]"):
        get_coda_model(tiny_model("bert"), CodaConfig(dense_layers=[5]))


def test_lora_from_peft_composes_and_acts_on_the_selected_tokens():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3, lora_rank=4))
    lora_names = [n for n, p in coda.named_parameters() if "lora_" in n]
    assert lora_names and all(p.requires_grad for n, p in coda.named_parameters() if "lora_" in n)
    assert any("layer.0.layer.attention.self.query.lora_A" in n for n in lora_names)
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = coda(input_ids=ids).last_hidden_state
        for name, p in coda.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        after = coda(input_ids=ids).last_hidden_state
    assert (after - before).abs().max() > 1e-3


def test_forward_returns_what_the_base_model_returns():
    base = tiny_model("bert", head=True)
    coda = get_coda_model(copy.deepcopy(base), CodaConfig(reduction=2))
    ids = random_ids(2, 10)
    out, ref = coda(input_ids=ids), base(input_ids=ids)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape
    assert coda.config is coda.model.config  # attributes of the base model are reachable


@pytest.mark.slow
def test_reduction_three_is_faster_than_dense_at_512_tokens(minilm_path):
    """A sanity check only, timed side by side and interleaved; `coda bench` is the real benchmark."""
    import time

    from transformers import AutoModel

    models = {r: get_coda_model(AutoModel.from_pretrained(minilm_path).eval(), CodaConfig(reduction=r)) for r in (1, 3)}
    ids = random_ids(4, 512, vocab=30000)
    times = {1: [], 3: []}
    with torch.inference_mode():
        for _ in range(4):
            for r, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[r].append(time.perf_counter() - start)
    best = {r: min(t[1:]) for r, t in times.items()}
    assert best[3] < best[1], best


def test_disable_adapters_gives_the_frozen_base_model_even_with_lora():
    base = tiny_model("bert")
    coda = get_coda_model(copy.deepcopy(base), CodaConfig(reduction=3, lora_rank=4))
    randomize_trainable(coda)
    ids, mask = padded_batch([12, 9], 12)
    with torch.no_grad():
        routed = coda(input_ids=ids, attention_mask=mask).last_hidden_state
        with coda.disable_adapters():
            plain = coda(input_ids=ids, attention_mask=mask).last_hidden_state
        again = coda(input_ids=ids, attention_mask=mask).last_hidden_state
        want = base(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert (plain - want)[valid].abs().max() <= 1e-6
    assert torch.equal(routed, again) and (routed - want)[valid].abs().max() > 1e-3


def test_mean_pooling_feeds_the_head_the_normalised_mean_over_real_tokens():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=2, pooling="mean"))
    ids, mask = padded_batch([12, 5], 12)
    with torch.no_grad():
        out = coda(input_ids=ids, attention_mask=mask)
    for row, length in enumerate([12, 5]):
        mean = out.last_hidden_state[row, :length].mean(0)
        want = (mean - mean.mean()) / torch.sqrt(mean.var(unbiased=False) + 1e-5)
        torch.testing.assert_close(out.pooler_output[row], want)


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_mean_pooling_feeds_heads_that_read_the_first_token_themselves(family):
    """RoBERTa's and MPNet's classifiers read <s> from the last hidden states: they get the pooled mean."""
    coda = get_coda_model(tiny_model(family, head=True), CodaConfig(reduction=2, pooling="mean"))
    randomize_trainable(coda)
    ids, mask = padded_batch([12, 5], 12)
    with torch.no_grad():
        out = coda(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = out.hidden_states[-1]
        head = coda.model.classifier.head
        for row, length in enumerate([12, 5]):
            mean = last[row, :length].mean(0)
            pooled = (mean - mean.mean()) / torch.sqrt(mean.var(unbiased=False) + 1e-5)
            torch.testing.assert_close(out.logits[row], head(pooled[None, None])[0])
    original = coda.unload().classifier
    assert original is head  # unload gives the head back


def test_mean_poolings_need_a_pooler_or_a_first_token_head():
    for pooling in ("mean", "routed_mean"):
        with pytest.raises(ValueError, match="'routed_mean' need a classification model whose head reads a pooler"):
            get_coda_model(tiny_model("llama", head=True), CodaConfig(pooling=pooling))


def test_routed_mean_pooling_weights_the_last_routed_layers_tokens_by_their_soft_topk_weight():
    """The reference: λ recomputed with soft_topk from the last router's scores on that layer's input,
    summed over the positions routing_trace reports, then layer-normalised."""
    config = CodaConfig(reduction=3, pooling="routed_mean", keep_pooled_token=False, epsilon=0.5)
    coda = get_coda_model(tiny_model("bert"), config)
    randomize_trainable(coda)
    lengths = [12, 7]
    ids, mask = padded_batch(lengths, 12)
    with torch.no_grad():
        out = coda(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = max(coda.routing_trace())
        trace = coda.routing_trace()[last]
        router = coda.conditional_layers()[last].router
        layer_input, layer_output = out.hidden_states[-2], out.hidden_states[-1]
        k = torch.tensor([math.ceil(n / 3) for n in lengths])
        lam = soft_topk(layer_input @ router.weight, k, mask=mask.bool(), epsilon=0.5)
    for row in range(len(lengths)):
        positions = trace[row][trace[row] >= 0]
        weights = lam[row, positions].unsqueeze(-1)
        mean = (layer_output[row, positions] * weights).sum(0) / weights.sum()
        want = (mean - mean.mean()) / torch.sqrt(mean.var(unbiased=False) + 1e-5)
        torch.testing.assert_close(out.pooler_output[row], want)
        assert 0 < len(positions) < lengths[row]  # it does leave tokens out


def test_routed_mean_pooling_is_the_mean_pooling_when_nothing_is_routed():
    base = tiny_model("bert")
    ids, mask = padded_batch([12, 5], 12)
    pooled = {}
    for pooling in ("mean", "routed_mean"):
        coda = get_coda_model(copy.deepcopy(base), CodaConfig(reduction=1, pooling=pooling))
        randomize_trainable(coda)
        with torch.no_grad():
            pooled[pooling] = coda(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(pooled["routed_mean"], pooled["mean"])


def test_a_coda_model_can_be_deep_copied():
    coda = get_coda_model(tiny_model("bert"), CodaConfig(reduction=3))
    randomize_trainable(coda)
    twin = copy.deepcopy(coda)
    ids, mask = padded_batch([12, 7], 12)
    with torch.no_grad():
        want = coda(input_ids=ids, attention_mask=mask).last_hidden_state
        got = twin(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)
    assert twin.routing_state is not coda.routing_state
    assert twin.routing_state.padding_mask is not None and torch.equal(twin.routing_trace()[0], coda.routing_trace()[0])
