"""A CUDA device stand-in for CPU-only machines: the project's CUDA code paths run with every tensor
on ``cuda:0`` as a fake tensor (shapes, dtypes, strides and devices, no data), and the lane fails on
what would break or stall on a GPU.

    with cuda_standin() as standin:            # fake cuda tensors, patched CUDA runtime calls
        acc = standin.accelerator("bf16")      # Accelerate's own Accelerator, its device cuda:0
        ...build the real parts on standin.device...
        with standin.hot_loop("train_step"):   # host syncs are errors in here
            trainer.train_step(next_batch)

What it is made of, and why each piece:

- ``torch._subclasses.fake_tensor.FakeTensorMode`` makes ``device="cuda"`` tensors on a machine
  without CUDA (it installs a fake CUDA device guard itself when no device is present) and raises
  on mixed devices and on data-dependent results. Models are built for real on the CPU (torch's
  ``Module.to`` cannot swap parameters made inside the mode) and moved in it, as
  ``build.build_model_on`` moves them.
- ``Checks``, a dispatch mode above it, sees every aten call and raises :class:`HostSync` for the
  calls that wait for the GPU (``.item()``, ``.tolist()``, ``if tensor``, ``nonzero``, a copy to the
  host, a host-to-device copy of pageable memory or without ``non_blocking``), :class:`WrongDtype` for
  float64 on the device in a hot loop and for mixed dtypes handed to the kernels that take one
  (matmul, convolution, index_put: torch's fake kernels do not check it), :class:`WrongDevice` for a
  CPU tensor (other than a 0-dim scalar) handed to an op on the GPU, and :class:`FusedArgError` for a
  fused optimizer's arguments that the CUDA kernel would refuse or misread (the checks of
  ``check_fast_path_restrictions`` and the ``found_inf``/``grad_scale`` pointers it dereferences as
  float32 on the device). It also stands in for ``pin_memory``, which has no fake kernel.
- ``autocast("cuda")`` turns itself off when CUDA is absent: its availability check is patched,
  so the forward runs under bf16 autocast as on a GPU (the tests assert that the convolutions ran
  in bf16).
- Backward: the autograd engine asks the CUDA driver for the streams of device 0 before it runs a
  graph with CUDA nodes, which a machine without a driver cannot answer. ``backward`` is therefore
  replaced by a walk of the real autograd graph: every node's inputs must be on ``cuda:0`` (a CPU
  tensor or a float64 one that entered the graph is reported), and each leaf that requires a
  gradient gets one of its own dtype, device and strides, accumulated as autograd does. The
  backward kernels themselves are not run (they are torch's, not this project's).
- Streams and events (``torch.cuda.Stream``, ``Event``, ``current_stream``, ``record_stream``) are
  small stand-ins that check their tensor and device; ``torch.cuda.synchronize`` and the streams'
  and events' ``synchronize`` are host syncs inside :meth:`CudaStandin.hot_loop`.

Supported: torch's CUDA builds (the default wheels on Linux) on a machine without a GPU (measured
with torch 2.14.1+cu130). In a CPU-only build the fake mode installs no CUDA device guard, and
``.to("cuda")``, ``copy_`` and indexing of fake CUDA tensors fail (seen with torch 2.13 in issue 22):
the lane skips there, and where a GPU is present, with the reason (:func:`unsupported`). Anything
else that fails to set up fails the tests: a lane that checks nothing must not pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DEVICE = torch.device("cuda", 0)


class StandinError(AssertionError):
    """What the lane reports: code that would fail or stall on a GPU."""


class HostSync(StandinError):
    pass


class WrongDevice(StandinError):
    pass


class WrongDtype(StandinError):
    pass


class FusedArgError(StandinError):
    pass


def unsupported() -> str | None:
    """Why the stand-in cannot run with this torch (the lane skips), or None."""
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build: it has no CUDA device guard for fake CUDA "
            "tensors. The CUDA stand-in lane needs torch's CUDA build (the default wheel on Linux; no GPU needed)"
        )
    if torch.cuda.is_available():
        return "a real GPU is present: tests/gpu runs these paths for real"
    return None


# ----------------------------------------------------------------------------------------------
# The checks, one dispatch mode above FakeTensorMode.

# Calls whose result the host must wait for (the value of a GPU tensor, or a shape that depends on it).
SYNC_OPS = {
    aten._local_scalar_dense.default: "reads a GPU value on the host (.item(), float(), int(), `if tensor`)",
    aten.is_nonzero.default: "reads a GPU value on the host (`if tensor`, bool())",
    aten.equal.default: "reads a GPU comparison on the host (torch.equal)",
    aten.nonzero.default: "has a data-dependent shape (nonzero, torch.where(cond), boolean indexing)",
    aten.masked_select.default: "has a data-dependent shape (boolean indexing)",
    aten._unique2.default: "has a data-dependent shape (unique)",
    aten.unique_dim.default: "has a data-dependent shape (unique)",
    aten.unique_consecutive.default: "has a data-dependent shape (unique_consecutive)",
    aten.repeat_interleave.Tensor: "has a data-dependent shape (repeat_interleave with tensor repeats)",
}
COPIES = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
# Ops whose CUDA kernels take one floating dtype for all their floating operands (no type
# promotion), where torch's fake kernels do not check it (measured on torch 2.14: mm, linear,
# convolution and index_put accept mixed dtypes on fake tensors).
SAME_DTYPE = {
    aten.mm,
    aten.bmm,
    aten.addmm,
    aten.baddbmm,
    aten.addmv,
    aten.mv,
    aten.dot,
    aten.convolution,
    aten._convolution,
    aten.cudnn_convolution,
    aten.index_put_,
    aten.index_put,
    aten._index_put_impl_,
    aten.index_copy_,
    aten.index_add_,
    aten.scatter_add_,
    aten.masked_scatter_,
}
FUSED = {aten._fused_adamw_.default, aten._fused_adam_.default, aten._fused_sgd_.default}
for name in ("tensor_lr",):  # the overloads with a tensor learning rate, where this torch has them
    for op in (aten._fused_adamw_, aten._fused_adam_, aten._fused_sgd_):
        if hasattr(op, name):
            FUSED.add(getattr(op, name))


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


def _bound(func, args, kwargs) -> dict:
    """The call's arguments by schema name."""
    out = dict(kwargs)
    for arg, value in zip(func._schema.arguments, args):
        out[arg.name] = value
    return out


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device} strides {t.stride()}"


