import urllib.error

import pytest
import torch
import torchvision

from invasive_dist.archs import input_size_problem
from invasive_dist.config import ModelConfig, config_from_dict
from invasive_dist.errors import UserError
from invasive_dist.models import binary_loss, build_model, head_name, split_outputs


@pytest.mark.parametrize(
    "arch, head", [("resnet18", "fc"), ("resnet50", "fc"), ("mobilenet_v3_small", "classifier.3")]
)
def test_one_logit_head(arch, head):
    m = build_model(ModelConfig(arch=arch))
    assert head_name(m) == head
    assert m.get_submodule(head).out_features == 1
    with torch.no_grad():
        assert m.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 1)


def test_unknown_arch_names_key():
    with pytest.raises(UserError, match="model.arch='resnet19'"):
        build_model(ModelConfig(arch="resnet19"))


def test_local_imagenet_state_dict_loads_backbone(tmp_path):
    """A torchvision checkpoint with the 1000-class head: the backbone loads, the head is ours."""
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(ModelConfig(arch="resnet18", weights=str(path)))
    assert torch.equal(m.conv1.weight, ref.conv1.weight)
    assert m.fc.out_features == 1


def test_own_checkpoint_loads_with_head(tmp_path):
    a = build_model(ModelConfig(arch="resnet18"))
    torch.nn.init.constant_(a.fc.bias, 3.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": a.state_dict()}, path)
    b = build_model(ModelConfig(arch="resnet18", weights=str(path)))
    assert torch.equal(b.fc.bias, a.fc.bias)


def test_mismatched_state_dict_is_user_error(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match="does not match model.arch=resnet18"):
        build_model(ModelConfig(arch="resnet18", weights=str(path)))


def test_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_model(ModelConfig(arch="resnet18", weights=str(tmp_path / "nope.pth")))


def test_imagenet_offline_says_how_to_use_a_local_file(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as e:
        build_model(ModelConfig(arch="resnet18", weights="imagenet"))
    msg = str(e.value)
    assert "model.weights=/path/to/resnet18-" in msg and "download" in msg


# ----------------------------------------------------------------------------------------------
# Auxiliary heads (inception_v3, googlenet), input sizes, refusals


def test_googlenet_aux_heads_kept_are_one_logit_and_in_the_loss():
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch="googlenet", aux_loss_weight=0.3))
    assert head_name(m) == "fc"
    assert [m.get_submodule(h).out_features for h in ("fc", "aux1.fc2", "aux2.fc2")] == [1, 1, 1]
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0.0, 1.0])
    out = m.train()(x)
    main, aux = split_outputs(out)
    assert main.shape == (2, 1) and [a.shape for a in aux] == [(2, 1), (2, 1)]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(main.squeeze(1), y) + 0.3 * sum(bce(a.squeeze(1), y) for a in aux)
    assert torch.allclose(binary_loss(out, y, 0.3), expected)
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 1)  # evaluation: the main logit alone


def test_aux_heads_removed_by_default():
    m = build_model(ModelConfig(arch="inception_v3"))
    assert m.AuxLogits is None and not any(k.startswith("AuxLogits.") for k in m.state_dict())
    out = m.train()(torch.randn(2, 3, 75, 75))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1)
    y = torch.tensor([1.0, 0.0])
    assert torch.equal(
        binary_loss(out, y, 0.0), torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y)
    )


@pytest.mark.parametrize("keep_aux", [False, True])
def test_local_imagenet_googlenet_with_aux_heads_loads(tmp_path, keep_aux):
    """torchvision's 1000-class checkpoint holds aux heads: dropped when not kept, loaded (but the
    last layer) when kept."""
    ref = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path / "googlenet-imagenet.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(ModelConfig(arch="googlenet", weights=str(path), aux_loss_weight=0.3 * keep_aux))
    assert torch.equal(m.conv1.conv.weight, ref.conv1.conv.weight)
    assert m.fc.out_features == 1
    if keep_aux:
        assert torch.equal(m.aux1.fc1.weight, ref.aux1.fc1.weight) and m.aux1.fc2.out_features == 1
    else:
        assert m.aux1 is None and m.aux2 is None


def test_own_checkpoint_with_and_without_aux_heads(tmp_path):
    """A checkpoint trained with the aux heads loads without them, and the other way round (the
    heads then start from their initialisation)."""
    with_aux = build_model(ModelConfig(arch="googlenet", aux_loss_weight=0.3))
    torch.save({"model": with_aux.state_dict()}, tmp_path / "a.pt")
    plain = build_model(ModelConfig(arch="googlenet", weights=str(tmp_path / "a.pt")))
    assert plain.aux1 is None and torch.equal(plain.fc.weight, with_aux.fc.weight)
    torch.save({"model": plain.state_dict()}, tmp_path / "b.pt")
    again = build_model(ModelConfig(arch="googlenet", weights=str(tmp_path / "b.pt"), aux_loss_weight=0.3))
    assert again.aux2.fc2.out_features == 1 and torch.equal(again.fc.weight, plain.fc.weight)


