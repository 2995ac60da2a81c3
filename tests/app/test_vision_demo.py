"""The vision demo on a tiny ViT: what it writes, that the pretrained backbone is cached and reused,
and that adaptation leaves the backbone's weights untouched."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

from coda_adapters.app import vision as vision_demo
from coda_adapters.app.vision import (
    QUICK,
    adapt_variant,
    cached_backbone_info,
    digits_task,
    run_vision_demo,
    run_vision_seeds,
)
from coda_adapters.files import read_tensors

from helpers import load_example

RESULT_KEYS = {"demo", "quick", "backbone", "task", "variants", "phase_seconds", "timing", "settings", "versions"}
VARIANT_KEYS = {
    "reduction",
    "router",
    "crop_tokens",
    "tokens_per_layer",
    "test_accuracy",
    "val_accuracy",
    "epoch",
    "trainable_parameters",
    "seconds_per_epoch",
    "history",
    "inference_ms",
    "inference_speedup",
    "train_step_ms",
    "train_step_speedup",
    "flop_speedup",
    "router_init_fit",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The quick demo's tensors are tiny: with two threads on a busy two-core machine, each operation
    waits for the other thread, and the test is ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-demo")
    results = run_vision_demo(root / "first", cache_dir=root / "cache", quick=True, show_progress=False)
    return root, results


def test_results_json_and_report_have_one_entry_per_variant(first_run):
    root, _ = first_run
    written = json.loads((root / "first" / "results.json").read_text())
    assert set(written) == RESULT_KEYS
    assert list(written["variants"]) == ["dense adapter (r=1)", "CoDA r=3"]
    assert written["backbone"]["pretrained_here"] is True
    assert 0 <= written["backbone"]["mnist_heldout_accuracy"] <= 1
    n = written["backbone"]["tokens"]
    for variant in written["variants"].values():
        assert set(variant) == VARIANT_KEYS
        assert 0 <= variant["test_accuracy"] <= 1 and 0 <= variant["val_accuracy"] <= 1
        assert variant["tokens_per_layer"] == math.ceil(n / variant["reduction"])
        assert all(math.isfinite(variant[key]) and variant[key] > 0 for key in ("inference_speedup", "flop_speedup"))
    assert written["variants"]["dense adapter (r=1)"]["inference_speedup"] == 1.0
    report = (root / "first" / "results.md").read_text()
    assert "pretrained in this demo" in report
    assert all(f"| {name} |" in report for name in written["variants"])


def test_saved_adapters_hold_no_backbone_weights(first_run):
    root, _ = first_run
    names = read_tensors(root / "first" / "adapter-r3" / "coda_model.safetensors")
    assert names
    assert all(any(part in name for part in ("router", "adapter", "classifier")) for name in names), sorted(names)


def test_second_run_reuses_the_cached_backbone(first_run, monkeypatch):
    root, first = first_run
    weights = root / "cache" / "model.safetensors"
    modified = weights.stat().st_mtime_ns

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached backbone should have been reused")

    monkeypatch.setattr(vision_demo, "pretrain_backbone", no_pretraining)
    second = run_vision_demo(root / "second", cache_dir=root / "cache", quick=True, show_progress=False)
    assert first["backbone"]["cached"] is False and second["backbone"]["cached"] is True
    assert second["backbone"]["mnist_heldout_accuracy"] == first["backbone"]["mnist_heldout_accuracy"]
    assert weights.stat().st_mtime_ns == modified
    assert "loading cached backbone" in second["phase_seconds"] and "pretraining" not in second["phase_seconds"]
    # a backbone pretrained with other settings is not taken for this one
    other = dataclasses.replace(QUICK, pretrain=dataclasses.replace(QUICK.pretrain, epochs=2))
    assert cached_backbone_info(root / "cache", other) is None


def test_adaptation_trains_the_head_and_leaves_the_backbone_untouched(first_run):
    root, _ = first_run
    before = {
        name: tensor.clone()
        for name, tensor in vision_demo.load_with_fresh_head(root / "cache", QUICK.seed).state_dict().items()
    }
    model, _ = adapt_variant(root / "cache", digits_task(QUICK), 3, QUICK, show_progress=False)
    after = model.unload().state_dict()
    assert set(after) == set(before)
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    backbone = [name for name in before if not name.startswith("classifier.")]
    assert len(backbone) > 10
    for name in backbone:
        assert torch.equal(after[name], before[name]), name


def test_several_seeds_share_the_backbone_and_summarise_mean_std_and_paired_gap(first_run, monkeypatch):
    root, first = first_run

    def no_pretraining(*args, **kwargs):
        raise AssertionError("every seed adapts the one cached backbone")

    monkeypatch.setattr(vision_demo, "pretrain_backbone", no_pretraining)
    summary = run_vision_seeds(root / "seeds", [0, 1], cache_dir=root / "cache", quick=True, show_progress=False)
    runs = {s: json.loads((root / "seeds" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert runs[0]["settings"]["adapt"]["seed"] == 0 and runs[1]["settings"]["adapt"]["seed"] == 1
    # seed 0 is the single run's recipe: the same test accuracies
    assert [v["test_accuracy"] for v in runs[0]["variants"].values()] == [
        v["test_accuracy"] for v in first["variants"].values()
    ]
    for name, v in summary["variants"].items():
        accuracies = [runs[s]["variants"][name]["test_accuracy"] for s in (0, 1)]
        gaps = [accuracies[s] - runs[s]["variants"]["dense adapter (r=1)"]["test_accuracy"] for s in (0, 1)]
        assert v["test_accuracy_mean"] == pytest.approx(statistics.mean(accuracies))
        assert v["test_accuracy_std"] == pytest.approx(statistics.stdev(accuracies))
        assert v["gap_to_dense_mean"] == pytest.approx(statistics.mean(gaps))
    assert "| CoDA r=3 |" in (root / "seeds" / "summary.md").read_text()
    adapters = [read_tensors(root / "seeds" / f"seed-{s}" / "adapter-r3" / "coda_model.safetensors") for s in (0, 1)]
    assert not torch.equal(adapters[0]["classifier.weight"], adapters[1]["classifier.weight"])  # the seed is used
    with pytest.raises(ValueError, match="two or more distinct seeds, got \\[1, 1\\]"):
        run_vision_seeds(root / "bad", [1, 1], cache_dir=root / "cache", quick=True)


def test_the_routing_recipe_starts_dense_and_ends_at_the_target_reduction(first_run):
    root, _ = first_run
    settings = vision_demo.with_adaptation(QUICK, epochs=2, dense_start=0.5, reduction_warmup=0.25)
    base = vision_demo.load_with_fresh_head(root / "cache", 0)
    model = vision_demo.get_coda_model(base, vision_demo.CodaConfig(reduction=3, bottleneck=8))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.reduction) if module.training else None)
    task = digits_task(QUICK)
    vision_demo.fit(model, task.train, settings.adapt, show_progress=False)
    steps = len(seen)
    assert steps == 2 * math.ceil(len(task.train) / settings.adapt.batch_size)
    assert all(r == 1.0 for r in seen[: steps // 2]) and seen[-1] == 3.0
    assert any(1.0 < r < 3.0 for r in seen[steps // 2 : 3 * steps // 4 + 1])  # the kept share falls gradually
    assert model.reduction == 3.0
    with pytest.raises(ValueError, match="--dense-start plus --reduction-warmup"):
        vision_demo.with_adaptation(QUICK, dense_start=0.7, reduction_warmup=0.5)


def test_the_backbone_cache_key_leaves_out_the_adaptation_recipe():
    """A cache written before FitSettings had the routing recipe has this key and stays valid."""
    with_recipe = dataclasses.replace(QUICK, pretrain=dataclasses.replace(QUICK.pretrain, dense_start=0.5))
    assert with_recipe.backbone_key() == QUICK.backbone_key()
    assert (
        QUICK.backbone_key()
        == dataclasses.replace(QUICK, pretrain=dataclasses.replace(QUICK.pretrain, keep_best=False)).backbone_key()
    )
    assert set(QUICK.backbone_key()["pretrain"]) == {
        "epochs",
        "lr",
        "batch_size",
        "weight_decay",
        "warmup_ratio",
        "max_shift",
        "seed",
    }


def test_a_random_router_variant_routes_randomly_and_says_so(first_run):
    root, _ = first_run
    settings = dataclasses.replace(QUICK, router="random")
    model, _ = adapt_variant(root / "cache", digits_task(settings), 3, settings, show_progress=False)
    assert model.coda_config.router == "random"
    assert vision_demo.variant_name(3, "random") == "CoDA r=3, random router"
    dense, _ = adapt_variant(root / "cache", digits_task(settings), 1, settings, show_progress=False)
    assert dense.coda_config.router == "learned"  # at r = 1 every token is kept: no router chooses
    pixels = digits_task(settings).test.pixels[:4]
    model.eval()
    with torch.no_grad():  # a new draw of tokens on every call: the outputs differ
        assert not torch.equal(model(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"router": "best"}, "--router must be one of \\('learned', 'random'\\), got 'best'"),
        ({"epsilon": 0.0}, "--epsilon must be a finite number > 0, got 0.0"),
        ({"mnist_pretrain_epochs": -1}, "--mnist-pretrain-epochs must be an int >= 0, got -1"),
        ({"adapt": {"epochs": 0}}, "--epochs must be an int >= 1, got 0"),
    ],
)
def test_demo_settings_name_the_wrong_option(change, message):
    with pytest.raises(ValueError, match=message):
        if "adapt" in change:
            vision_demo.with_adaptation(QUICK, **change["adapt"])
        else:
            dataclasses.replace(QUICK, **change)


@pytest.mark.parametrize("keep_best", [True, False])
def test_fit_ends_with_the_best_validation_epochs_weights(first_run, monkeypatch, keep_best):
    root, _ = first_run
    scripted = iter([0.5, 0.9, 0.7])  # validation accuracy after epochs 1, 2, 3: the second is best
    snapshots = []

    def scripted_accuracy(model, data):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return next(scripted)

    monkeypatch.setattr(vision_demo, "accuracy", scripted_accuracy)
    settings = vision_demo.with_adaptation(QUICK, epochs=3, keep_best=keep_best)
    task = digits_task(QUICK)
    model = vision_demo.get_coda_model(
        vision_demo.load_with_fresh_head(root / "cache", 0), vision_demo.CodaConfig(reduction=3, bottleneck=8)
    )
    history = vision_demo.fit(model, task.train, settings.adapt, validation=task.validation, show_progress=False)
    final = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kept = snapshots[1] if keep_best else snapshots[2]
    assert all(torch.equal(final[n], kept[n]) for n in final)
    assert not all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in final)  # the epochs did differ
    assert vision_demo.best_epoch(history)["epoch"] == 2


def test_the_command_line_sets_the_adaptation_recipe(monkeypatch, tmp_path):
    from coda_adapters.app.cli import main

    seen = {}
    monkeypatch.setattr(vision_demo, "run_vision_demo", lambda out, **kwargs: seen.update(kwargs))
    (tmp_path / "results.md").write_text("report")
    argv = ["vision", "--quick", "--out", str(tmp_path), "--epochs", "7", "--epsilon", "0.2", "--router", "random"]
    main([*argv, "--keep-last", "--seeds", "3", "--mnist-pretrain-epochs", "2"])
    settings = seen["settings"]
    assert (settings.adapt.epochs, settings.adapt.keep_best, settings.adapt.seed) == (7, False, 3)
    assert (settings.epsilon, settings.router, settings.mnist_pretrain_epochs) == (0.2, "random", 2)
    assert settings.pretrain == QUICK.pretrain  # the backbone's recipe is not touched
    assert settings.baselines is False
    main(["vision", "--quick", "--out", str(tmp_path), "--baselines"])
    assert seen["settings"].baselines is True
    main(["vision", "--quick", "--out", str(tmp_path)])
    assert seen["settings"] == QUICK


def test_mnist_pretraining_trains_the_adapters_and_the_digits_start_from_the_fresh_head(first_run, monkeypatch):
    root, _ = first_run
    settings = dataclasses.replace(QUICK, mnist_pretrain_epochs=1)
    at_adaptation = {}
    real_fit = vision_demo.fit

    def spy(model, data, fit_settings, **kwargs):
        if kwargs["desc"].startswith("adapting"):
            at_adaptation.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        return real_fit(model, data, fit_settings, **kwargs)

    monkeypatch.setattr(vision_demo, "fit", spy)
    _, record = adapt_variant(root / "cache", digits_task(settings), 3, settings, show_progress=False)
    fresh_base = vision_demo.load_with_fresh_head(root / "cache", settings.adapt.seed)
    fresh = vision_demo.get_coda_model(fresh_base, vision_demo.CodaConfig(reduction=3, bottleneck=QUICK.bottleneck))
    fresh = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
    head = [n for n in fresh if "classifier" in n]
    assert head and all(torch.equal(at_adaptation[n], fresh[n]) for n in head)
    up_projections = [n for n in fresh if "adapter" in n and "up" in n]  # zero when fresh
    assert up_projections and all(at_adaptation[n].abs().sum() > 0 for n in up_projections)
    assert record["mnist_pretraining"]["epochs"] == 1
    assert 0 <= record["mnist_pretraining"]["mnist_heldout_accuracy"] <= 1


def test_central_patches_are_the_ones_nearest_the_centre():
    from coda_adapters.app.vision_data import central_patches

    assert central_patches(7, 1).tolist() == [24]
    assert central_patches(7, 9).tolist() == [16, 17, 18, 23, 24, 25, 30, 31, 32]  # the 3x3 block
    assert central_patches(4, 4).tolist() == [5, 6, 9, 10]
    assert central_patches(4, 5).tolist() == [1, 5, 6, 9, 10]  # of the next ring's equals, the first in raster order
    assert central_patches(7, 49).tolist() == list(range(49))
    for count in (0, 50):
        with pytest.raises(ValueError, match=f"a crop keeps 1 to 49 patches of a 7x7 grid, got {count}"):
            central_patches(7, count)


def test_a_crop_variant_runs_every_layer_on_cls_and_the_central_patches(first_run):
    root, _ = first_run
    variant = vision_demo.Variant(1, crop_tokens=6)
    model, record = adapt_variant(root / "cache", digits_task(QUICK), variant, QUICK, show_progress=False)
    assert (record["tokens_per_layer"], record["crop_tokens"], record["reduction"]) == (6, 6, 1)
    assert variant.name == "dense adapter, central 6 tokens" and variant.directory_name == "adapter-crop6"
    embeddings = model.model.vit.embeddings
    pixels = digits_task(QUICK).test.pixels[:3]
    seen = []
    model.binding.layers()[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(pixel_values=pixels)
        full = type(embeddings).forward(embeddings, pixels)  # the embedding without the hook: all 17 tokens
    kept = full[:, [0, 2, 6, 7, 10, 11]]  # [CLS] and patches 1, 5, 6, 9, 10 of the 4x4 grid
    assert seen[0].shape == (3, 6, full.shape[-1]) and torch.equal(seen[0], kept)


def test_baselines_add_a_crop_and_a_random_router_beside_each_reduction(first_run, monkeypatch):
    root, _ = first_run
    settings = dataclasses.replace(QUICK, baselines=True)
    names = [v.name for v in vision_demo.demo_variants(settings)]
    assert names == ["dense adapter (r=1)", "CoDA r=3", "dense adapter, central 6 tokens", "CoDA r=3, random router"]
    random_run = dataclasses.replace(settings, router="random")  # its CoDA rows are the random baseline already
    assert [v.name for v in vision_demo.demo_variants(random_run)] == [
        "dense adapter (r=1)",
        "CoDA r=3, random router",
        "dense adapter, central 6 tokens",
    ]
    summary = run_vision_seeds(
        root / "baselines", [0, 1], cache_dir=root / "cache", settings=settings, quick=True, show_progress=False
    )
    runs = [json.loads((root / "baselines" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert list(runs[0]["variants"]) == names
    assert (root / "baselines" / "seed-0" / "adapter-crop6").is_dir()
    assert (root / "baselines" / "seed-0" / "adapter-r3-random").is_dir()
    for name in ("CoDA r=3", "CoDA r=3, random router"):
        gaps = [run["variants"][name]["test_accuracy"] - run["variants"][names[2]]["test_accuracy"] for run in runs]
        assert summary["variants"][name]["gap_to_crop_mean"] == pytest.approx(statistics.mean(gaps))
        assert summary["variants"][name]["gap_to_crop_std"] == pytest.approx(statistics.stdev(gaps))
    assert summary["variants"]["dense adapter (r=1)"]["gap_to_crop_mean"] is None
    assert summary["variants"][names[2]]["gap_to_crop_mean"] is None
    assert "| vs crop to its budget (paired) |" in (root / "baselines" / "summary.md").read_text()

    # a rerun resumes: the seeds that finished with these settings are read back, not run again
    def no_run(*args, **kwargs):
        raise AssertionError("run again")

    monkeypatch.setattr(vision_demo, "run_vision_demo", no_run)
    again = run_vision_seeds(root / "baselines", [0, 1], cache_dir=root / "cache", settings=settings, quick=True)
    assert again == summary
    with pytest.raises(AssertionError, match="run again"):  # other settings: the seed runs again
        other = vision_demo.with_adaptation(settings, epochs=2)
        run_vision_seeds(root / "baselines", [0, 1], cache_dir=root / "cache", settings=other, quick=True)


def test_digits_placed_anywhere_keep_their_ink_in_a_small_box_at_a_spot_fixed_by_the_seed():
    from coda_adapters.app.vision_data import ANYWHERE_SIZE, BACKGROUND, load_digits_28, place_digits

    centred = load_digits_28()
    placed = place_digits(centred, "anywhere", seed=0)
    assert placed.pixels.shape == centred.pixels.shape and torch.equal(placed.labels, centred.labels)
    ink = placed.pixels[:, 0] > BACKGROUND
    rows, columns = ink.any(dim=2), ink.any(dim=1)  # [n, 28]: which rows / columns hold ink
    first_row, last_row = rows.int().argmax(dim=1), 27 - rows.flip(1).int().argmax(dim=1)
    first_column, last_column = columns.int().argmax(dim=1), 27 - columns.flip(1).int().argmax(dim=1)
    assert int((last_row - first_row).max()) < ANYWHERE_SIZE and int((last_column - first_column).max()) < ANYWHERE_SIZE
    # the spots spread over the frame (uniform over 17 offsets: std ~4.9), where the centred digits do not move
    assert first_row.float().std() > 3.5 and first_column.float().std() > 3.5
    assert int(first_row.min()) <= 1 and int(last_row.max()) >= 26  # some reach the frame's edges
    # scaling by 12/20 keeps the mean intensity of the box: the ink's total shrinks by the area, (12/20)^2
    before, after = (centred.pixels - BACKGROUND).sum(dim=(1, 2, 3)), (placed.pixels - BACKGROUND).sum(dim=(1, 2, 3))
    assert torch.allclose(after, before * (ANYWHERE_SIZE / 20) ** 2, rtol=0.02)
    assert torch.equal(place_digits(centred, "anywhere", seed=0).pixels, placed.pixels)
    assert not torch.equal(place_digits(centred, "anywhere", seed=1).pixels, placed.pixels)
    assert place_digits(centred, "centre", seed=0) is centred
    with pytest.raises(ValueError, match="--placement must be one of \\('centre', 'anywhere'\\), got 'corner'"):
        place_digits(centred, "corner", seed=0)


def frame_with_ink(patch_sets: list[set[int]], faint: tuple[int, int] | None = None) -> torch.Tensor:
    """Blank 28x28 images ``[n, 1, 28, 28]``, image ``i`` with one full-ink pixel inside each patch of
    ``patch_sets[i]`` (4x4 patches, raster order), and optionally a faint pixel at ``faint``."""
    pixels = torch.full((len(patch_sets), 1, 28, 28), -1.0)
    for image, patches in enumerate(patch_sets):
        for patch in patches:
            pixels[image, 0, 4 * (patch // 7) + 1, 4 * (patch % 7) + 2] = 1.0
    if faint is not None:
        pixels[0, 0, faint[0], faint[1]] = -0.9  # intensity 0.05: resizing's haze, not ink
    return pixels


def test_ink_patches_are_the_patches_with_a_pixel_above_a_tenth_of_full_intensity():
    from coda_adapters.app.vision_data import ink_patches

    pixels = frame_with_ink([{0, 9, 48}, set()], faint=(13, 13))  # the faint pixel is in patch 3 * 7 + 3
    ink = ink_patches(pixels, patch_size=4)
    assert ink.shape == (2, 49) and ink.dtype == torch.bool
    assert ink[0].nonzero().flatten().tolist() == [0, 9, 48] and not ink[1].any()
    assert ink_patches(frame_with_ink([{0, 1, 7, 8}]), patch_size=8)[0].nonzero().flatten().tolist() == [0]


class FixedRouting(torch.nn.Module):
    """A stand-in CoDA ViT whose ``routing_trace`` gives, batch after batch, the rows of fixed traces."""

    def __init__(self, traces: dict[int, torch.Tensor]):
        super().__init__()
        self.traces, self.seen, self.batch = traces, 0, 0

    def forward(self, pixel_values: torch.Tensor) -> None:
        self.seen, self.batch = self.seen + self.batch, len(pixel_values)

    def routing_trace(self) -> dict[int, torch.Tensor]:
        return {layer: trace[self.seen : self.seen + self.batch] for layer, trace in self.traces.items()}


def test_ink_recall_is_the_share_of_each_images_ink_patches_each_layer_ran():
    from coda_adapters.app.vision import ink_recall
    from coda_adapters.app.vision_data import Images

    ink = [{0, 8, 9}, {20}, set(), {47, 48}]  # the image without ink is left out of the means
    data = Images(frame_with_ink(ink), torch.zeros(len(ink), dtype=torch.long))
    traces = {  # token positions: patch j is token j + 1, token 0 is [CLS]; -1 pads
        1: torch.tensor([[0, 1, 10, -1], [0, 21, 5, 6], [0, 1, 2, 3], [0, 48, 49, -1]]),
        3: torch.tensor([[0, 2, 3, 4], [0, 1, 2, 3], [1, 9, 10, -1], [-1, -1, -1, -1]]),
    }
    expected = {}
    for layer, trace in traces.items():
        shares = [
            len({p - 1 for p in row.tolist() if p > 0} & patches) / len(patches)
            for row, patches in zip(trace, ink, strict=True)
            if patches
        ]
        expected[layer] = sum(shares) / len(shares)
    assert expected == {1: pytest.approx((2 / 3 + 1 + 1) / 3), 3: 0.0}
    for batch_size in (4, 3, 1):  # batches of equal and unequal sizes
        recall = ink_recall(FixedRouting(traces), data, patch_size=4, batch_size=batch_size)
        assert recall == pytest.approx(expected)


@pytest.mark.parametrize("placement", ["centre", "anywhere"])
def test_demo_settings_come_back_from_the_json_a_run_records(placement):
    settings = vision_demo.adapt_seed(vision_demo.demo_settings(placement=placement), 2)
    assert vision_demo.DemoSettings.from_dict(json.loads(json.dumps(dataclasses.asdict(settings)))) == settings
    assert vision_demo.DemoSettings.from_dict(json.loads(json.dumps(dataclasses.asdict(QUICK)))) == QUICK


def test_a_finished_run_is_found_by_its_settings_also_when_it_predates_a_setting(tmp_path):
    settings = vision_demo.adapt_seed(QUICK, 1)
    recorded = json.loads(json.dumps(dataclasses.asdict(settings)))
    del recorded["router_init"]  # a run made before the option existed ran with its default
    (tmp_path / vision_demo.RESULTS_NAME).write_text(json.dumps({"settings": recorded, "quick": True}))
    assert vision_demo.finished_run(tmp_path, settings, quick=True) is not None
    assert vision_demo.finished_run(tmp_path, settings, quick=False) is None
    assert (
        vision_demo.finished_run(tmp_path, dataclasses.replace(settings, router_init="attention"), quick=True) is None
    )
    assert vision_demo.finished_run(tmp_path, vision_demo.adapt_seed(QUICK, 2), quick=True) is None
    (tmp_path / vision_demo.RESULTS_NAME).write_text(json.dumps({"settings": {"shape": 3}, "quick": True}))
    assert vision_demo.finished_run(tmp_path, settings, quick=True) is None


def test_the_ink_recall_example_reloads_each_routed_adapter_of_a_run(first_run):
    """examples/vision_ink_recall.py: the same test split and adapter as the run (same accuracy)."""
    root, results = first_run
    report = load_example("vision_ink_recall").ink_recall_report(root / "first")
    assert report["test_images"] == len(digits_task(QUICK).test) and report["patches"] == QUICK.shape.grid**2
    rows = report["rows"]
    assert [row["variant"] for row in rows] == ["CoDA r=3"]
    assert rows[0]["test_accuracy"] == results["variants"]["CoDA r=3"]["test_accuracy"]
    layers = QUICK.shape.num_layers
    assert len(rows[0]["ink_recall"]) == layers and all(0 <= s <= 1 for s in rows[0]["ink_recall"].values())
    assert rows[0]["chance"] == (math.ceil(QUICK.shape.num_tokens / 3) - 1) / QUICK.shape.grid**2


def test_placing_digits_anywhere_changes_the_backbone_key_and_both_data_sets():
    anywhere = dataclasses.replace(QUICK, placement="anywhere")
    assert "placement" not in QUICK.backbone_key()  # a cache made before the option existed stays valid
    assert anywhere.backbone_key() == {**QUICK.backbone_key(), "placement": "anywhere"}

    def digits_splits(settings):
        task = digits_task(settings)
        return task.train, task.validation, task.test

    for split in (vision_demo.mnist_split, digits_splits):
        for centred, placed in zip(split(QUICK), split(anywhere), strict=True):
            assert torch.equal(centred.labels, placed.labels) and not torch.equal(centred.pixels, placed.pixels)
    with pytest.raises(ValueError, match="--placement must be one of"):
        dataclasses.replace(QUICK, placement="corner")


def test_the_anywhere_demo_caches_its_backbone_apart_and_names_its_task(tmp_path, monkeypatch):
    from coda_adapters.app.cli import main

    monkeypatch.setattr(vision_demo, "DEFAULT_CACHE_DIR", tmp_path / "vit")
    settings = dataclasses.replace(QUICK, placement="anywhere", reductions=(1,))
    results = run_vision_demo(tmp_path / "out", quick=True, settings=settings, save_adapters=False, show_progress=False)
    assert (tmp_path / "vit-quick-anywhere" / "pretraining.json").is_file() and not (tmp_path / "vit-quick").exists()
    assert "12x12 at a random spot" in results["task"]["data"] and results["settings"]["placement"] == "anywhere"
    seen = {}
    monkeypatch.setattr(vision_demo, "run_vision_demo", lambda out, **kwargs: seen.update(kwargs))
    (tmp_path / "results.md").write_text("report")
    main(["vision", "--quick", "--out", str(tmp_path), "--placement", "anywhere"])
    assert seen["settings"] == dataclasses.replace(QUICK, placement="anywhere")
    main(["vision", "--out", str(tmp_path), "--placement", "anywhere", "--epochs", "5"])
    full = seen["settings"]  # the full demo's backbone for small digits: every patch, 40 epochs
    assert (full.placement, full.patch_keep, full.pretrain.epochs, full.adapt.epochs) == ("anywhere", None, 40, 5)
    assert vision_demo.demo_settings() == vision_demo.FULL


def test_attention_router_init_fits_the_routed_variants_only_and_reaches_the_command_line(tmp_path, monkeypatch):
    from coda_adapters.app.cli import main

    settings = dataclasses.replace(QUICK, reductions=(1, 3), router_init="attention", mnist_pretrain_epochs=1)
    results = run_vision_demo(
        tmp_path / "out", cache_dir=tmp_path / "cache", settings=settings, save_adapters=False, show_progress=False
    )
    variants = results["variants"]
    assert variants["dense adapter (r=1)"]["router_init_fit"] is None
    fit = variants["CoDA r=3"]["router_init_fit"]  # fitted before CoDA pretraining, on MNIST images
    assert sorted(fit) == ["0", "1"] and all(0 < value <= 1 for value in fit.values())
    assert "router_init_fit" not in variants["CoDA r=3"]["mnist_pretraining"]
    with pytest.raises(ValueError, match="--router-init must be one of"):
        dataclasses.replace(QUICK, router_init="norm")
    seen = {}
    monkeypatch.setattr(vision_demo, "run_vision_demo", lambda out, **kwargs: seen.update(kwargs))
    (tmp_path / "results.md").write_text("report")
    main(["vision", "--quick", "--out", str(tmp_path), "--router-init", "attention"])
    assert seen["settings"].router_init == "attention"


def ink_box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the ink of one image ``[1, H, W]``, bottom and right exclusive."""
    from coda_adapters.app.vision_data import BACKGROUND

    ink = image[0] > BACKGROUND + 1e-3
    rows, columns = ink.any(dim=1).nonzero().flatten(), ink.any(dim=0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


def test_random_move_puts_each_digit_unchanged_at_a_new_spot_inside_the_frame():
    from coda_adapters.app.vision_data import BACKGROUND, load_digits_28, random_move

    pixels = load_digits_28().pixels[:64].clone()
    pixels[5] = BACKGROUND  # a blank image
    moved = random_move(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(moved[5], pixels[5])
    spots = []
    for before, after in zip(pixels[torch.arange(64) != 5], moved[torch.arange(64) != 5], strict=True):
        (top, bottom, left, right), (y, y_end, x, x_end) = ink_box(before), ink_box(after)
        assert (y_end - y, x_end - x) == (bottom - top, right - left)
        assert torch.equal(after[:, y:y_end, x:x_end], before[:, top:bottom, left:right])
        assert (after > BACKGROUND).sum() == (before > BACKGROUND).sum()  # nothing else in the frame
        spots.append((y, x))
    assert len(set(spots)) > 40  # 63 digits, spots drawn from up to ~100 positions each
    again = random_move(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(again, moved)


def test_the_anywhere_backbone_and_its_mnist_pretraining_move_every_digit(tmp_path, monkeypatch):
    moved = []
    real_move = vision_demo.random_move
    monkeypatch.setattr(
        vision_demo, "random_move", lambda pixels, generator: moved.append(len(pixels)) or real_move(pixels, generator)
    )
    anywhere = dataclasses.replace(QUICK, placement="anywhere", reductions=(1,), mnist_pretrain_epochs=1)
    train, _ = vision_demo.mnist_split(anywhere)
    run_vision_demo(
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
        settings=anywhere,
        quick=True,
        save_adapters=False,
        show_progress=False,
    )
    assert sum(moved) == 2 * len(train)  # one epoch of backbone pretraining, one of CoDA pretraining
    moved.clear()
    run_vision_demo(
        tmp_path / "centre",
        cache_dir=tmp_path / "cache-centre",
        settings=dataclasses.replace(anywhere, placement="centre"),
        quick=True,
        save_adapters=False,
        show_progress=False,
    )
    assert moved == []  # centred digits keep the small shifts
