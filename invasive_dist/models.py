"""Models: any torchvision classification architecture with a one-logit head.

    model = build_model(cfg.model)          # resnet18 ... resnet152, resnext50_32x4d, efficientnet_b0, ...

``model.weights``: None (random init), ``"imagenet"`` (torchvision's weights API, DEFAULT weights,
downloaded when online) or a path to a local state-dict file (a torchvision checkpoint of the
same architecture, with or without its 1000-class head, or one of our own checkpoints).

Auxiliary heads (``inception_v3``, ``googlenet``): ``model.aux_loss_weight`` > 0 keeps them, each
with a one-logit layer, and the training loss becomes ``bce(main) + w x sum(bce(aux))`` (see
:func:`binary_loss`; torchvision's recipes use w = 0.4 for Inception-v3 and 0.3 for GoogLeNet).
The default 0 removes them: the model is then a plain one-logit classifier like every other, in
training and evaluation alike, and Inception-v3 trains from 75 px instead of 299 (its aux head
needs the 17x17 map of a 299 px input). They are a deep-supervision aid from training ImageNet
from scratch; fine-tuning a pretrained trunk on one binary label has little use for them (not
measured here). Evaluation and prediction never use them (eval mode returns the main logit).

Input sizes and refused architectures (SqueezeNet): see :mod:`invasive_dist.archs`; the config
is checked against them when it is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .archs import AUX_HEADS, REFUSED, aux_problem
from .errors import UserError


class OneLogitHead(nn.Linear):
    """The one-logit layer, computed in float32 also under autocast: a bf16 output has 8 bits of
    mantissa (at logit 3 its steps are 1/64), which ties distinct predictions and costs AUC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.amp.is_autocast_available(x.device.type):
            return super().forward(x)  # the meta device (shape checks): there is no autocast to leave
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def _replace_last_linear(model: nn.Module, prefix: str = "") -> str:
    """Swap the last nn.Linear under ``prefix`` for a 1-output one; return its qualified name."""
    root = model.get_submodule(prefix) if prefix else model
    last = None
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserError(f"model.arch={type(model).__name__}: no linear classification head to replace")
    parent_name, _, attr = last.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, attr)
    head = OneLogitHead(old.in_features, 1)
    nn.init.zeros_(head.bias)
    nn.init.normal_(head.weight, std=0.01)
    setattr(parent, attr, head)
    return f"{prefix}.{last}" if prefix else last


def _remove_aux_heads(model: nn.Module, names: tuple[str, ...]) -> None:
    """What torchvision's builders do for ``aux_logits=False``: forward then returns one tensor."""
    model.aux_logits = False
    for name in names:
        setattr(model, name, None)


def _put_heads(model: nn.Module, aux_names: tuple[str, ...]) -> None:
    """One-logit heads: the main classifier and the last linear layer of each kept aux head."""
    _replace_last_linear(model)
    for name in aux_names:
        if getattr(model, name, None) is not None:
            _replace_last_linear(model, name)


def head_name(model: nn.Module) -> str:
    """Qualified name of the one-logit head (for discriminative learning rates)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    assert last is not None
    return last


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of every one-logit layer: the main head and the last linear layer of each
    kept auxiliary head (Inception-v3, GoogLeNet). They are new layers, trained at the head's
    learning rate, not the backbone's."""
    names = [head_name(model)]
    for aux in sorted({n for heads in AUX_HEADS.values() for n in heads}):
        module = getattr(model, aux, None)
        if isinstance(module, nn.Module):
            linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            names += [f"{aux}.{linear[-1]}"] if linear else []
    return tuple(names)


def _imagenet_weights(arch: str):
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.weights=imagenet: torchvision has no pretrained weights for {arch!r}"
        ) from None


def build_model(cfg_model) -> nn.Module:
    """The torchvision ``model.arch`` with one-logit head(s) and ``model.weights`` loaded.

    Inception-v3 and GoogLeNet keep their auxiliary heads (each with a one-logit layer) only when
    ``model.aux_loss_weight > 0``; otherwise they are removed and the model is a plain classifier."""
    arch = cfg_model.arch
    if arch in REFUSED:
        raise UserError(REFUSED[arch])
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        close = [a for a in available if arch.split("_")[0] in a][:8]
        raise UserError(
            f"model.arch={arch!r} is not a torchvision classification model"
            + (f"; similar: {', '.join(close)}" if close else "")
        )
    problem = aux_problem(arch, cfg_model.aux_loss_weight)
    if problem:
        raise UserError(problem)
    aux_names = AUX_HEADS.get(arch, ())
    keep_aux = cfg_model.aux_loss_weight > 0
    # Build with the aux heads (torchvision's builders refuse aux_logits=False together with
    # weights), load, then remove them ourselves when they are not wanted.
    kwargs = {"aux_logits": True} if aux_names else {}
    weights = cfg_model.weights
    if weights == "imagenet":
        w = _imagenet_weights(arch)
        try:
            model = torchvision.models.get_model(arch, weights=w, **kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise UserError(
                f"model.weights=imagenet: could not download {w.url} ({e}). Offline? Download the "
                f"file elsewhere and set model.weights=/path/to/{Path(w.url).name}"
            ) from None
        if not keep_aux:
            _remove_aux_heads(model, aux_names)
        _put_heads(model, aux_names)
        return model
    if aux_names:
        kwargs["init_weights"] = True  # their default, said explicitly to silence a FutureWarning
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    if not keep_aux:
        _remove_aux_heads(model, aux_names)
    if not weights:
        _put_heads(model, aux_names)
        return model
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
    # Aux heads are optional in the file both ways: dropped when not kept, and when kept but
    # absent from the file (a checkpoint trained without them) they start from their init.
    aux_prefixes = tuple(f"{n}." for n in aux_names)
    if not keep_aux:
        state = {k: v for k, v in state.items() if not k.startswith(aux_prefixes)}
    has_our_head = state.get(f"{head}.weight", torch.empty(0)).shape[:1] == (1,)
    if not has_our_head:
        # An ImageNet checkpoint: load the backbone (and 1000-class aux heads), then put the
        # one-logit heads on.
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        _put_heads(model, aux_names)
        missing = [k for k in missing if not k.startswith(head + ".")]
    else:
        _put_heads(model, aux_names)
        missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(aux_prefixes)] if aux_prefixes else missing
    if missing or unexpected:
        raise UserError(
            f"model.weights={weights}: does not match model.arch={arch} "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )
    return model


def split_outputs(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, aux logits) of a forward pass. In training mode with aux heads, torchvision's
    Inception-v3 returns ``InceptionOutputs(logits, aux_logits)`` and GoogLeNet
    ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``; everything else returns one tensor."""
    if isinstance(output, torch.Tensor):
        return output, []
    main, *aux = output
    return main, [a for a in aux if a is not None]


def binary_loss(output, target: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
    """BCE-with-logits of the main logit (B, 1) against ``target`` (B,), plus ``aux_weight`` x that of
    each auxiliary head; computed in float32 whatever the autocast precision of ``output``."""
    logits, aux = split_outputs(output)
    loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(1), target)
    for a in aux:
        loss = loss + aux_weight * F.binary_cross_entropy_with_logits(a.float().squeeze(1), target)
    return loss