def test_squeezenet_refused_with_reason():
    with pytest.raises(UserError, match="model.arch=squeezenet1_1 is not supported: .*ReLU"):
        build_model(ModelConfig(arch="squeezenet1_1"))


@pytest.mark.parametrize(
    "model, size, expected",
    [
        ({"arch": "inception_v3", "aux_loss_weight": 0.4}, 96, r"data.image_size=96 .* at least 299 px"),
        ({"arch": "inception_v3"}, 74, r"data.image_size=74 is too small .* at least 75 px"),
        ({"arch": "vit_b_16"}, 64, r"data.image_size=64: model.arch=vit_b_16 takes only 224x224"),
        ({"arch": "resnet18", "aux_loss_weight": 0.4}, 64, "resnet18 has no auxiliary heads"),
        ({"arch": "googlenet", "aux_loss_weight": -1.0}, 64, r"model.aux_loss_weight=-1.0 must be >= 0"),
        ({"arch": "squeezenet1_0"}, 224, "squeezenet1_0 is not supported"),
    ],
)
def test_config_refuses_model_and_size_before_work(model, size, expected):
    with pytest.raises(UserError, match=expected):
        config_from_dict({"model": model, "data": {"image_size": size}})


def test_config_accepts_the_minimum_sizes():
    config_from_dict({"model": {"arch": "inception_v3"}, "data": {"image_size": 75}})
    config_from_dict({"model": {"arch": "inception_v3", "aux_loss_weight": 0.4}, "data": {"image_size": 299}})
    config_from_dict({"model": {"arch": "googlenet", "aux_loss_weight": 0.3}, "data": {"image_size": 16}})


def test_input_size_rules_for_height_width_and_weights():
    assert "at least 75 px" in input_size_problem("inception_v3", [300, 74])
    assert input_size_problem("inception_v3", [75, 400]) is None
    assert "takes only 518x518" in input_size_problem("vit_h_14", 224, weights="imagenet")
    assert input_size_problem("vit_h_14", 224) is None


def test_train_refuses_too_small_input_before_any_work(tmp_path, capsys):
    from invasive_dist.cli import main

    args = ["train", "model.arch=inception_v3", "model.aux_loss_weight=0.4", "data.image_size=96"]
    assert main([*args, f"data.root={tmp_path / 'nowhere'}", f"output.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.image_size=96 is too small for model.arch=inception_v3" in err and "299" in err
    assert not any(tmp_path.iterdir())  # no run directory, nothing read


@pytest.mark.parametrize(
    "arch, weight, aux_last",
    [("inception_v3", 0.0, None), ("inception_v3", 0.4, "AuxLogits.fc"), ("googlenet", 0.3, "aux1.fc2")],
)
def test_imagenet_weights_with_and_without_aux_heads(monkeypatch, arch, weight, aux_last):
    """torchvision's builders refuse aux_logits=False together with weights: the heads are loaded,
    then removed or given a one-logit layer. The download is replaced by a 1000-class state dict."""
    ref = torchvision.models.get_model(arch, weights=None, aux_logits=True, init_weights=False)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: ref.state_dict())
    m = build_model(ModelConfig(arch=arch, weights="imagenet", aux_loss_weight=weight))
    first_conv = next(n for n, p in m.named_parameters() if p.ndim == 4)
    assert torch.equal(m.get_parameter(first_conv), ref.get_parameter(first_conv))
    assert m.fc.out_features == 1 and m.aux_logits == (aux_last is not None)
    if aux_last:
        assert m.get_submodule(aux_last).out_features == 1
    else:
        assert m.AuxLogits is None


def test_kept_aux_heads_train_at_the_head_learning_rate():
    """Kept aux heads end in new one-logit layers: like the main head they get optim.lr, not the
    backbone's optim.lr x backbone_lr_mult."""
    from invasive_dist.config import OptimConfig
    from invasive_dist.optim import param_groups

    m = build_model(ModelConfig(arch="googlenet", aux_loss_weight=0.3))
    groups = param_groups(m, OptimConfig(backbone_lr_mult=0.1), lr=1.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for layer in (m.fc, m.aux1.fc2, m.aux2.fc2):
        assert {lr_of[id(p)] for p in layer.parameters()} == {1.0}
    assert {lr_of[id(p)] for p in m.conv1.parameters()} == {0.1}
