"""`coda train`'s recipe: the reduction warm-up and what gets saved (a tiny model); distillation from a teacher."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from coda_adapters import CodaConfig, get_coda_model
from coda_adapters.app.classify import (
    Encoded,
    TrainConfig,
    build_classifier,
    distillation_loss,
    load_classifier,
    predict_probabilities,
    pretrained_start_notes,
    teacher_logits,
    train_classifier,
)
from coda_adapters.app.data import ClassificationData, LabelledTexts
from coda_adapters.app.loop import annealed_epsilon, warmed_up_reduction

from helpers import load_example, save_tiny_base, save_tiny_classifier, tiny_model


def test_reduction_warmup_trains_from_dense_to_r_and_validates_and_saves_at_r(tmp_path, minilm_tokenizer):
    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=4)
    )
    texts = [f"document number {i} about topic {i % 3} and more words" for i in range(40)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(40)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    config = TrainConfig(
        epochs=2, min_steps=0, batch_size=8, max_length=16, val_size=0.2, dense_start=0.25, reduction_warmup=0.5
    )
    seen = []  # (training?, reduction) of every forward
    model.model.register_forward_pre_hook(lambda m, a: seen.append((m.training, model.reduction)))
    train_classifier(model, minilm_tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False)

    trained = [r for training, r in seen if training]
    steps = len(trained)  # 32 training texts at batch 8: 4 steps per epoch
    assert steps == 8
    assert trained == pytest.approx([warmed_up_reduction(4.0, step, steps, 0.5, 0.25) for step in range(steps)])
    assert trained[:3] == [1.0, 1.0, 1.0] and trained[-2:] == [4.0, 4.0] and sorted(trained) == trained
    assert {r for training, r in seen if not training} == {4.0}  # validation and test run at the target
    saved = json.loads((tmp_path / "coda_config.json").read_text())["coda_config"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["reduction"] == 4.0 and metrics["reduction"] == 4.0
    assert metrics["train_config"]["reduction_warmup"] == 0.5 and metrics["train_config"]["dense_start"] == 0.25
    with pytest.raises(ValueError, match="--dense-start plus --reduction-warmup must be a finite number <= 1"):
        TrainConfig(dense_start=0.6, reduction_warmup=0.5)


def test_epsilon_start_anneals_the_routers_epsilon_in_training_and_validates_and_saves_at_the_models(
    tmp_path, minilm_tokenizer
):
    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=4, epsilon=0.05)
    )
    texts = [f"document number {i} about topic {i % 3} and more words" for i in range(40)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(40)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    config = TrainConfig(
        epochs=2, min_steps=0, batch_size=8, max_length=16, val_size=0.2, dense_start=0.25, reduction_warmup=0.5,
        epsilon_start=0.8,
    )  # fmt: skip
    seen = []  # (training?, epsilon of every router) of every forward
    routers = [layer.router for layer in model.conditional_layers().values()]
    model.model.register_forward_pre_hook(lambda m, a: seen.append((m.training, {r.epsilon for r in routers})))
    train_classifier(model, minilm_tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False)

    trained = [epsilons for training, epsilons in seen if training]
    assert all(len(epsilons) == 1 for epsilons in trained)  # every router at the same epsilon
    trained = [epsilons.pop() for epsilons in trained]
    assert trained == pytest.approx([annealed_epsilon(0.8, 0.05, step, 8, 0.5, 0.25) for step in range(8)])
    assert trained[0] == 0.8 and trained[-1] == 0.05 and sorted(trained, reverse=True) == trained
    assert all(epsilons == {0.05} for training, epsilons in seen if not training)  # validation and test
    assert model.epsilon == 0.05
    assert json.loads((tmp_path / "coda_config.json").read_text())["coda_config"]["epsilon"] == 0.05
    with pytest.raises(ValueError, match="--epsilon-start anneals over the reduction warm-up: set --reduction-warmup"):
        TrainConfig(epsilon_start=0.5, reduction_warmup=0.0)
    with pytest.raises(ValueError, match="--epsilon-start must be"):
        TrainConfig(epsilon_start=0.0)


def test_router_z_loss_weight_shrinks_the_router_scores_it_is_trained_with(tmp_path, minilm_tokenizer):
    """The same seed and data with and without --router-z-loss: the weighted run ends with a smaller z-loss."""
    texts = [f"document number {i} about topic {i % 3} and more words" for i in range(32)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(32)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    batch = minilm_tokenizer(texts[:8], padding=True, return_tensors="pt")
    ends = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = get_coda_model(
            tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=3)
        )
        config = TrainConfig(
            epochs=2, min_steps=0, batch_size=8, max_length=16, val_size=0, dense_start=0, reduction_warmup=0,
            router_z_loss=weight, lr=1e-2,
        )  # fmt: skip
        start = router_z_loss_on(model, batch)
        train_classifier(model, minilm_tokenizer, data, config, tmp_path / str(weight), model_name="minilm",
                         show_progress=False)  # fmt: skip
        ends.append(router_z_loss_on(model, batch))
    assert ends[1] < 0.7 * start and ends[1] < 0.6 * ends[0]  # measured: 4.7 at the start, 5.3 without, 2.5 with
    with pytest.raises(ValueError, match="--router-z-loss must be"):
        TrainConfig(router_z_loss=-0.1)


def router_z_loss_on(model, batch):
    model.train()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return float(model.router_z_loss())


@pytest.mark.parametrize("router_init", ["attention", "attention-text"])
def test_router_init_attention_fits_the_routers_on_training_texts_before_the_first_step(
    tmp_path, minilm_tokenizer, monkeypatch, router_init
):
    """The fit runs once, before the first training step, on the first training texts without labels; with
    attention-text over every real token but the tokenizer's special ones ([CLS], [SEP], padding)."""
    from coda_adapters.app import classify

    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=2)
    )
    texts = [f"document number {i} about topic {i % 3} and more words" for i in range(20)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(20)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    events = []
    real = classify.init_routers_from_attention

    def spy(coda, inputs, tokens=None):
        events.append(("init", len(inputs["input_ids"]), "labels" in inputs))
        fitted.append((inputs, tokens))
        return real(coda, inputs, tokens=tokens)

    fitted = []

    monkeypatch.setattr(classify, "init_routers_from_attention", spy)
    model.model.register_forward_pre_hook(lambda m, a: events.append(("forward", m.training)))
    config = TrainConfig(epochs=1, min_steps=0, batch_size=4, max_length=16, val_size=0, router_init=router_init)
    metrics = train_classifier(
        model, minilm_tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False
    )
    first_training = events.index(("forward", True))
    assert events[:first_training].count(("init", 20, False)) == 1  # all 20 texts (fewer than 64), no labels
    assert sorted(metrics["router_init_fit"]) == ["0", "1"] and metrics["train_config"]["router_init"] == router_init
    [(inputs, tokens)] = fitted
    if router_init == "attention":
        assert tokens is None
    else:
        ids, real_tokens = inputs["input_ids"], inputs["attention_mask"].bool()
        words = ids != minilm_tokenizer.cls_token_id
        words &= (ids != minilm_tokenizer.sep_token_id) & real_tokens
        assert torch.equal(tokens & real_tokens, words) and words.any()
    with pytest.raises(ValueError, match="--router-init must be one of"):
        TrainConfig(router_init="norm")


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_ends_with_the_best_validation_epochs_weights(tmp_path, minilm_tokenizer, monkeypatch, keep_best):
    from coda_adapters.app import classify
    from coda_adapters.checkpoint import WEIGHTS_NAME, read_adapter_weights

    model = get_coda_model(
        tiny_model("bert", head=True, vocab_size=minilm_tokenizer.vocab_size), CodaConfig(reduction=2)
    )
    texts = [f"document number {i} about topic {i % 3}" for i in range(30)]
    data = ClassificationData(
        LabelledTexts(texts, [i % 3 for i in range(30)]), LabelledTexts(texts[:6], [0, 1, 2] * 2), list("abc"), "t"
    )
    validation = iter([0.4, 0.9, 0.6])  # epoch 2 is the best, and not the last
    snapshots, real_evaluate = [], classify.evaluate

    def evaluate(model, tokenizer, part, *args):
        if part is data.test:
            return real_evaluate(model, tokenizer, part, *args)
        snapshots.append({k: v.clone() for k, v in model.trainable_state_dict().items()})
        return {"accuracy": next(validation), "macro_f1": 0.0}

    monkeypatch.setattr(classify, "evaluate", evaluate)
    config = TrainConfig(epochs=3, min_steps=0, batch_size=8, lr=1e-2, max_length=16, val_size=0.2, keep_best=keep_best)
    train_classifier(model, minilm_tokenizer, data, config, tmp_path, model_name="minilm", show_progress=False)

    kept = 2 if keep_best else 3
    saved = read_adapter_weights(tmp_path / WEIGHTS_NAME)
    assert all(torch.equal(saved[name], snapshots[kept - 1][name]) for name in saved)
    assert not all(torch.equal(saved[name], snapshots[(kept % 3)][name]) for name in saved)  # the epochs differ
    assert all(torch.equal(saved[name], value) for name, value in model.trainable_state_dict().items())  # tested too
    assert json.loads((tmp_path / "metrics.json").read_text())["kept_epoch"] == kept
    with pytest.raises(ValueError, match="--keep-best needs a validation split: set --val-size above 0"):
        TrainConfig(keep_best=True, val_size=0)


def test_distillation_loss_is_the_weighted_sum_of_cross_entropy_and_the_softened_kl():
    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    cross_entropy, weight, temperature = torch.tensor(1.7), 0.3, 2.5

    def softened(x):  # an independent reference in numpy
        e = np.exp(x.numpy() / temperature)
        return e / e.sum(-1, keepdims=True)

    model_p, teacher_p = softened(logits), softened(teacher)
    kl = float((teacher_p * np.log(teacher_p / model_p)).sum(-1).mean())
    loss = distillation_loss(cross_entropy, logits, teacher, weight, temperature)
    assert float(loss) == pytest.approx(0.7 * 1.7 + 0.3 * 2.5**2 * kl, rel=1e-5)
    assert float(distillation_loss(cross_entropy, logits, teacher, 0.0, temperature)) == pytest.approx(1.7)
    assert float(distillation_loss(cross_entropy, teacher, teacher, 1.0, temperature)) == pytest.approx(0, abs=1e-6)
    for name, settings in (
        ("--distill-weight", {"distill_weight": 1.5}),
        ("--distill-temperature", {"distill_temperature": 0}),
    ):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**settings)


