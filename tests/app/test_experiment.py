"""`coda experiment`'s compute-matched baselines and seeds, on a tiny synthetic corpus (not BBC News)."""

import json
import math
import random
import re
from dataclasses import asdict, replace

import pytest

from coda_adapters import CodaConfig
from coda_adapters.app.classify import TrainConfig
from coda_adapters.app.data import ClassificationData, LabelledTexts
from coda_adapters.app.experiment import (
    DENSE,
    PRESETS,
    Preset,
    Row,
    add_paired_differences,
    baseline_rows,
    check_kept_run,
    experiment_rows,
    format_results,
    other_finished_seeds,
    row_coda_config,
    row_directory,
    row_max_length,
    row_pretrain_config,
    row_train_config,
    run_experiment,
    select_rows,
    speed_matched_row,
    token_budget,
    train_row,
)
from coda_adapters.app.pretrain import PretrainConfig

TOPICS = {
    "sport": "match goal team coach league player score season",
    "business": "market shares profit bank economy company price trade",
    "tech": "software computer phone internet chip data network code",
    "politics": "election minister party vote parliament law policy government",
}
FILLER = "the a of and to in on for with at by from this that it was"


def synthetic_data(train_per_label: int = 8, test_per_label: int = 3) -> ClassificationData:
    generator = random.Random(0)

    def texts_of(count: int) -> LabelledTexts:
        texts, labels = [], []
        for label, words in enumerate(TOPICS.values()):
            for _ in range(count):
                picked = [generator.choice(words.split() if i % 2 else FILLER.split()) for i in range(24)]
                texts.append(" ".join(picked))
                labels.append(label)
        return LabelledTexts(texts, labels)

    return ClassificationData(texts_of(train_per_label), texts_of(test_per_label), list(TOPICS), "synthetic")


def tiny_preset(rows: list[Row], baselines: bool = True) -> Preset:
    return Preset(
        rows=rows,
        train=TrainConfig(epochs=1, min_steps=0, batch_size=8, lr=3e-3, max_length=32, val_size=0),
        pretrain=PretrainConfig(steps=1, batch_size=4, lr=1e-3, max_length=32, routers_only=True),
        speed_batch=4,
        speed_repeats=2,
        baselines=baselines,
    )


def test_baselines_come_from_the_coda_reductions_and_do_not_repeat_rows():
    preset = tiny_preset(
        [
            Row(DENSE, {"reduction": 1}),
            Row("LoRA", {"reduction": 1, "adapter": "none", "lora_rank": 8}),
            Row("CoDA r=2", {"reduction": 2}),
            Row("CoDA r=2, random router", {"reduction": 2, "router": "random"}),
            Row("CoDA r=4 + pretraining", {"reduction": 4}, pretrain=True),
            Row("CoDA r=3, longer", {"reduction": 3}, train={"max_length": 64}),
        ]
    )
    added = baseline_rows(preset)
    truncations = {row.name: row.train["max_length"] for row in added if row.truncation}
    # ceil(32 / 2), ceil(64 / 3), ceil(32 / 4): each row's own max_length
    assert truncations == {
        "Dense adapter, first 16 tokens": 16,
        "Dense adapter, first 22 tokens": 22,
        "Dense adapter, first 8 tokens": 8,
    }
    assert all(row.coda == {"reduction": 1} and not row.pretrain for row in added if row.truncation)
    randoms = [row for row in added if not row.truncation]
    assert [(row.name, row.coda) for row in randoms] == [
        ("CoDA r=3, random router", {"reduction": 3, "router": "random"}),
        ("CoDA r=4, random router", {"reduction": 4, "router": "random"}),
    ]
    assert experiment_rows(preset)[: len(preset.rows)] == preset.rows
    assert experiment_rows(tiny_preset(preset.rows, baselines=False)) == preset.rows