class Checks(TorchDispatchMode):
    """Raises on the calls that would fail or stall on a GPU (module docstring). ``hot``: whether
    host syncs are errors now (inside :meth:`CudaStandin.hot_loop`)."""

    def __init__(self) -> None:
        super().__init__()
        self.hot: str | None = None  # the name of the hot loop we are in
        self._pinned: dict[int, weakref.ref] = {}  # by id: a tensor's == is elementwise
        self.fused_calls: list[str] = []  # the fused optimizer kernels checked (tests assert they ran)
        self.seen: Counter = (
            Counter()
        )  # (op, dtype of its first tensor) in hot loops: what ran, in what precision

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._pin_memory.default:  # no fake kernel: a host copy, remembered as pinned
            out = args[0].clone()
            self._pinned[id(out)] = weakref.ref(out)
            return out
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func in FUSED:
            check_fused(func, _bound(func, args, kwargs))
            self.fused_calls.append(str(func))
            if func in (aten._fused_adamw_.default, aten._fused_adam_.default):
                return func(*args, **kwargs)  # torch's fake kernel checks the lists' lengths too
            return None  # _fused_sgd_ has no fake kernel; it returns nothing
        if self.hot:
            self._check_sync(func, args, kwargs)
            self._check_float64(func, args, kwargs)
            first = next(_tensors(list(args)), None)
            self.seen[(str(func.overloadpacket), first.dtype if first is not None else None)] += 1
        self._check_devices(func, args, kwargs)
        if func.overloadpacket in SAME_DTYPE:
            dtypes = {t.dtype for t in _tensors(list(args) + list(kwargs.values())) if t.is_floating_point()}
            if len(dtypes) > 1:
                raise WrongDtype(
                    f"{func}: operands of dtypes {sorted(map(str, dtypes))}; the CUDA kernel takes one "
                    "(outside autocast nothing casts them)"
                )
        return func(*args, **kwargs)

    def is_pinned(self, t: torch.Tensor) -> bool:
        ref = self._pinned.get(id(t))
        return ref is not None and ref() is t

    def _check_sync(self, func, args, kwargs) -> None:
        if func in SYNC_OPS:
            raise HostSync(f"{self.hot}: {func} {SYNC_OPS[func]}: the host waits for the GPU every step")
        if func in COPIES:
            b = _bound(func, args, kwargs)
            src = b.get("src", b.get("self"))
            dst_device = (
                b["self"].device
                if func is aten.copy_.default
                else torch.device(b.get("device") or src.device)
            )
            if src.device.type == "cuda" and dst_device.type == "cpu":
                raise HostSync(
                    f"{self.hot}: a copy of a GPU tensor {_desc(src)} to the host (.cpu(), .tolist(), "
                    ".numpy()): the host waits for the GPU every step"
                )
            if src.device.type == "cpu" and dst_device.type == "cuda":
                if not self.is_pinned(src):
                    raise HostSync(
                        f"{self.hot}: a host-to-device copy of pageable memory {_desc(src)}: the host stages "
                        "it and can wait for the GPU's queue (pin_memory() it and copy with non_blocking=True, "
                        "or make it on the device)"
                    )
                if not b.get("non_blocking", False):
                    raise HostSync(
                        f"{self.hot}: a host-to-device copy {_desc(src)} without non_blocking=True waits "
                        "for the GPU's queue"
                    )

    def _check_float64(self, func, args, kwargs) -> None:
        for t in _tensors(list(args) + list(kwargs.values())):
            if t.device.type == "cuda" and t.dtype == torch.float64:
                raise WrongDtype(
                    f"{self.hot}: {func} on a float64 tensor {_desc(t)}: float64 runs at a small fraction "
                    "of float32's speed on GPUs (a float64 constant or numpy value turned into a tensor?)"
                )

    def _check_devices(self, func, args, kwargs) -> None:
        if func in COPIES:
            return  # copies move between devices by design (their syncs are checked above)
        ts = list(_tensors(list(args) + list(kwargs.values())))
        if not any(t.device.type == "cuda" for t in ts):
            return
        for t in ts:
            if t.device.type != "cuda" and t.dim() > 0:
                raise WrongDevice(
                    f"{func}: a {t.device} tensor {_desc(t)} among CUDA tensors (a CUDA kernel cannot read it; "
                    "as an index it is copied to the device with a sync)"
                )


