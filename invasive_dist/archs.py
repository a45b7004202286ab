"""What a torchvision architecture asks of the config: input size limits, auxiliary heads, refusals.

    problems = model_problems("inception_v3", image_size=96, aux_loss_weight=0.4, weights=None)
    # -> ["data.image_size=96 is too small for model.arch=inception_v3 with its auxiliary head ..."]

Torch-free on purpose: ``config.validate`` runs these checks when a config is loaded, before a
model is built or an image is read, and ``models.build_model`` repeats the refusal check for
callers that build a model from a bare ``ModelConfig``.

The limits were found by experiment (torchvision 0.29, training mode, batch 2: the smallest side
whose forward pass works, one pixel less fails) and ``tests/integration/test_all_archs.py`` re-checks
each of them against the real models, so a torchvision upgrade that changes one fails there. An
architecture absent from :data:`INPUT_LIMITS` trains at every size the config accepts
(``data.image_size >= 16``); that test trains each of them at 16 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InputLimits:
    """The input sides an architecture accepts (height and width alike)."""

    min_side: int = 1  # smallest side whose forward pass works
    exact_side: int = 0  # the only side it accepts (0 = any side >= min_side)
    why: str = ""  # the layer that sets the limit, for the error message


_CONVNEXT = InputLimits(32, why="its last 2x2/2 downsampling needs a 2x2 map, 1/16 of the input")
_DENSENET = InputLimits(29, why="its last transition's 2x2 average pool needs a 2x2 map")
_VGG = InputLimits(32, why="five 2x2/2 max-pools halve 32 px down to 1")
_VIT = InputLimits(exact_side=224, why="its position embeddings are fixed at build for one input size")

INPUT_LIMITS: dict[str, InputLimits] = {
    "alexnet": InputLimits(63, why="its third 3x3/2 max-pool needs a 3x3 map"),
    **{f"convnext_{s}": _CONVNEXT for s in ("tiny", "small", "base", "large")},
    **{f"densenet{d}": _DENSENET for d in (121, 161, 169, 201)},
    "inception_v3": InputLimits(75, why="its Mixed_7a 3x3/2 reduction needs a 3x3 map"),
    "maxvit_t": InputLimits(
        exact_side=224, why="its 7x7 window and grid partitions are fixed at build for 224 px"
    ),
    **{v: _VGG for v in ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{f"{v}_bn": _VGG for v in ("vgg11", "vgg13", "vgg16", "vgg19")},
    **{v: _VIT for v in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}

# Sides that change with model.weights=imagenet: torchvision builds vit_h_14 for its DEFAULT
# weights (IMAGENET1K_SWAG_E2E_V1), which were trained at 518 px.
IMAGENET_EXACT_SIDE: dict[str, int] = {"vit_h_14": 518}

# Auxiliary classifier heads (attribute names) that torchvision attaches during training, and the
# loss weight torchvision's reference recipes give each of them.
AUX_HEADS: dict[str, tuple[str, ...]] = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}
AUX_WEIGHT_TORCHVISION: dict[str, float] = {"inception_v3": 0.4, "googlenet": 0.3}
# Inception-v3's auxiliary head pools the 17x17 map of a 299 px input with a 5x5/3 average pool
# and a 5x5 convolution: one pixel less (298 px -> 16x16 -> 4x4) and that convolution has no room.
AUX_MIN_SIDE: dict[str, int] = {"inception_v3": 299}

REFUSED: dict[str, str] = {
    name: (
        f"model.arch={name} is not supported: its classifier ends in a 1x1 convolution followed "
        "by a ReLU, so a logit could never be negative and there is no linear head to replace "
        "with a one-logit one; use mobilenet_v3_small or shufflenet_v2_x0_5 for a model that small"
    )
    for name in ("squeezenet1_0", "squeezenet1_1")
}


def _sides(image_size: int | Sequence[int]) -> tuple[int, int] | None:
    """(height, width), or None for a malformed value (config.validate reports that one itself)."""
    if isinstance(image_size, int):
        return image_size, image_size
    try:
        h, w = image_size
        return int(h), int(w)
    except (TypeError, ValueError):
        return None


def input_size_problem(
    arch: str, image_size: int | Sequence[int], aux: bool = False, weights: str | None = None
) -> str | None:
    """Why ``data.image_size`` does not fit ``arch`` (None if it does). ``image_size`` is one side
    or ``[height, width]``; ``aux``: the auxiliary heads are kept (``model.aux_loss_weight > 0``)."""
    limits = INPUT_LIMITS.get(arch, InputLimits())
    sides = _sides(image_size)
    if sides is None:
        return None
    exact = IMAGENET_EXACT_SIDE.get(arch, 0) if weights == "imagenet" else 0
    exact = exact or limits.exact_side
    if exact:
        if sides != (exact, exact):
            with_weights = " with model.weights=imagenet" if arch in IMAGENET_EXACT_SIDE else ""
            return (
                f"data.image_size={image_size}: model.arch={arch}{with_weights} takes only "
                f"{exact}x{exact} inputs ({limits.why}); set data.image_size={exact}"
            )
        return None
    aux_min = AUX_MIN_SIDE.get(arch, 0) if aux else 0
    if aux_min and min(sides) < aux_min:
        return (
            f"data.image_size={image_size} is too small for model.arch={arch} with its auxiliary "
            f"head: it needs at least {aux_min} px on each side (the head pools the 17x17 map of a "
            f"{aux_min} px input); set data.image_size to {aux_min} or more, or model.aux_loss_weight=0 "
            f"to drop the head (then {limits.min_side} px is enough)"
        )
    if min(sides) < limits.min_side:
        return (
            f"data.image_size={image_size} is too small for model.arch={arch}: it needs at least "
            f"{limits.min_side} px on each side ({limits.why}); set data.image_size to "
            f"{limits.min_side} or more"
        )
    return None


def aux_problem(arch: str, aux_loss_weight: float) -> str | None:
    """Why ``model.aux_loss_weight`` does not fit ``arch`` (None if it does)."""
    if aux_loss_weight < 0:
        return f"model.aux_loss_weight={aux_loss_weight} must be >= 0"
    if aux_loss_weight > 0 and arch not in AUX_HEADS:
        return (
            f"model.aux_loss_weight={aux_loss_weight}: model.arch={arch} has no auxiliary heads "
            f"(only {' and '.join(AUX_HEADS)} have them); set model.aux_loss_weight=0"
        )
    return None


def model_problems(
    arch: str, image_size: int | Sequence[int], aux_loss_weight: float, weights: str | None
) -> list[str]:
    """Everything about ``model.*`` x ``data.image_size`` that cannot train, one message each."""
    if arch in REFUSED:
        return [REFUSED[arch]]
    found = [aux_problem(arch, aux_loss_weight)]
    found.append(input_size_problem(arch, image_size, aux_loss_weight > 0, weights))
    return [p for p in found if p]