def test_presets_keep_their_rows_and_add_the_baselines_of_their_reductions():
    def added(preset):
        names = [row.name for row in experiment_rows(preset)]
        assert names[: len(preset.rows)] == [row.name for row in preset.rows]
        return names[len(preset.rows) :]

    assert added(PRESETS["results"]) == [
        "Dense adapter, first 86 tokens",
        "Dense adapter, first 52 tokens",
        "CoDA r=5, random router",
    ]
    assert added(PRESETS["routing"]) == [
        *(f"Dense adapter, first {n} tokens" for n in (86, 52, 16)),
        *(f"CoDA r={r}, random router" for r in (3, 5, 16)),
    ]
    # the needle rows without warm-up share r = 3's budget: one truncation row per budget
    assert added(PRESETS["needle"]) == [
        "Dense adapter, first 43 tokens",
        "Dense adapter, first 26 tokens",
        "CoDA r=3, random router",
        "CoDA r=5, random router",
    ]
    assert added(PRESETS["demo"]) == ["Dense adapter, first 43 tokens", "CoDA r=3, random router"]
    # fitted routers share their reduction's baselines with the plain ones
    assert added(PRESETS["needle-router-init"]) == added(PRESETS["needle"])
    fitted = [row for row in PRESETS["needle-router-init"].rows if row.train.get("router_init") == "attention"]
    assert [row_coda_config(PRESETS["needle"], row).reduction for row in fitted] == [3, 5]
    bbc = PRESETS["bbc-router-init"]
    assert (bbc.data, bbc.train.max_length) == ("bbc-news", 256)
    assert [row.slug for row in experiment_rows(bbc)] == [
        "dense-parallel-adapter-r-1",
        "coda-r-5",
        "coda-r-5-routers-fitted-to-attention",
        "dense-adapter-first-68-tokens-as-fast-as-coda-r-5",
        "dense-adapter-first-52-tokens",
        "coda-r-5-random-router",
    ]
    text = PRESETS["bbc-router-init-text"]
    changed = {row.slug for row in experiment_rows(text)} - {row.slug for row in experiment_rows(bbc)}
    assert changed == {"coda-r-5-routers-fitted-to-text-token-attention"}  # the rest are bbc-router-init's runs
    assert [row.train for row in text.rows if row.train and not row.truncation] == [{"router_init": "attention-text"}]
    # the needle's speed-matched rows, one per reduction, each the dense adapter on a prefix
    matched = [row for row in PRESETS["needle-router-init"].rows if row.speed_of is not None]
    assert [(row.speed_of, row_max_length(PRESETS["needle"], row), row.truncation) for row in matched] == [
        (3, 52, True),
        (5, 42, True),
    ]
    aggressive = [row for row in PRESETS["needle-aggressive"].rows if row.speed_of is not None]
    assert [(row.speed_of, row_max_length(PRESETS["needle"], row)) for row in aggressive] == [(8, 24), (16, 18)]
    # the kept lead with the annealed soft top-k reuses bbc-router-init's dense, plain and baseline runs
    combined = {row.slug for row in experiment_rows(PRESETS["prior-r5-anneal"])}
    assert combined - {row.slug for row in experiment_rows(bbc)} == {
        "coda-r-5-first-26-tokens-kept",
        "coda-r-5-first-26-tokens-kept-epsilon-annealed-from-1-to-0-1",
    }
    [annealed] = [row for row in PRESETS["prior-r5-anneal"].rows if row.train and not row.truncation]
    assert (annealed.coda["keep_first"], annealed.train) == (26, {"epsilon_start": 1.0})
    # three quarters of the budget kept: new kept-lead rows only, the rest shared
    lead39 = {row.slug for row in experiment_rows(PRESETS["prior-r5-lead39"])}
    assert lead39 - combined == {
        "coda-r-5-first-39-tokens-kept",
        "coda-r-5-first-39-tokens-kept-epsilon-annealed-from-1-to-0-1",
    }
    # straight-through routers: one new row per reduction, the rest are the runs the other presets share
    for name, plain in (("needle-straight-through", "needle-router-init"), ("bbc-straight-through", "bbc-router-init")):
        preset = PRESETS[name]
        shared = {row.slug for row in experiment_rows(PRESETS[plain])}
        new = [row for row in experiment_rows(preset) if row.slug not in shared]
        reductions = (3, 5) if name.startswith("needle") else (5,)
        assert [row.slug for row in new] == [f"coda-r-{r}-straight-through-router" for r in reductions]
        assert all(row_coda_config(preset, row).straight_through for row in new)
    # and all of it: the frozen layers run the 52-token cut's tokens, one new row
    lead52 = {row.slug for row in experiment_rows(PRESETS["prior-r5-lead52"])}
    assert lead52 - combined == {"coda-r-5-first-52-tokens-kept"}
    [whole] = [row for row in PRESETS["prior-r5-lead52"].rows if row.coda.get("keep_first")]
    assert whole.coda["keep_first"] == token_budget(PRESETS["prior-r5-lead52"], whole) == 52
    kept = [
        row.coda.get("keep_first")
        for row in experiment_rows(PRESETS["prior"]) + experiment_rows(PRESETS["prior-needle"])
    ]
    assert sorted(k for k in kept if k) == [22, 43]  # half of ceil(256 / 3) = 86 and of ceil(128 / 3) = 43, rounded up
    softer = [row_coda_config(PRESETS["needle-epsilon"], row) for row in PRESETS["needle-epsilon"].rows]
    assert [(c.reduction, c.epsilon) for c in softer] == [(1, 0.1), (3, 0.1), (3, 0.3), (5, 0.1), (5, 0.3)]
    # the rows without the change are the needle preset's runs, shared through one output directory
    shared = {row.slug for row in experiment_rows(PRESETS["needle-router-init"])}
    assert shared & {row.slug for row in experiment_rows(PRESETS["needle-epsilon"])} == {
        row.slug for row in experiment_rows(PRESETS["needle"]) if "warm-up" not in row.name
    }
    assert PRESETS["needle"].data == PRESETS["demo"].data == "bbc-needle" and PRESETS["routing"].data == "bbc-news"
    assert not PRESETS["smoke"].baselines and experiment_rows(PRESETS["smoke"]) == PRESETS["smoke"].rows