def distillation_task(tmp_path, minilm_path, labels=("a", "b", "c")):
    teacher = save_tiny_classifier(Path(minilm_path), tmp_path / "teacher", list(labels), seed=3, bottleneck=8)
    texts = [f"text {i} is about {['sport', 'money', 'phones'][i % 3]} and {i * 7 % 11} more things" for i in range(24)]
    return teacher, texts


def test_teacher_logits_follow_the_training_texts_order_and_the_teacher_must_match(tmp_path, minilm_path):
    teacher_dir, texts = distillation_task(tmp_path, minilm_path)
    model, tokenizer, _ = load_classifier(teacher_dir)
    encoded = Encoded(tokenizer, texts, None, 16)  # length-sorted batches inside: the order must come back
    config = TrainConfig(teacher=str(teacher_dir), eval_batch_size=5, max_length=16)
    logits = teacher_logits(config, encoded, ["a", "b", "c"], minilm_path)
    with torch.inference_mode():
        one_by_one = torch.cat(
            [model(**tokenizer(text, truncation=True, max_length=16, return_tensors="pt")).logits for text in texts]
        )
    assert logits.shape == (24, 3) and torch.allclose(logits, one_by_one, atol=1e-4)
    with pytest.raises(
        ValueError, match=r"--teacher .*labels \['a', 'b', 'c'\] differ from the data's \['x', 'y', 'z'\]"
    ):
        teacher_logits(config, encoded, ["x", "y", "z"], minilm_path)
    with pytest.raises(ValueError, match="--teacher .*not minilm .both must read the same tokens"):
        teacher_logits(config, encoded, ["a", "b", "c"], "minilm")