def _same_layout(ts: list[torch.Tensor]) -> bool:
    a = ts[0]
    return all(
        t.device == a.device and t.dtype == a.dtype and t.shape == a.shape and t.stride() == a.stride()
        for t in ts[1:]
    )


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def check_fused(func, b: dict) -> None:
    """What the CUDA fused Adam(W)/SGD kernels require of their arguments (ATen's
    ``check_fast_path_restrictions`` and the float32 device pointers read for found_inf/grad_scale)."""
    params = list(b["self"])
    if func in (aten._fused_sgd_.default, getattr(aten._fused_sgd_, "tensor_lr", None)):
        names = ["grads"] + (["momentum_buffer_list"] if b["momentum"] != 0 else [])
        steps = []
    else:
        names = ["grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if b.get("amsgrad") else [])
        steps = list(b["state_steps"])
    lists = {n: list(b[n]) for n in names}
    for n, ts in lists.items():
        if len(ts) != len(params):
            raise FusedArgError(f"{func}: {len(ts)} {n} for {len(params)} params")
    if not params:
        raise FusedArgError(f"{func}: called with no parameters")
    device = params[0].device
    if device.type != "cuda":
        raise FusedArgError(f"{func}: params on {device}, the fused kernels here are CUDA's")
    for i, p in enumerate(params):
        group = [p] + [lists[n][i] for n in names]
        if not p.is_floating_point():
            raise FusedArgError(f"{func}: param {i} is {p.dtype}")
        if not _same_layout(group) or not all(_dense(t) for t in group):
            detail = "; ".join(f"{n} {_desc(t)}" for n, t in zip(["param", *names], group))
            raise FusedArgError(
                f"{func}: param {i} and its {', '.join(names)} must have the same device, dtype, shape "
                f"and strides, dense ({detail})"
            )
        if p.device != device:
            raise FusedArgError(f"{func}: params on {device} and {p.device}: one device per call")
    for i, s in enumerate(steps):
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise FusedArgError(
                f"{func}: state_steps[{i}] is {_desc(s)}; the kernel reads a float32 on {device}"
            )
    for name in ("found_inf", "grad_scale"):
        t = b.get(name)
        if t is not None and (t.device != device or t.dtype != torch.float32 or t.numel() != 1):
            raise FusedArgError(
                f"{func}: {name} is {_desc(t)}; the kernel reads it as one float32 on {device} "
                "(a host tensor's pointer is not readable there)"
            )
    lr = b.get("lr")
    if isinstance(lr, torch.Tensor) and lr.device not in (device, torch.device("cpu")):
        raise FusedArgError(f"{func}: lr on {lr.device}")


# ----------------------------------------------------------------------------------------------
# Backward: a walk of the real autograd graph (module docstring).


def graph_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None, **_):
    """Stands in for ``torch.autograd.backward``: checks the graph's nodes and gives each leaf that
    requires a gradient one with its own dtype, device and strides (accumulated into an existing one)."""
    roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    seen: set = set()
    stack = []
    for r in roots:
        if not isinstance(r, FakeTensor) or r.device != DEVICE:
            raise WrongDevice(f"backward of {_desc(r)}: the loss must be on {DEVICE}")
        if r.grad_fn is None:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        stack.append(r.grad_fn)
    leaves = []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for meta in getattr(node, "_input_metadata", ()):
            if meta.device.type != "cuda":
                raise WrongDevice(f"{node.name()}: an input on {meta.device} in the autograd graph")
            if meta.dtype == torch.float64:
                raise WrongDtype(f"{node.name()}: a float64 input in the autograd graph (slow on GPUs)")
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            leaves.append(node.variable)
        stack.extend(fn for fn, _ in node.next_functions)
    with torch.no_grad():
        for v in leaves:
            g = torch.empty_like(v, memory_format=torch.preserve_format)
            if v.grad is None:
                v.grad = g
            else:
                v.grad.add_(g)
    if not leaves:
        raise RuntimeError("backward reached no leaf that requires a gradient")