def test_needle_ablation_rows_shared_with_the_needle_preset_are_the_same_runs():
    """Its comment lets the needle preset's runs stand in for the shared rows: same data, model and recipe."""
    ablation, needle = PRESETS["needle-ablation"], PRESETS["needle"]
    shared = [row for row in ablation.rows if row.name in {r.name for r in needle.rows}]
    assert [row.name for row in shared] == [DENSE, "CoDA r=3", "CoDA r=3, no reduction warm-up"]
    assert ablation.data == needle.data
    for row in shared:
        twin = next(r for r in needle.rows if r.name == row.name)
        assert row_coda_config(ablation, row) == row_coda_config(needle, twin)
        assert {**asdict(ablation.train), **row.train} == {**asdict(needle.train), **twin.train}
    variants = [{**asdict(ablation.train), **row.train} for row in ablation.rows[1:]]
    assert len({tuple(sorted(v.items())) for v in variants}) == len(variants)  # every variant is a different recipe


@pytest.mark.parametrize(
    ("preset", "data", "max_length", "reduction", "budget", "kept", "as_fast"),
    [
        ("prior", "bbc-news", 256, 3, 86, 43, 100),
        ("prior-r5", "bbc-news", 256, 5, 52, 26, 68),
        ("prior-needle", "bbc-needle", 128, 3, 43, 22, None),
    ],
)
def test_the_prior_presets_keep_half_of_the_budget_for_the_first_tokens(
    preset, data, max_length, reduction, budget, kept, as_fast
):
    """Beside the dense adapter, plain CoDA at the same r and its baselines (on BBC News also truncation as fast as
    CoDA), all with the needle table's recipe."""
    rows = experiment_rows(PRESETS[preset])
    prior = next(row for row in rows if row_coda_config(PRESETS[preset], row).keep_first)
    assert row_coda_config(PRESETS[preset], prior) == CodaConfig(reduction=reduction, pooling="mean", keep_first=kept)
    assert token_budget(PRESETS[preset], prior) == budget
    names = [row.name for row in rows]
    plain = f"CoDA r={reduction}"
    speed_matched = [] if as_fast is None else [f"Dense adapter, first {as_fast} tokens (as fast as {plain})"]
    assert names == [
        DENSE,
        plain,
        prior.name,
        *speed_matched,
        f"Dense adapter, first {budget} tokens",
        f"{plain}, random router",
    ]
    for row in rows[3 : 3 + len(speed_matched)]:
        assert row.truncation and row.speed_of == reduction and row_max_length(PRESETS[preset], row) == as_fast > budget
    assert asdict(PRESETS[preset].train) == {**asdict(PRESETS["needle"].train), "max_length": max_length}
    assert PRESETS[preset].data == data


def test_routed_rows_are_compared_with_truncation_to_their_budget_and_with_truncation_as_fast():
    """Two truncation rows of different lengths: each CoDA row pairs with the budget one and with the one as fast as its
    own r; the speed-matched row is a baseline, not a budget reference (its length is no routed row's budget)."""
    preset = tiny_preset(
        [
            Row(DENSE, {"reduction": 1}),
            Row("CoDA r=2", {"reduction": 2}),
            Row("CoDA r=4", {"reduction": 4}),
            speed_matched_row(20, 2),
        ]
    )
    rows = experiment_rows(preset)
    accuracy = {row.name: [0.5 + 0.01 * i, 0.6 + 0.02 * i] for i, row in enumerate(rows)}
    results = [
        {"name": name, "seeds": [0, 1], "accuracy_per_seed": values, "macro_f1_per_seed": values}
        for name, values in accuracy.items()
    ]
    add_paired_differences(results, rows, preset)
    by_name = {result["name"]: result for result in results}

    def against(name, key):
        difference = by_name[name][key]
        return None if difference is None else (difference["against"], difference["accuracy_per_seed"])

    fast = "Dense adapter, first 20 tokens (as fast as CoDA r=2)"
    budget_of_2, budget_of_4 = "Dense adapter, first 16 tokens", "Dense adapter, first 8 tokens"
    expected = [a - b for a, b in zip(accuracy["CoDA r=2"], accuracy[fast], strict=True)]
    assert against("CoDA r=2", "diff_vs_speed_matched") == (fast, pytest.approx(expected))
    assert against("CoDA r=2", "diff_vs_truncation")[0] == budget_of_2
    assert against("CoDA r=2, random router", "diff_vs_speed_matched")[0] == fast
    assert against("CoDA r=4", "diff_vs_truncation")[0] == budget_of_4
    assert against("CoDA r=4", "diff_vs_speed_matched") is None  # nothing measured as fast as r = 4
    for name in (DENSE, fast, budget_of_2):
        assert against(name, "diff_vs_speed_matched") is None and against(name, "diff_vs_truncation") is None

    for result in results:
        result.update(macro_f1=0.5, macro_f1_std=0.0, accuracy=0.5, accuracy_std=0.0, pretrain_seconds=0)
        result.update(eval_examples_per_second=1.0, inference_speedup=1.0, epoch_seconds=1.0, training_speedup=1.0)
    header = format_results(results).splitlines()[:2]
    assert "vs truncation as fast" in header[0] and header[0].count("|") == header[1].count("|")
    for result in results:
        result["diff_vs_speed_matched"] = None
    assert "as fast" not in format_results(results).splitlines()[0]  # tables without the row keep their columns