def test_training_on_the_teacher_alone_brings_the_model_to_the_teachers_predictions(tmp_path, minilm_path):
    """distill_weight 1 ignores the labels (here: all one class): the model can only learn from the teacher."""
    teacher_dir, texts = distillation_task(tmp_path, minilm_path)
    student, tokenizer = build_classifier(minilm_path, CodaConfig(reduction=3, bottleneck=8), ["a", "b", "c"])
    data = ClassificationData(LabelledTexts(texts, [0] * 24), LabelledTexts(texts[:3], [0, 1, 2]), list("abc"), "t")
    config = TrainConfig(
        epochs=4,
        min_steps=0,
        batch_size=8,
        lr=1e-2,
        max_length=16,
        val_size=0,
        warmup_ratio=0,
        teacher=str(teacher_dir),
        distill_weight=1.0,
        distill_temperature=1.0,
    )
    encoded = Encoded(tokenizer, texts, None, 16)
    targets = teacher_logits(config, encoded, ["a", "b", "c"], minilm_path).softmax(-1)

    def kl_to_teacher():
        probabilities = predict_probabilities(student, encoded, 8)[0]
        return float((targets * (targets / probabilities).log()).sum(-1).mean())

    before = kl_to_teacher()
    train_classifier(
        student, tokenizer, data, config, tmp_path / "student", model_name=minilm_path, show_progress=False
    )
    after = kl_to_teacher()
    assert after < 0.5 * before, (before, after)
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["train_config"]["teacher"] == str(teacher_dir) and metrics["train_config"]["distill_weight"] == 1.0


