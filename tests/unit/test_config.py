from pathlib import Path

import pytest
import yaml

from invasive_dist.config import Config, load_config, parse_override, save_config
from invasive_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3
    assert cfg.data.batch_size == Config().data.batch_size
    assert cfg.output.name == "c"


def test_unknown_key_names_path_and_file(tmp_path):
    p = write(tmp_path, "train:\n  epochz: 3\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.epochz" in msg and str(p) in msg and "epochs" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(UserError, match=r"'trainer'"):
        load_config(write(tmp_path, "trainer:\n  epochs: 3\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  epochs: three\n", "train.epochs"),
        ("train:\n  epochs: 2.5\n", "train.epochs"),
        ("model:\n  channels_last: 1\n", "model.channels_last"),
        ("train:\n  mixed_precision: fp8\n", "train.mixed_precision"),
        ("optim:\n  lr: '0.1'\n", "optim.lr"),
        ("profile:\n  ranks: 0\n", "profile.ranks"),
        ("data: 3\n", "data"),
    ],
)
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value)


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_overrides_nested_and_typed(tmp_path):
    cfg = load_config(
        write(tmp_path, "train:\n  epochs: 3\n"),
        [
            "train.epochs=5",
            "model.arch=resnet34",
            "data.root=data/x",
            "model.weights=null",
            "profile.ranks=[0,1]",
        ],
    )
    assert cfg.train.epochs == 5
    assert cfg.model.arch == "resnet34"
    assert cfg.data.root == "data/x"
    assert cfg.model.weights is None
    assert cfg.profile.ranks == [0, 1]


def test_bad_override_names_override(tmp_path):
    with pytest.raises(UserError, match="train.epoch=3"):
        load_config(write(tmp_path, ""), ["train.epoch=3"])
    with pytest.raises(UserError, match="key.path=value"):
        load_config(write(tmp_path, ""), ["train.epochs"])
    with pytest.raises(UserError, match="expected an integer"):
        load_config(write(tmp_path, ""), ["train.epochs=abc"])


def test_impossible_combinations(tmp_path):
    with pytest.raises(UserError, match="data.fold=5"):
        load_config(write(tmp_path, ""), ["data.fold=5", "data.n_folds=5"])
    with pytest.raises(UserError, match="cache_short_side"):
        load_config(write(tmp_path, ""), ["data.cache_short_side=100", "data.image_size=224"])
    with pytest.raises(UserError, match="grad_accum"):
        load_config(write(tmp_path, ""), ["train.grad_accum=0"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["train.epochs=7", "data.hflip=false"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 7


def test_parse_override_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_unquoted_no_is_the_choice_no(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  mixed_precision: no\n"), ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
