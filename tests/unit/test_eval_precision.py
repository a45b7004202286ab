"""Under bf16 autocast (``train.mixed_precision=bf16``) validation, OOF and predict still get
float32 logits from the one-logit head: distinct images get distinct scores, not the few hundred
values a bf16 output can take."""

from __future__ import annotations

import torch

from invasive_dist.config import load_config
from invasive_dist.data.base import Batch
from invasive_dist.distributed import build_accelerator, world_info_from_env
from invasive_dist.evaluation import score
from invasive_dist.models import build_model, head_name
from invasive_dist.predict import tta_logits

N = 96


class _Batches:
    """A loader of fixed random batches (the evaluation's loader contract: iter_epoch, steps)."""

    def __init__(self, images: torch.Tensor, batch: int = 32):
        self.images, self.batch = images, batch
        self.steps_per_epoch = (len(images) + batch - 1) // batch

    def iter_epoch(self, epoch):
        for i in range(0, len(self.images), self.batch):
            x = self.images[i : i + self.batch]
            yield Batch(x, (torch.arange(i, i + len(x)) % 2).float(), torch.arange(i, i + len(x)))


def test_bf16_autocast_keeps_float32_logits(fresh_accelerate_state):
    cfg = load_config(None, ["model.arch=resnet18", "data.image_size=32", "train.mixed_precision=bf16"])
    acc = build_accelerator(cfg, world_info_from_env())
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # logits near 3, where bf16's steps are 1/64: a sure model's range
        model.get_submodule(head_name(model)).bias.fill_(3.0)
    images = torch.randn(N, 3, 32, 32)

    # predict and OOF: the mean logit of the TTA views, under the run's autocast
    z = tta_logits(model, images, "none", autocast=acc.autocast)
    assert len(torch.unique(z)) == N
    with acc.autocast():
        assert model(images[:4]).dtype == torch.float32
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the autocast is really on
    # validation (and analyze): evaluation.score
    res = score(model, _Batches(images), acc)
    assert len(set(res.logits.tolist())) == N