def test_one_seed_keeps_the_single_run_layout(tmp_path):
    row = Row("CoDA r=3", {"reduction": 3})
    assert row_directory(tmp_path, row, 0, (0,)) == tmp_path / "coda-r-3"
    assert row_directory(tmp_path, row, 0, (0, 1)) == tmp_path / "coda-r-3" / "seed-0"
    assert row_directory(tmp_path, row, 1, (0, 1)) == tmp_path / "coda-r-3" / "seed-1"
    with pytest.raises(ValueError, match="--seeds"):
        run_experiment(tiny_preset([row]), synthetic_data(), tmp_path, seeds=(1, 1))
    (tmp_path / "coda-r-3" / "seed-0").mkdir(parents=True)
    (tmp_path / "coda-r-3" / "seed-0" / "metrics.json").write_text("{}")
    assert row_directory(tmp_path, row, 0, (0,)) == tmp_path / "coda-r-3" / "seed-0"  # a look after several seeds


def test_a_finished_run_of_seed_0_alone_is_seed_0_of_several(tmp_path):
    row = Row("CoDA r=3", {"reduction": 3})
    single = tmp_path / "coda-r-3"
    single.mkdir()
    (single / "metrics.json").write_text("{}")
    assert row_directory(tmp_path, row, 0, (0, 1, 2)) == single  # not trained again
    assert row_directory(tmp_path, row, 2, (0, 1, 2)) == single / "seed-2"
    (single / "seed-0").mkdir()
    (single / "seed-0" / "metrics.json").write_text("{}")
    assert row_directory(tmp_path, row, 0, (0, 1)) == single / "seed-0"  # a finished seed-0/ comes first


def write_finished_runs(out_dir, preset, seeds, layout=lambda row, seed: f"{row.slug}/seed-{seed}"):
    """Stand-ins for finished runs of every row: metrics.json with the recipe ``check_kept_run`` compares."""
    for row in experiment_rows(preset):
        for seed in seeds:
            directory = out_dir / layout(row, seed)
            directory.mkdir(parents=True, exist_ok=True)
            trained = asdict(row_train_config(preset, row, seed))
            (directory / "metrics.json").write_text(json.dumps({"accuracy": seed / 10, "train_config": trained}))


def test_a_run_given_part_of_the_seeds_keeps_the_table_of_every_seed(tmp_path, capsys):
    """Seeds split over processes (--seeds 0 1 in one, --seeds 2 in another) must not overwrite the 3-seed table."""
    preset = tiny_preset([Row(DENSE, {"reduction": 1}), Row("CoDA r=3", {"reduction": 3})])
    write_finished_runs(tmp_path, preset, (0, 1, 2))
    (tmp_path / "results.md").write_text("the table of seeds 0, 1 and 2")
    for seeds in ((2,), (0, 1), (0,)):  # seed 0 alone finds its run in seed-0/ and trains nothing
        assert run_experiment(preset, synthetic_data(), tmp_path, seeds=seeds) == []
        printed = capsys.readouterr().out
        assert printed.count("done before, kept") == len(experiment_rows(preset)) * len(seeds)
        assert f"no table written for seeds {list(seeds)} alone" in printed and "with --seeds 0 1 2" in printed
    assert (tmp_path / "results.md").read_text() == "the table of seeds 0, 1 and 2"
    assert not (tmp_path / "results.json").exists()
    # seeds that only some rows have (another preset's, sharing those rows) leave the table to the seeds given
    rows = experiment_rows(preset)
    assert other_finished_seeds(tmp_path, rows, (0, 1, 2)) == [] and other_finished_seeds(tmp_path, rows, (2,)) == [
        0,
        1,
    ]
    write_finished_runs(tmp_path, tiny_preset(preset.rows[:1], baselines=False), (3,))
    assert other_finished_seeds(tmp_path, rows, (0, 1, 2)) == []