# ----------------------------------------------------------------------------------------------
# Streams and events.


class Stream:
    def __init__(self, device=None, priority: int = 0) -> None:
        self.device = torch.device(device) if device is not None else DEVICE
        if self.device.type != "cuda":
            raise WrongDevice(f"torch.cuda.Stream on {self.device}")
        self.waits: list = []

    def wait_stream(self, other: Stream) -> None:
        self.waits.append(other)

    def wait_event(self, event: Event) -> None:
        self.waits.append(event)

    def synchronize(self) -> None:
        _host_wait("Stream.synchronize()")

    def query(self) -> bool:
        return True


class Event:
    def __init__(self, *args, **kwargs) -> None:
        self.stream = None

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream or _current[0]

    def wait(self, stream: Stream | None = None) -> None:
        (stream or _current[0]).wait_event(self)

    def synchronize(self) -> None:
        _host_wait("Event.synchronize()")

    def query(self) -> bool:
        return True


_default = Stream(DEVICE)
_current: list = [_default]
_checks: list = []  # the active Checks (one at a time)


def _host_wait(what: str) -> None:
    if _checks and _checks[0].hot:
        raise HostSync(f"{_checks[0].hot}: {what} waits for the GPU every step")


def current_stream(device=None) -> Stream:
    return _current[0]


