"""The stand-in itself, piece by piece (``standin.py``): after a torch upgrade, the test that fails
here names the piece that no longer works, before the Trainer's tests fail on it."""

from __future__ import annotations

import pytest
import torch

from .standin import HostSync, WrongDevice


def test_fake_cuda_tensors_and_autocast(standin):
    layer = standin.real(torch.nn.Linear)(8, 2).to(
        standin.device
    )  # made for real on the CPU, moved in the mode
    x = torch.empty((4, 8), device=standin.device)
    assert (layer.weight.device, x.device) == (standin.device, standin.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cuda"), "autocast('cuda') turned itself off"
        y = layer(x)
    assert (y.device, y.dtype) == (standin.device, torch.bfloat16)
    images = torch.empty((2, 3, 8, 8), device=standin.device).contiguous(memory_format=torch.channels_last)
    assert images.is_contiguous(memory_format=torch.channels_last) and images.stride() == (192, 1, 24, 3)


def test_backward_gives_gradients_like_autograd(standin):
    conv = standin.real(torch.nn.Conv2d)(3, 4, 3).to(standin.device, memory_format=torch.channels_last)
    x = torch.empty((2, 3, 8, 8), device=standin.device).contiguous(memory_format=torch.channels_last)
    conv(x).float().mean().backward()
    for p in conv.parameters():
        assert (p.grad.device, p.grad.dtype, p.grad.stride()) == (p.device, p.dtype, p.stride())


def test_host_syncs_only_in_hot_loops(standin):
    x = torch.empty(3, device=standin.device)
    torch.arange(3).to(standin.device)  # outside a hot loop a pageable copy is allowed (setup)
    with standin.hot_loop("loop"), pytest.raises(HostSync, match="loop"):
        x.sum().item()
    with standin.hot_loop("loop"), pytest.raises(HostSync, match="pageable"):
        torch.arange(3).to(standin.device, non_blocking=True)
    with standin.hot_loop("loop"):
        y = torch.arange(3).pin_memory().to(standin.device, non_blocking=True)
    assert y.device == standin.device


def test_host_tensor_among_device_tensors_fails(standin):
    x = torch.empty(3, device=standin.device)
    assert (x * torch.tensor(2.0)).device == standin.device  # a 0-dim host scalar is allowed, as on CUDA
    with pytest.raises(WrongDevice):
        x * torch.ones(3)
