"""The command line's options come from the settings dataclasses; bad paths and lengths are one-line errors."""

import dataclasses

import pytest

from coda_adapters import CodaConfig
from coda_adapters.app.classify import TrainConfig
from coda_adapters.app.cli import CLI_CODA_DEFAULTS, build_parser, main
from coda_adapters.app.options import dataclass_from_args
from coda_adapters.app.pretrain import PretrainConfig


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_every_coda_config_field_is_an_option_with_the_library_default_or_the_cli_override():
    args = parse("train", "--out", "x")
    assert dataclass_from_args(CodaConfig, args) == CodaConfig(**CLI_CODA_DEFAULTS)
    assert CLI_CODA_DEFAULTS == {"pooling": "mean"}  # the one deliberate difference, documented in cli.py
    assert dataclass_from_args(TrainConfig, args) == TrainConfig()


@pytest.mark.parametrize(("command", "config_class"), [("train", TrainConfig), ("pretrain", PretrainConfig)])
def test_every_settings_field_has_an_option(command, config_class):
    args = vars(parse(command, "--out", "x"))
    for cls in (CodaConfig, config_class):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in args]
        assert not missing, f"{cls.__name__} fields without an option: {missing}"


def test_options_of_every_kind_reach_the_configs():
    args = parse(
        "train", "--out", "x", "--reduction", "5", "--layers", "1", "0", "--no-keep-pooled-token",
        "--soft-topk", "coordinate_descent", "--lora-target-modules", "query", "key", "--epochs", "7",
    )  # fmt: skip
    coda = dataclass_from_args(CodaConfig, args)
    assert (coda.reduction, coda.layers, coda.keep_pooled_token) == (5.0, [0, 1], False)
    assert coda.soft_topk_method == "coordinate_descent"  # the old --soft-topk spelling still works
    assert coda.lora_target_modules == ["query", "key"]
    assert dataclass_from_args(TrainConfig, args).epochs == 7


def test_choices_come_from_the_config_and_bad_ones_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse("train", "--out", "x", "--adapter", "sideways")
    assert "invalid choice: 'sideways'" in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        parse("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--reduction REDUCTION", "(default: 3.0)", "(default: mean)", "--epochs EPOCHS", "(default: 3)"):
        assert shown in text


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_an_output_directory_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, err = run_main(capsys, "train", "--out", blocker / "run")
    assert code == 2 and "--out" in err and "cannot create this directory" in err and "Traceback" not in err
    code, err = run_main(capsys, "eval", "--adapter", tmp_path, "--json", tmp_path)
    assert code == 2 and "--json" in err and "is a directory" in err


def test_max_length_below_two_is_rejected_naming_the_option(tmp_path, capsys):
    code, err = run_main(capsys, "train", "--out", tmp_path / "run", "--max-length", "1")
    assert code == 2 and "--max-length must be an int >= 2, got 1" in err


def test_max_length_that_leaves_no_room_for_text_is_rejected(minilm_tokenizer):
    from coda_adapters.app.classify import Encoded

    with pytest.raises(ValueError, match="--max-length must be more than the 2 special tokens"):
        Encoded(minilm_tokenizer, ["some text"], None, max_length=2)
    assert len(Encoded(minilm_tokenizer, ["some text"], None, max_length=3).ids[0]) == 3


@pytest.mark.parametrize("command", [("train", "--data"), ("pretrain", "--corpus")])
def test_a_directory_given_as_data_is_named_as_a_directory(tmp_path, capsys, command):
    code, err = run_main(capsys, command[0], command[1], tmp_path, "--out", tmp_path / "run")
    assert code == 2 and f"{tmp_path}: is a directory" in err and "no such file" not in err


def test_train_refuses_to_fit_routers_over_the_ones_init_loads(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(capsys, "train", "--init", tmp_path / "pre", "--router-init", "attention", "--out", out)
    assert code == 2 and "--router-init attention fits the routers" in err and f"--init {tmp_path / 'pre'}" in err
    assert not out.exists()