def test_the_z_loss_example_reads_each_layers_router_scores_of_a_saved_classifier(tmp_path):
    """examples/router_z_loss_of_runs.py against the mean over layers and texts of logsumexp² computed from the
    hidden states entering each routed layer."""
    base = save_tiny_base(tmp_path / "base")
    directory = save_tiny_classifier(base, tmp_path / "clf", list("abc"), reduction=3)
    texts = ["a short text", "a somewhat longer text about money and markets", "sport"]
    got = load_example("router_z_loss_of_runs").router_z_loss_of(directory, texts, max_length=16)
    model, tokenizer, _ = load_classifier(directory)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    lengths = batch["attention_mask"].sum(-1).tolist()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        per_layer = [
            torch.stack([torch.logsumexp(hidden[i][row, :n] @ layer.router.weight, 0) for row, n in enumerate(lengths)])
            .square()
            .mean()
            for i, layer in model.conditional_layers().items()
        ]
    assert got == pytest.approx(float(torch.stack(per_layer).mean()), rel=1e-5) and got > 0


def test_starting_from_pretrained_routers_notes_another_budget_and_the_default_router_rate():
    pretrained = CodaConfig(reduction=5)
    assert pretrained_start_notes(pretrained, CodaConfig(reduction=5), router_lr_scale=30.0) == []
    [budget, rate] = pretrained_start_notes(pretrained, CodaConfig(reduction=3, keep_first=0), router_lr_scale=1.0)
    assert budget.startswith("--init was pretrained with --reduction 5, this model has 3")
    assert "--router-lr-scale 1" in rate and "30" in rate
    [kept] = pretrained_start_notes(pretrained, CodaConfig(reduction=5, keep_first=39), router_lr_scale=10.0)
    assert kept.startswith("--init was pretrained with --keep-first 0, this model has 39")
    # nothing to say about the rate where nothing is routed, or the router is not learned
    assert pretrained_start_notes(CodaConfig(reduction=1), CodaConfig(reduction=1), router_lr_scale=1.0) == []
    random_router = CodaConfig(reduction=5, router="random")
    assert pretrained_start_notes(random_router, random_router, router_lr_scale=1.0) == []