def test_fresh_retrains_the_given_seeds_and_keeps_the_runs_of_the_others(tmp_path, monkeypatch):
    preset = tiny_preset([Row("CoDA r=3", {"reduction": 3})], baselines=False)
    [row] = preset.rows
    # seed 0 in the single-seed layout (OUT/<row>/, holding seed-1/ and seed-2/), seeds 1 and 2 in theirs
    write_finished_runs(tmp_path, preset, (0,), layout=lambda row, seed: row.slug)
    write_finished_runs(tmp_path, preset, (1, 2))
    (tmp_path / row.slug / "adapter.safetensors").write_text("seed 0's weights")
    (tmp_path / row.slug / "seed-2" / "adapter.safetensors").write_text("seed 2's weights")
    retrained = []

    def fake_train_row(row, preset, data, directory, model_name, seed, teacher):
        retrained.append(seed)  # the old run is gone before its seed is trained again
        assert not (directory / "metrics.json").exists() and not (directory / "adapter.safetensors").exists()
        (directory / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))

    monkeypatch.setattr("coda_adapters.app.experiment.train_row", fake_train_row)
    run_experiment(preset, synthetic_data(), tmp_path, seeds=(2,), fresh=True)
    assert retrained == [2] and not (tmp_path / row.slug / "seed-2" / "adapter.safetensors").exists()
    assert (tmp_path / row.slug / "adapter.safetensors").read_text() == "seed 0's weights"
    assert metrics_of(tmp_path / row.slug / "seed-1")["accuracy"] == 0.1
    run_experiment(preset, synthetic_data(), tmp_path, seeds=(0,), fresh=True)
    assert retrained == [2, 0] and not (tmp_path / row.slug / "adapter.safetensors").exists()
    assert [metrics_of(tmp_path / row.slug / f"seed-{s}")["accuracy"] for s in (1, 2)] == [0.1, 1.0]


def test_a_kept_run_of_another_recipe_is_refused_and_names_the_settings(tmp_path):
    """The 3-epoch and 5-epoch r = 5 presets share row names; a shared --out must not mix their runs."""
    short, long = PRESETS["prior-r5-lead39"], PRESETS["prior-r5-lead39-long"]
    [row] = [row for row in long.rows if row.coda.get("keep_first")]
    assert row.slug in {other.slug for other in short.rows}  # the same directory in a shared --out
    directory = tmp_path / row.slug
    directory.mkdir()
    trained = asdict(row_train_config(short, row, seed=0))
    (directory / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "train_config": trained}))
    check_kept_run(directory, row_train_config(short, row, seed=0))  # the same recipe: kept
    with pytest.raises(ValueError, match=r"another recipe: epochs 3 \(this preset: 5\).*another --out") as error:
        check_kept_run(directory, row_train_config(long, row, seed=0))
    assert str(directory) in str(error.value) and "dense_start 0.3333 (this preset: 0.2)" in str(error.value)
    with pytest.raises(ValueError, match=r"seed 0 \(this preset: 1\)"):
        check_kept_run(directory, row_train_config(short, row, seed=1))
    # a distilling run's teacher path names where --out was; it is not compared
    moved = {**trained, "teacher": "/elsewhere/dense"}
    (directory / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "train_config": moved}))
    check_kept_run(directory, row_train_config(short, row, seed=0))
    # a damaged metrics.json is an error naming the file, not a traceback
    (directory / "metrics.json").write_text('{"accuracy": 0.9, "train_')
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON"):
        check_kept_run(directory, row_train_config(short, row, seed=0))


def test_rows_are_selected_by_their_directory_names_in_the_preset_order():
    rows = experiment_rows(PRESETS["routing-long"])
    picked = select_rows(rows, ("coda-r-5", "dense-parallel-adapter-r-1"))
    assert [row.name for row in picked] == [DENSE, "CoDA r=5"]
    for wrong in (("coda-r-4",), ()):
        with pytest.raises(ValueError, match=r"--rows must name rows of the preset.*coda-r-3-random-router"):
            select_rows(rows, wrong)


def test_the_long_routing_recipe_spends_one_epoch_dense_one_warming_up_and_three_at_r():
    train = PRESETS["routing-long"].train
    assert (train.epochs * train.dense_start, train.epochs * train.reduction_warmup) == pytest.approx((1, 1))
    assert train.max_length == PRESETS["routing"].train.max_length == 256
    assert {**asdict(train), "epochs": 3, "dense_start": 1 / 3, "reduction_warmup": 1 / 3} == asdict(
        PRESETS["routing"].train
    )
    # the 5-epoch table at r = 5: the same recipe for every row, the 39-token lead and the baselines of r = 5
    long_r5 = PRESETS["prior-r5-lead39-long"]
    assert long_r5.train == train
    assert [row.slug for row in experiment_rows(long_r5)] == [
        "dense-parallel-adapter-r-1",
        "coda-r-5",
        "coda-r-5-first-39-tokens-kept",
        "dense-adapter-first-68-tokens-as-fast-as-coda-r-5",
        "dense-adapter-first-52-tokens",
        "coda-r-5-random-router",
    ]
    assert experiment_rows(long_r5)[3] == experiment_rows(PRESETS["prior-r5"])[3]  # the cut measured for prior-r5
    [lead] = [row for row in long_r5.rows if row.coda.get("keep_first")]
    assert row_coda_config(long_r5, lead).keep_first == 39 == 3 * token_budget(long_r5, lead) // 4