@contextlib.contextmanager
def stream(s: Stream | None):
    if s is None:
        yield
        return
    prev = _current[0]
    _current[0] = s
    try:
        yield
    finally:
        _current[0] = prev


def synchronize(device=None) -> None:
    _host_wait("torch.cuda.synchronize()")


def record_stream(self: torch.Tensor, s) -> None:
    if self.device.type != "cuda" or not isinstance(s, Stream) or s.device != self.device:
        raise WrongDevice(f"record_stream of a tensor {_desc(self)} on stream {s!r}")


def mem_get_info(device=None) -> tuple[int, int]:
    return 140 * 2**30, 141 * 2**30  # an H200's


# ----------------------------------------------------------------------------------------------
# The context.


class _Fake(FakeTensorMode):
    # Fake CUDA tensors as on a machine without a GPU, whatever torch.cuda.is_available() says
    # (a GPU machine would otherwise take the mode's real-device path).
    avoid_device_init = property(lambda self: True)


@dataclasses.dataclass
class CudaStandin:
    mode: FakeTensorMode
    checks: Checks
    device: torch.device = DEVICE

    @contextlib.contextmanager
    def hot_loop(self, name: str):
        """Host syncs are errors inside (``name`` goes into the message)."""
        prev, self.checks.hot = self.checks.hot, name
        try:
            yield
        finally:
            self.checks.hot = prev

    def accelerator(self, mixed_precision: str = "bf16"):
        """Accelerate's Accelerator as ``distributed.build_accelerator`` makes it for one process,
        built on the CPU (nothing to launch) and pointed at ``cuda:0``: ``prepare``, ``autocast``,
        ``backward`` and ``clip_grad_norm_`` are Accelerate's own."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        with unset_fake_temporarily():
            # device_placement=False: the model is on the device already (build.build_model_on), and
            # torch cannot Module.to() a module whose parameters are fake tensors.
            acc = Accelerator(
                cpu=True,
                mixed_precision=mixed_precision,
                step_scheduler_with_optimizer=False,
                device_placement=False,
            )
        PartialState._shared_state["device"] = self.device
        AcceleratorState._shared_state["device"] = self.device
        assert acc.device == self.device
        return acc

    @staticmethod
    def real(fn):
        """``fn`` run outside the fake mode (model construction: torch's Module.to cannot swap
        parameters made inside it)."""

        def wrapper(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)

        return wrapper


@contextlib.contextmanager
def cuda_standin() -> Iterator[CudaStandin]:
    """The stand-in (module docstring); everything it patches is restored on exit."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from invasive_dist.data import base

    patches = [
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.autograd.backward", graph_backward),
        mock.patch("torch.cuda.Stream", Stream),
        mock.patch("torch.cuda.Event", Event),
        mock.patch("torch.cuda.current_stream", current_stream),
        mock.patch("torch.cuda.stream", stream),
        mock.patch("torch.cuda.synchronize", synchronize),
        mock.patch("torch.cuda.mem_get_info", mem_get_info),
        mock.patch.object(torch.Tensor, "record_stream", record_stream),
    ]
    mode = _Fake(allow_non_fake_inputs=True)
    checks = Checks()
    saved_mean_std = dict(base._MEAN_STD)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # copy.deepcopy (the EMA's copy of the model) looks at the data pointer of fake tensors.
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        for p in patches:
            stack.enter_context(p)
        # Accelerate's state is process-wide: what other tests made is put back as it was.
        for cls in (PartialState, AcceleratorState, GradientState):
            saved = dict(cls._shared_state)
            stack.callback(
                lambda cls=cls, saved=saved: (cls._shared_state.clear(), cls._shared_state.update(saved))
            )
        stack.callback(lambda: (base._MEAN_STD.clear(), base._MEAN_STD.update(saved_mean_std)))
        stack.enter_context(mode)
        stack.enter_context(checks)
        _checks.append(checks)
        stack.callback(_checks.remove, checks)
        yield CudaStandin(mode, checks)
