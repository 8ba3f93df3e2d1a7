"""The run's configuration (fastclr/app/config.py): the shipped recipes, files, --help, the
typed RunConfig and its record, which checkpoints and config.yaml files of 0.1.0 still match."""
import glob
import os

import pytest
import yaml

from fastclr.app import config, train
from test_train import TINY

CONFIGS = sorted(glob.glob(os.path.join(config.CONFIG_DIR, "*.yaml")))
OLD_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "run_0.1.0", "config.yaml")


# --- configuration ------------------------------------------------------------------------------

def test_configs_are_shipped():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"digits.yaml", "cifar10_resnet18_solo_learn.yaml", "cifar10_resnet50_simclr_b9.yaml",
            "imagenet_resnet50_simclr.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_parses_and_resolves(path):
    with open(path) as f:
        raw = yaml.safe_load(f)
    with open(path) as f:
        assert f.readline().startswith("#"), "each config says where it comes from"
    args = config.parse_args(["--config", path])
    for key, value in raw.items():
        assert getattr(args, key.replace("-", "_")) == value, key
    for key in config.DATASET_DEFAULTS["digits"]:
        assert getattr(args, key) is not None, key  # resolved: nothing left to the dataset
    with pytest.raises(SystemExit) as exc:  # --help-level: the parser takes the file
        config.parse_args(["--config", path, "--help"])
    assert exc.value.code == 0


def test_published_recipes_say_what_they_are():
    solo = config.parse_args(["--config", os.path.join(config.CONFIG_DIR, "cifar10_resnet18_solo_learn.yaml")])
    assert (solo.batch_size, solo.base_lr, solo.temperature, solo.proj_hidden, solo.proj_dim,
            solo.epochs) == (256, 0.4, 0.2, 2048, 256, 1000)
    b9 = config.parse_args(["--config", os.path.join(config.CONFIG_DIR, "cifar10_resnet50_simclr_b9.yaml")])
    assert (b9.backbone, b9.batch_size, b9.temperature) == ("resnet50", 1024, 0.5)
    inet = config.parse_args(["--config", os.path.join(config.CONFIG_DIR, "imagenet_resnet50_simclr.yaml")])
    assert (inet.batch_size, inet.base_lr, inet.lr_scaling, inet.temperature, inet.weight_decay,
            inet.epochs) == (4096, 0.3, "linear", 0.1, 1e-6, 100)


def test_default_config_is_the_default_run():
    """the shipped digits recipe spells out what `python -m fastclr.train` does with no flags."""
    default = config.parse_args([]).to_dict()
    from_file = config.parse_args(["--config", os.path.join(config.CONFIG_DIR, "digits.yaml")]).to_dict()
    assert default == from_file


def test_config_by_name_is_the_shipped_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any folder: the recipes are package data
    by_name = config.parse_args(["--config", "cifar10_resnet50_simclr_b9"]).to_dict()
    by_path = config.parse_args(
        ["--config", os.path.join(config.CONFIG_DIR, "cifar10_resnet50_simclr_b9.yaml")]).to_dict()
    assert by_name == by_path
    with pytest.raises(SystemExit, match="neither a file nor a shipped recipe .*digits"):
        config.parse_args(["--config", "digitz"])


def test_command_line_overrides_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\nbatch-size: 128\ntemperature: 0.3\ncompile: false\n")
    args = config.parse_args(["--config", str(cfg), "--epochs", "9"])
    assert (args.epochs, args.batch_size, args.temperature) == (9, 128, 0.3)


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown key 'epochz' (did you mean 'epochs'?)"),
    ("epochs: 2.5\n", "epochs must be int"),
    ("epochs: true\n", "epochs must be int"),
    ("loss: triplet\n", "loss must be one of"),
    ("compile: 1\n", "compile must be bool"),
    ("- epochs\n", "must be a mapping"),
    ("resume: auto\n", "unknown key 'resume'"),
    ("epochs: [\n", "cannot read"),
])
def test_bad_config_is_refused_clearly(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as exc:
        config.parse_args(["--config", str(cfg)])
    assert message in str(exc.value)


def test_help_shows_defaults_and_per_dataset_ones(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--log-every LOG_EVERY read the loss" in out and "(default: 10)" in out
    assert "(default: 0.9)" in out  # momentum
    assert "default per --dataset: digits 256, fashion-mnist 512, cifar10 512" in out  # batch size
    assert "--config FILE.yaml" in out


def test_config_is_printed_and_resume_checks_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--epochs", "1", "--out", out])
    printed = capsys.readouterr().out
    assert "configuration (saved as config.yaml):" in printed and "  width: 4" in printed
    with pytest.raises(SystemExit, match=r"different run: --loss 'ntxent' there, 'supcon' here"):
        train.main(TINY + ["--epochs", "1", "--out", out, "--resume", "auto", "--loss", "supcon"])


# --- RunConfig and its record -------------------------------------------------------------------

def test_the_record_is_every_flag_but_resume():
    record = config.parse_args(["--resume", "auto"]).to_dict()
    assert "resume" not in record and "config" not in record
    assert config.RunConfig.from_dict(record) == config.parse_args([])  # resume: not part of the run


def test_a_config_yaml_of_0_1_0_reads_back_as_the_same_run():
    """The record 0.1.0 wrote (its config.yaml; its checkpoints hold the same dict): every key is
    still a field, it loads as --config, and reads back as the RunConfig it describes (a key
    added since takes its default)."""
    with open(OLD_CONFIG) as f:
        old = yaml.safe_load(f)
    today = config.parse_args([]).to_dict()
    assert set(old) <= set(today)
    assert {k: v for k, v in config.RunConfig.from_dict(old).to_dict().items() if k in old} == old
    assert config.parse_args(["--config", OLD_CONFIG]).to_dict() == config.RunConfig.from_dict(old).to_dict()


def test_a_record_older_still_reads_with_what_it_meant():
    record = config.parse_args([]).to_dict()
    del record["optimizer"]  # checkpoints written before --optimizer existed trained with LARS
    assert config.RunConfig.from_dict(record).optimizer == "lars"
    with pytest.raises(ValueError, match=r"unknown keys \['warp_drive'\]"):
        config.RunConfig.from_dict({**record, "warp_drive": 9})


def test_every_field_is_a_flag_and_a_file_key(tmp_path):
    names = [f.name for f in config.dataclasses.fields(config.RunConfig)]
    flags = {a.dest for a in config.build_parser()._actions}
    assert set(names) <= flags
    settable = [f.name for f in config.dataclasses.fields(config.RunConfig)
                if f.metadata["recorded"]]  # a command's own flags (--resume, --deterministic) are not a run's
    assert {"resume", "rescan", "deterministic"}.isdisjoint(settable)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({n: getattr(config.parse_args([]), n) for n in settable}))
    assert config.parse_args(["--config", str(cfg)]) == config.parse_args([])
