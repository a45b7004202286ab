"""Models: any torchvision classification architecture with a one-logit head.

    model = build_model(cfg.model)          # resnet18 ... resnet152, resnext50_32x4d, efficientnet_b0, ...

``model.weights``: None (random init), ``"imagenet"`` (torchvision's weights API, DEFAULT weights,
downloaded when online) or a path to a local state-dict file (a torchvision checkpoint of the
same architecture, with or without its 1000-class head, or one of our own checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import UserError


def _replace_last_linear(model: nn.Module) -> str:
    """Swap the last nn.Linear for a 1-output one; return its qualified name."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserError(f"model.arch={type(model).__name__}: no linear classification head to replace")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    head = nn.Linear(old.in_features, 1)
    nn.init.zeros_(head.bias)
    nn.init.normal_(head.weight, std=0.01)
    setattr(parent, attr, head)
    return last


def head_name(model: nn.Module) -> str:
    """Qualified name of the one-logit head (for discriminative learning rates)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    assert last is not None
    return last


def _imagenet_weights(arch: str):
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.weights=imagenet: torchvision has no pretrained weights for {arch!r}"
        ) from None


def build_model(cfg_model) -> nn.Module:
    arch = cfg_model.arch
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = [a for a in available if arch.split("_")[0] in a][:8]
        raise UserError(
            f"model.arch={arch!r} is not a torchvision classification model"
            + (f"; similar: {', '.join(close)}" if close else "")
        )
    weights = cfg_model.weights
    if weights == "imagenet":
        w = _imagenet_weights(arch)
        try:
            model = torchvision.models.get_model(arch, weights=w)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise UserError(
                f"model.weights=imagenet: could not download {w.url} ({e}). Offline? Download the "
                f"file elsewhere and set model.weights=/path/to/{Path(w.url).name}"
            ) from None
        _replace_last_linear(model)
        return model
    model = torchvision.models.get_model(arch, weights=None)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(
                f"model.weights={weights!r}: no such file (use null, 'imagenet' or a state-dict path)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"model.weights={weights}: not a loadable state dict ({e})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # one of our checkpoints
        head = head_name(model)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        has_our_head = state.get(f"{head}.weight", torch.empty(0)).shape[:1] == (1,)
        if not has_our_head:
            # An ImageNet checkpoint: load the backbone, then put the one-logit head on.
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            _replace_last_linear(model)
            missing = [k for k in missing if not k.startswith(head + ".")]
        else:
            _replace_last_linear(model)
            missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"model.weights={weights}: does not match model.arch={arch} "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
        return model
    _replace_last_linear(model)
    return model
