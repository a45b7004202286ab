import urllib.error

import pytest
import torch
import torchvision

from invasive_dist.config import ModelConfig
from invasive_dist.errors import UserError
from invasive_dist.models import build_model, head_name


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