def metrics_of(directory):
    return json.loads((directory / "metrics.json").read_text())


@pytest.mark.slow
def test_seeds_and_truncation_baselines_end_to_end(tmp_path, capsys, minilm_path):
    preset = tiny_preset([Row(DENSE, {"reduction": 1}), Row("CoDA r=3 + pretraining", {"reduction": 3}, pretrain=True)])
    seeds = (0, 1)
    # one process trains a row (--rows) and writes no table while others are missing; the full run keeps it
    assert run_experiment(preset, synthetic_data(), tmp_path, seeds=seeds, only=("coda-r-3-random-router",)) == []
    assert "no table written" in capsys.readouterr().out and not (tmp_path / "results.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coda-r-3-random-router"]
    results = run_experiment(preset, synthetic_data(), tmp_path, model_name="minilm", seeds=seeds)
    assert capsys.readouterr().out.count("done before, kept") == 2
    truncation, random_router = "Dense adapter, first 11 tokens", "CoDA r=3, random router"  # 11 = ceil(32 / 3)
    by_name = {r["name"]: r for r in results}
    assert list(by_name) == [DENSE, "CoDA r=3 + pretraining", truncation, random_router]
    slugs = {DENSE: "dense-parallel-adapter-r-1", truncation: "dense-adapter-first-11-tokens"}
    slugs.update({"CoDA r=3 + pretraining": "coda-r-3-pretraining", random_router: "coda-r-3-random-router"})

    per_seed = {name: [metrics_of(tmp_path / slug / f"seed-{s}") for s in seeds] for name, slug in slugs.items()}
    for name, runs in per_seed.items():
        assert [run["train_config"]["seed"] for run in runs] == [0, 1]
        accuracies = [run["accuracy"] for run in runs]
        mean = sum(accuracies) / 2
        result = by_name[name]
        assert result["seeds"] == [0, 1] and result["accuracy_per_seed"] == accuracies
        assert result["accuracy"] == pytest.approx(mean)
        assert result["accuracy_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accuracies)))
        assert result["macro_f1_per_seed"] == [run["macro_f1"] for run in runs]
    for s in seeds:
        task = json.loads((tmp_path / slugs[truncation] / f"seed-{s}" / "coda_task.json").read_text())
        assert task["max_length"] == 11
        pretrained = json.loads(
            (
                tmp_path / slugs["CoDA r=3 + pretraining"] / f"seed-{s}" / "pretrain" / "pretrain_metrics.json"
            ).read_text()
        )
        assert pretrained["pretrain_config"]["seed"] == s
    assert by_name[truncation]["max_length"] == 11 and by_name[DENSE]["max_length"] == 32

    def expected_difference(name, reference):
        return [a["accuracy"] - b["accuracy"] for a, b in zip(per_seed[name], per_seed[reference], strict=True)]

    assert by_name[DENSE]["diff_vs_dense"] is None and by_name[DENSE]["diff_vs_truncation"] is None
    assert by_name[truncation]["diff_vs_truncation"] is None
    for name in ("CoDA r=3 + pretraining", random_router, truncation):
        difference = by_name[name]["diff_vs_dense"]
        assert difference["against"] == DENSE
        assert difference["accuracy_per_seed"] == pytest.approx(expected_difference(name, DENSE))
        assert difference["accuracy"] == pytest.approx(sum(expected_difference(name, DENSE)) / 2)
    for name in ("CoDA r=3 + pretraining", random_router):
        difference = by_name[name]["diff_vs_truncation"]
        values = expected_difference(name, truncation)
        assert difference["against"] == truncation and difference["accuracy_per_seed"] == pytest.approx(values)
        assert difference["accuracy_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))

    document = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in document["rows"]] == list(by_name)
    assert document["rows"][0]["inference_speedup"] == 1.0 and document["rows"][0]["training_speedup"] == 1.0
    table = (tmp_path / "results.md").read_text()
    assert "±" in table and all(name in table for name in by_name)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"

    capsys.readouterr()
    again = run_experiment(preset, synthetic_data(), tmp_path, model_name="minilm", seeds=seeds)
    assert capsys.readouterr().out.count("done before, kept") == 8  # 4 rows x 2 seeds
    assert [r["accuracy_per_seed"] for r in again] == [r["accuracy_per_seed"] for r in results]


@pytest.mark.slow
def test_a_distilling_row_learns_from_the_same_seeds_dense_run_and_waits_for_it(tmp_path, minilm_path):
    student = Row("CoDA r=3, distilled", {"reduction": 3}, teacher=DENSE)
    preset = tiny_preset([Row(DENSE, {"reduction": 1}), student], baselines=False)
    with pytest.raises(
        ValueError, match=r"distils .*has not finished: train it first \(--rows dense-parallel-adapter-r-1\)"
    ):
        run_experiment(preset, synthetic_data(), tmp_path, seeds=(0, 1), only=(student.slug,))
    run_experiment(preset, synthetic_data(), tmp_path, model_name="minilm", seeds=(0, 1))
    for seed in (0, 1):
        config = metrics_of(tmp_path / student.slug / f"seed-{seed}")["train_config"]
        assert config["teacher"] == str(tmp_path / "dense-parallel-adapter-r-1" / f"seed-{seed}")
        assert config["seed"] == seed
    assert metrics_of(tmp_path / "dense-parallel-adapter-r-1" / "seed-0")["train_config"]["teacher"] is None
    orphan = tiny_preset([Row("CoDA r=3, distilled", {"reduction": 3}, teacher="no such row")], baselines=False)
    with pytest.raises(ValueError, match="distils 'no such row', which is not a row of the preset"):
        run_experiment(orphan, synthetic_data(), tmp_path / "orphan")


def test_the_needle_table_shows_each_routed_row_and_layer():
    from coda_adapters.app.experiment import format_routed_evidence

    shares = {
        "0": {"key": 0.36, "access": 0.98, "distractor": 0.31},
        "1": {"key": 0.99, "access": 0.0, "distractor": 1.0},
    }
    results = [{"name": DENSE, "routed_needle": None}, {"name": "CoDA r=3", "routed_needle": shares}]
    lines = format_routed_evidence(results).strip().splitlines()
    assert lines[-3:] == [
        "| model | layer 0 | layer 1 |",
        "|---|---|---|",
        "| CoDA r=3 | 36 / 98 / 31 | 99 / 0 / 100 |",
    ]
    assert format_routed_evidence([{"name": DENSE}]) == ""  # not a needle experiment


def test_every_preset_is_a_choice_of_the_experiment_command():
    from coda_adapters.app.cli import build_parser

    parser = build_parser()
    for name in PRESETS:
        assert parser.parse_args(["experiment", "--preset", name, "--out", "x"]).preset == name
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "--preset", "no-such-preset", "--out", "x"])


