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
    with pytest.raises(UserError, match="data.gpu_cache.short_side=100 is smaller than data.image_size=224"):
        load_config(write(tmp_path, ""), ["data.gpu_cache.short_side=100", "data.image_size=224"])
    with pytest.raises(UserError, match="data.dali.hw_decoder_load=1.5 must be in"):
        load_config(write(tmp_path, ""), ["data.dali.hw_decoder_load=1.5"])
    with pytest.raises(UserError, match="data.torch.num_workers=-1"):
        load_config(write(tmp_path, ""), ["data.torch.num_workers=-1"])
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


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "+1e-3", "0.001"])
def test_float_written_as_users_write_it(tmp_path, text):
    """PyYAML alone reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`): files and overrides agree."""
    from_file = load_config(write(tmp_path, f"optim:\n  lr: {text}\n  weight_decay: 5e-5\n"))
    from_override = load_config(None, [f"optim.lr={text}", "optim.weight_decay=5e-5"])
    for cfg in (from_file, from_override):
        assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
        assert cfg.optim.weight_decay == pytest.approx(5e-5)


def test_exponent_is_still_no_integer(tmp_path):
    with pytest.raises(UserError, match="train.epochs.*expected an integer"):
        load_config(None, ["train.epochs=1e3"])
    assert load_config(None, ["data.root=1e3x"]).data.root == "1e3x"  # not a number: a string


@pytest.mark.parametrize(
    "override, hint",
    [
        ("train.epoch=3", "did you mean 'train.epochs'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.mixed_precision=bf61", "did you mean 'bf16'"),
        ("model.arch=resnet19", "did you mean 'resnet18'"),
    ],
)
def test_did_you_mean(tmp_path, override, hint):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, ""), [override])
    assert hint in str(e.value) and f"command-line override {override!r}" in str(e.value)


def test_arch_typo_in_file_names_file(tmp_path):
    p = write(tmp_path, "model:\n  arch: resnet5O\n")
    with pytest.raises(UserError, match=rf"{p}.*model.arch='resnet5O'.*did you mean 'resnet50'"):
        load_config(p)


def test_impossible_combination_blames_the_override_not_the_file(tmp_path):
    p = write(tmp_path, "data:\n  n_folds: 5\n")
    with pytest.raises(UserError) as e:
        load_config(p, ["train.epochs=3", "data.fold=7"])
    msg = str(e.value)
    assert msg.startswith("command-line override 'data.fold=7'") and str(p) not in msg
    # the file alone impossible: the file is named
    bad = write(tmp_path, "data:\n  fold: 9\n")
    with pytest.raises(UserError, match=rf"^{bad}: data.fold=9"):
        load_config(bad, ["train.epochs=3"])


def test_describe_has_every_key_with_its_comment_and_loads_back(tmp_path):
    from invasive_dist.config import config_from_dict, describe, yaml_load

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["optim.lr=1e-3"])
    text = describe(cfg)
    assert config_from_dict(yaml_load(text)) == cfg
    lr = next(line for line in text.splitlines() if line.strip().startswith("lr:"))
    assert "0.001" in lr and "# peak learning rate" in lr and "[default 0.1]" in lr
    # every leaf key is on a line with a comment
    leaves = [line for line in text.splitlines() if not line.rstrip().endswith(":")]
    assert len(leaves) > 60 and all("  # " in line for line in leaves)


def test_each_backend_has_its_own_section_and_old_keys_say_where_they_went(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  torch:\n    num_workers: 7\n"), ["data.dali.threads=3"])
    assert (cfg.data.torch.num_workers, cfg.data.dali.threads, cfg.data.gpu_cache.short_side) == (7, 3, 0)
    with pytest.raises(
        UserError, match=r"c.yaml: config key 'data.num_workers' is now 'data.torch.num_workers'"
    ):
        load_config(write(tmp_path, "data:\n  num_workers: 7\n"))
    with pytest.raises(UserError, match=r"override 'data.dali_threads=3'.*now 'data.dali.threads'"):
        load_config(write(tmp_path, ""), ["data.dali_threads=3"])
    with pytest.raises(UserError, match=r"'data.dali.thread'.*did you mean 'data.dali.threads'"):
        load_config(write(tmp_path, ""), ["data.dali.thread=3"])


def test_a_file_with_three_mistakes_reports_all_three(tmp_path):
    """Issue 24: one run names every problem of a file (an unknown key, a bad value, an impossible
    value), instead of one per run."""
    p = write(tmp_path, "train:\n  epochz: 3\n  mixed_precision: fp8\noptim:\n  lr: -1\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ")
    for problem in (
        "'train.epochz' (did you mean 'train.epochs'?)",
        "train.mixed_precision: 'fp8'",
        "optim.lr=-1.0",
    ):
        assert problem in msg


def test_every_bad_override_is_named_at_once(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, ""), ["train.epoch=3", "train.epochs=abc", "model.channels_last=2"])
    msg = str(e.value)
    for ov in ("train.epoch=3", "train.epochs=abc", "model.channels_last=2"):
        assert f"command-line override {ov!r}" in msg


@pytest.mark.parametrize("value", ["128x96", "128X96", "128*96"])
def test_image_size_written_as_width_x_height_says_how_to_write_it(value):
    """Issue 24: `data.image_size=128x96` said "expected an integer"; synth --size is WxH."""
    with pytest.raises(UserError) as e:
        load_config(None, [f"data.image_size={value}"])
    msg = str(e.value)
    assert "[96, 128]" in msg and "128 wide and 96 high" in msg and "synth --size is WIDTHxHEIGHT" in msg
    assert load_config(None, ["data.image_size=[96, 128]"]).data.image_size == [96, 128]  # as it says


def test_resume_may_change_only_what_does_not_change_what_is_trained():
    from invasive_dist.config import resume_differences, to_dict

    saved = to_dict(load_config(ROOT / "configs" / "demo.yaml"))
    allowed = ["train.epochs=30", "dist.timeout_s=60", "data.backend=synthetic", "data.torch.num_workers=4"]
    allowed += ["output.tensorboard=false", "profile.enabled=true", "checkpoint.every_steps=100"]
    assert resume_differences(saved, load_config(ROOT / "configs" / "demo.yaml", allowed)) == []
    for override in (
        "model.arch=resnet34",
        "optim.lr=0.5",
        "data.image_size=64",
        "seed=3",
        "optim.weight_decay=0.3",
    ):
        key = override.split("=")[0]
        diffs = resume_differences(saved, load_config(ROOT / "configs" / "demo.yaml", [override]))
        assert len(diffs) == 1 and diffs[0].startswith(f"{key}="), (override, diffs)
    del saved["train"]["epochs"]  # a run written before a key existed: the key counts as its default
    assert resume_differences(saved, load_config(ROOT / "configs" / "demo.yaml", ["train.epochs=5"])) == []
