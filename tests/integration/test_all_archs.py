"""Every torchvision classifier that ``model.arch`` accepts trains a step; the refused ones say why.

For each name of ``torchvision.models.list_models(module=torchvision.models)`` (80 in torchvision
0.29):

- refused (``archs.REFUSED``: squeezenet1_0, squeezenet1_1, whose classifier ends in conv + ReLU):
  ``build_model`` and config validation raise a UserError with the reason;
- every other one: ``models.build_model`` -> one SGD step of ``models.binary_loss`` (the loss of
  ``Trainer.train_step``) at batch 2 and 64 px, or the side ``archs.INPUT_LIMITS`` demands (224 for
  ViT and MaxViT, 299 for Inception-v3 with its aux head). Asserted: a finite loss, a finite
  gradient on every trainable parameter (DDP errors out on a parameter that gets none), changed
  weights, and a (2, 1) logit in eval mode. Why 64 and not the config's 16 px floor: the /32
  networks then end on a 1x1 map, and training-mode BatchNorm over 2 values per channel gives
  resnet152 infinite gradients from a random init (a batch-2 artefact, not a limit of the model);
- the limits in ``archs`` are tight: the minimum side runs and one pixel less fails (an exact side:
  one pixel more fails), on the meta device (shapes only, no compute); an architecture absent from
  the table runs at 16 px.

Models over 100M parameters (VGG's 4096-wide classifier, convnext_large, efficientnet_v2_l,
wide_resnet101_2, regnet_x/y_32gf, regnet_y_128gf, vit_l/h) run the same step on the meta device:
same build, head, loss and backward, shapes and autograd graph checked, no arithmetic. A real CPU
step of them would cost 1.6-10 GB (weights + gradients + momentum, 4 bytes x 3 x 133M-645M) and
most of the test's time budget; the smallest member of each such family (vgg11) still takes the
real step, so every family trains for real. A real step costs about 1 s of CPU per model in one
thread (efficientnet_b6: build 0.5 s, forward 0.1, backward 0.2, SGD 0.1; maxvit_t at 224 px:
1.5 s in all).
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch
import torchvision
from torchvision.models import regnet

from invasive_dist.archs import AUX_HEADS, AUX_MIN_SIDE, INPUT_LIMITS, REFUSED
from invasive_dist.config import ModelConfig, config_from_dict
from invasive_dist.errors import UserError
from invasive_dist.models import binary_loss, build_model

pytestmark = pytest.mark.slow  # ~3 minutes for all of them on 2 cores (hence in integration/, not unit/)

ARCHS = torchvision.models.list_models(module=torchvision.models)
CONFIG_MIN_SIDE = 16  # config.validate: data.image_size >= 16
STEP_SIDE = 64  # see the module docstring
REAL_STEP_MAX_PARAMS = 100_000_000
ALWAYS_REAL = {"vgg11"}  # the smallest VGG: the family trains for real at least once


@contextlib.contextmanager
def on_meta():
    """Build and run on the meta device. RegNet's builder computes its stage widths with tensors
    and reads them back (``.tolist()``), which meta tensors cannot do: that part runs on the CPU."""
    real = regnet.BlockParams.from_init_params.__func__

    def cpu_params(cls, *args, **kwargs):
        with torch.device("cpu"):
            return real(cls, *args, **kwargs)

    with mock.patch.object(regnet.BlockParams, "from_init_params", classmethod(cpu_params)):
        with torch.device("meta"):
            yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two spin-waiting OpenMP threads on 2 cores shared with other processes: measured 10-40x
    # slower per model than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_side(arch: str, aux: bool = False) -> int:
    limits = INPUT_LIMITS.get(arch)
    if limits and limits.exact_side:
        return limits.exact_side
    side = max(STEP_SIDE, limits.min_side if limits else 0)
    return max(side, AUX_MIN_SIDE.get(arch, 0)) if aux else side


def variants():
    """(arch, aux_loss_weight): every arch, and the two aux-head architectures with their heads."""
    out = [(a, 0.0) for a in ARCHS]
    out += [(a, 0.4) for a in AUX_HEADS if a in ARCHS]
    return out


def n_params(arch: str) -> int:
    with on_meta():
        return sum(p.numel() for p in build_model(ModelConfig(arch=arch)).parameters())


def test_the_table_names_real_architectures():
    """A typo in archs.py would silently disable a check."""
    for name in [*INPUT_LIMITS, *AUX_HEADS, *REFUSED]:
        assert name in ARCHS, name


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_refused_architectures_say_why(arch):
    with pytest.raises(UserError, match=f"model.arch={arch} is not supported: .*ReLU"):
        build_model(ModelConfig(arch=arch))
    with pytest.raises(UserError, match=f"model.arch={arch} is not supported"):
        config_from_dict({"model": {"arch": arch}})


@pytest.mark.parametrize("arch, aux_weight", [v for v in variants() if v[0] not in REFUSED])
def test_one_training_step(arch, aux_weight):
    aux = aux_weight > 0
    side = step_side(arch, aux)
    cfg = ModelConfig(arch=arch, aux_loss_weight=aux_weight)
    # The config accepts this side for this model (the same check `invasive-dist train` runs).
    config_from_dict({"model": {"arch": arch, "aux_loss_weight": aux_weight}, "data": {"image_size": side}})
    real = n_params(arch) <= REAL_STEP_MAX_PARAMS or arch in ALWAYS_REAL
    device = "cpu" if real else "meta"
    torch.manual_seed(0)
    with contextlib.nullcontext() if real else on_meta():
        model = build_model(cfg)
    assert model.get_submodule("fc" if arch in AUX_HEADS else _last_linear(model)).out_features == 1
    images = torch.randn(2, 3, side, side, device=device)
    target = torch.tensor([0.0, 1.0], device=device)
    model.train()
    out = model(images)
    if arch in AUX_HEADS:
        # Heads kept: a tuple of main + aux logits, each one-logit; removed: one tensor.
        assert isinstance(out, torch.Tensor) != aux
    loss = binary_loss(out, target, aux_weight)
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None]
    assert not no_grad, f"parameters without a gradient (DDP would fail on them): {no_grad[:5]}"
    if not real:
        assert loss.shape == () and loss.device.type == "meta"
        return
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    before = [p.detach().clone() for _, p in params]
    torch.optim.SGD([p for _, p in params], lr=0.1, momentum=0.9).step()
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, params)), "the step changed nothing"
    with torch.no_grad():
        assert model.eval()(images).shape == (2, 1)


def _last_linear(model: torch.nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def _forward_fails(arch: str, side: int, aux: bool = False) -> bool:
    with on_meta():
        model = build_model(ModelConfig(arch=arch, aux_loss_weight=0.4 if aux else 0.0)).train()
        try:
            model(torch.empty(2, 3, side, side))
        except (RuntimeError, AssertionError, ValueError):
            return True
    return False


@pytest.mark.parametrize("arch", sorted(INPUT_LIMITS))
def test_input_limits_are_tight(arch):
    """The minimum runs, one pixel less fails; an exact side runs, one pixel more fails."""
    limits = INPUT_LIMITS[arch]
    assert not _forward_fails(arch, limits.exact_side or limits.min_side)
    if limits.exact_side:
        assert _forward_fails(arch, limits.exact_side + 1)
        with pytest.raises(UserError, match=f"takes only {limits.exact_side}x{limits.exact_side}"):
            config_from_dict({"model": {"arch": arch}, "data": {"image_size": limits.exact_side + 1}})
    else:
        assert _forward_fails(arch, limits.min_side - 1)
        with pytest.raises(UserError, match=f"needs at least {limits.min_side} px"):
            config_from_dict({"model": {"arch": arch}, "data": {"image_size": limits.min_side - 1}})


@pytest.mark.parametrize("arch", sorted(AUX_MIN_SIDE))
def test_aux_head_limit_is_tight(arch):
    side = AUX_MIN_SIDE[arch]
    assert not _forward_fails(arch, side, aux=True)
    assert _forward_fails(arch, side - 1, aux=True)
    assert not _forward_fails(arch, side - 1, aux=False)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in INPUT_LIMITS and a not in REFUSED])
def test_unlimited_architectures_run_at_the_config_floor(arch):
    assert not _forward_fails(arch, CONFIG_MIN_SIDE, aux=arch in AUX_HEADS)