def test_the_z_loss_preset_trains_its_two_z_loss_rows_with_their_weights_and_every_other_row_without():
    preset = PRESETS["needle-z-loss"]
    weights = {row.slug: row_train_config(preset, row, seed=0).router_z_loss for row in experiment_rows(preset)}
    assert weights == {
        "dense-parallel-adapter-r-1": 0.0,
        "coda-r-5": 0.0,
        "coda-r-5-router-z-loss-0-001": 1e-3,
        "dense-adapter-first-42-tokens-as-fast-as-coda-r-5": 0.0,
        "coda-r-5-router-z-loss-0-1": 0.1,
        "dense-adapter-first-26-tokens": 0.0,
        "coda-r-5-random-router": 0.0,
    }
    assert {row_coda_config(preset, row).reduction for row in preset.rows if "z-loss" in row.slug} == {5}


def test_the_pretraining_preset_pretrains_only_its_pretraining_rows_with_their_settings():
    preset = PRESETS["needle-pretrain"]
    pretrained = {row.slug: row_pretrain_config(preset, row, seed=2) for row in experiment_rows(preset) if row.pretrain}
    assert {slug: config.routers_only for slug, config in pretrained.items()} == {
        "coda-r-3-layer-wise-pretraining-routers": True,
        "coda-r-5-layer-wise-pretraining-routers": True,
        "coda-r-16-layer-wise-pretraining-routers": True,
        "coda-r-3-layer-wise-pretraining-routers-and-adapters": False,
    }
    for config in pretrained.values():
        assert (config.objective, config.reduction_warmup, config.seed, config.max_length) == ("layerwise", 0.5, 2, 128)
    # each pretrained row has its plain twin and the baselines of its reduction; one recipe for every row
    names = {row.name for row in experiment_rows(preset)}
    for r, budget in ((3, 43), (5, 26), (16, 8)):
        assert {f"CoDA r={r}", f"CoDA r={r}, random router", f"Dense adapter, first {budget} tokens"} <= names
    assert len({asdict(row_train_config(preset, row, seed=0))["epochs"] for row in experiment_rows(preset)}) == 1
    # a row's own pretraining settings override the preset's
    row = Row("CoDA r=3 + pooled pretraining", {"reduction": 3}, pretrain={"objective": "pooled", "steps": 7})
    config = row_pretrain_config(preset, row, seed=1)
    assert (config.objective, config.steps, config.reduction_warmup, config.seed) == ("pooled", 7, 0.5, 1)


def test_the_router_learning_rate_preset_reuses_the_pretraining_presets_runs_and_changes_only_the_router_rate():
    # its comment says: copy needle-pretrain's directories in. That is only sound if the shared rows have the same
    # names and the same recipes (check_kept_run would refuse them otherwise)
    shared, faster = PRESETS["needle-pretrain"], PRESETS["needle-pretrain-router-lr"]
    shared_rows = {row.slug: row for row in experiment_rows(shared)}
    new_rows = []
    for row in experiment_rows(faster):
        if row.slug in shared_rows:
            twin = shared_rows[row.slug]
            assert row_train_config(faster, row, seed=1) == row_train_config(shared, twin, seed=1)
            assert bool(row.pretrain) == bool(twin.pretrain)
            if row.pretrain:
                assert row_pretrain_config(faster, row, seed=1) == row_pretrain_config(shared, twin, seed=1)
        else:
            new_rows.append(row)
    # r = 3, 5, 16 at 10x, each plain and pretrained, and pretrained at 30x
    assert len(new_rows) == 9
    for row in new_rows:
        scale = 10.0 if row.slug.endswith("-10x-the-learning-rate") else 30.0
        plain = shared_rows[re.sub(r"-routers-at-\d+x-the-learning-rate$", "", row.slug)]
        assert row.coda == plain.coda and bool(row.pretrain) == bool(plain.pretrain)
        expected = replace(row_train_config(shared, plain, seed=1), router_lr_scale=scale)
        assert row_train_config(faster, row, seed=1) == expected


def test_the_bbc_router_learning_rate_preset_shares_the_kept_lead_presets_rows_and_pretrains_as_on_bbc_needle():
    # its rows without pretraining are prior-r5-lead39's (same names and recipes, so their runs can be reused);
    # each pretrained row is a plain row's twin with the needle pretraining at BBC's length and routers at 30x
    shared, bbc = PRESETS["prior-r5-lead39"], PRESETS["bbc-pretrain-router-lr"]
    shared_rows = {row.slug: row for row in experiment_rows(shared)}
    pretrained = [row for row in experiment_rows(bbc) if row.pretrain]
    for row in experiment_rows(bbc):
        if not row.pretrain:
            assert row_train_config(bbc, row, seed=2) == row_train_config(shared, shared_rows[row.slug], seed=2)
    assert [row.coda for row in pretrained] == [{"reduction": 5}, {"reduction": 5, "keep_first": 39}]
    for row in pretrained:
        plain = shared_rows[re.sub(r"-layer-wise-pretraining-routers-routers-at-30x-the-learning-rate$", "", row.slug)]
        assert row.coda == plain.coda
        expected = replace(row_train_config(shared, plain, seed=2), router_lr_scale=30.0)
        assert row_train_config(bbc, row, seed=2) == expected
        needle = replace(row_pretrain_config(PRESETS["needle-pretrain"], row, seed=2), max_length=256)
        assert row_pretrain_config(bbc, row, seed=2) == needle


def test_the_bbc_r5_lead_preset_is_the_bbc_router_learning_rate_preset_without_its_pretrained_rows():
    plain, bbc = PRESETS["bbc-r5-lead39"], PRESETS["bbc-pretrain-router-lr"]
    without_pretraining = [row for row in experiment_rows(bbc) if not row.pretrain]
    assert [row.slug for row in experiment_rows(plain)] == [row.slug for row in without_pretraining]
    for mine, theirs in zip(experiment_rows(plain), without_pretraining, strict=True):
        assert row_coda_config(plain, mine) == row_coda_config(bbc, theirs)
        assert row_train_config(plain, mine, seed=3) == row_train_config(bbc, theirs, seed=3)


def test_a_kept_run_pretrained_otherwise_is_refused_and_names_the_pretraining_setting(tmp_path):
    preset = PRESETS["needle-pretrain"]
    [row] = [row for row in preset.rows if row.slug == "coda-r-3-layer-wise-pretraining-routers"]
    directory = tmp_path / row.slug
    (directory / "pretrain").mkdir(parents=True)
    trained = asdict(row_train_config(preset, row, seed=0))
    (directory / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "train_config": trained}))
    pretrained = {**asdict(row_pretrain_config(preset, row, seed=0)), "objective": "distill"}
    (directory / "pretrain" / "pretrain_metrics.json").write_text(json.dumps({"pretrain_config": pretrained}))
    check_kept_run(directory, row_train_config(preset, row, seed=0))  # no pretraining asked for: not compared
    with pytest.raises(ValueError, match=r"pretraining objective 'distill' \(this preset: 'layerwise'\)"):
        check_kept_run(directory, row_train_config(preset, row, seed=0), row_pretrain_config(preset, row, seed=0))
    pretrained["objective"] = "layerwise"
    (directory / "pretrain" / "pretrain_metrics.json").write_text(json.dumps({"pretrain_config": pretrained}))
    check_kept_run(directory, row_train_config(preset, row, seed=0), row_pretrain_config(preset, row, seed=0))


def test_a_pretrained_row_whose_routers_would_be_fitted_again_is_refused_before_training(tmp_path):
    row = Row("CoDA r=3 + pretraining, fitted", {"reduction": 3}, pretrain=True, train={"router_init": "attention"})
    with pytest.raises(ValueError, match=r"--router-init attention fits the routers .* use one of the two"):
        train_row(row, tiny_preset([row]), synthetic_data(), tmp_path / row.slug, "no-model-needed")
    assert not (tmp_path / row.slug).exists()  # nothing pretrained, nothing written
