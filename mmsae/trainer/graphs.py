"""`GraphedStep`: a whole training step replayed as one CUDA graph.

An SAE step is ~100 small kernels (encoder, top-k, sparse decoder, losses, backward, clipping, Adam, atom
renormalisation, dead-feature clocks). Launched one by one from Python, they cost more host time than GPU
time at common sizes (d=768, batch 4096: ~6 ms of Python and launches for ~1 ms of GPU work on an H100),
so the trainer was host-bound. Captured once and replayed, the step costs one launch.

A graph freezes everything the host decided while it was captured: tensor shapes, Python scalars and which
kernels run. So the step function must read the GPU only through tensors (no `.item()`, no boolean
indexing), every per-step scalar it uses lives in a device tensor (the LR, the step counter), and whatever
host-side choice does shape it (e.g. how many dead features AuxK selects) goes into the `key`, which the
step's keyword arguments join (e.g. whether it computes the training metrics): one graph is captured per key,
after the key has run eagerly `warmup` times (JIT compilation, allocator and cuBLAS workspaces must happen
outside a capture). Batches of another shape than the first (rows dropped as
non-finite) run eagerly.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

StepFn = Callable[..., dict[str, Tensor]]


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    static_x: Tensor
    outputs: dict[str, Tensor]


class GraphedStep:
    """Run `step_fn(x, **step_kwargs) -> {name: tensor}` eagerly or as a replayed CUDA graph, one per
    structure `key` and keyword arguments (hashable values that shape the captured kernels: `metrics=False`).

    Outputs of a replay are the graph's static tensors: the next call overwrites them, so clone what must
    outlive it. Graphs share one memory pool, which is safe because they never run concurrently and
    everything a replay writes there (gradients, outputs) is read during that replay or right after it; the
    `max_graphs` most recently used are kept. A capture that fails (a host sync inside `step_fn`) turns
    graphs off for the rest of the run with a warning, and training goes on eagerly.
    """

    def __init__(self, step_fn: StepFn, warmup: int = 2, max_graphs: int = 8):
        self.step_fn, self.warmup, self.max_graphs = step_fn, warmup, max_graphs
        self.graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self.eager_runs: Counter[Hashable] = Counter()
        self.shape: torch.Size | None = None
        self.disabled: str | None = None
        self.pool: tuple[int, int] | None = None
        self.replays = 0
        self.ran_step_fn = False
        """Whether the last call ran `step_fn`'s Python (eagerly, or to capture it): False for a pure replay,
        after which the caller does any host-side bookkeeping the step would have done."""

    def __call__(self, x: Tensor, key: Hashable = None, **step_kwargs: Hashable) -> dict[str, Tensor]:
        self.ran_step_fn = True
        if x.device.type != "cuda" or self.disabled:
            # nothing to capture (the tests' CPU twin), or capture failed: eagerly
            return self.step_fn(x, **step_kwargs)
        self.shape = self.shape or x.shape
        full_key = self.full_key(x, key, step_kwargs)
        captured = self.graphs.get(full_key)
        if captured is None:
            if x.shape != self.shape or self.eager_runs[full_key] < self.warmup:
                self.eager_runs[full_key] += 1
                return self._eager(x, step_kwargs)
            captured = self._capture(full_key, x, step_kwargs)
            if captured is None:
                return self._eager(x, step_kwargs)
        else:
            self.ran_step_fn = False
        self.graphs.move_to_end(full_key)
        captured.static_x.copy_(x)
        captured.graph.replay()
        self.replays += 1
        return captured.outputs

    @staticmethod
    def full_key(x: Tensor, key: Hashable, step_kwargs: dict[str, Hashable]) -> Hashable:
        """What one captured graph stands for: the caller's key, the batch dtype and the step's arguments."""
        return (key, x.dtype, tuple(sorted(step_kwargs.items())))

    def _eager(self, x: Tensor, step_kwargs: dict[str, Hashable]) -> dict[str, Tensor]:
        # On a side stream, as torch's capture recipe asks of the warm-up runs that precede a capture.
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = self.step_fn(x, **step_kwargs)
        current.wait_stream(side)
        x.record_stream(side)
        return outputs

    def _capture(self, key: Hashable, x: Tensor, step_kwargs: dict[str, Hashable]) -> _Captured | None:
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the data loader's thread may pin memory (cudaHostAlloc) while this one captures.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.step_fn(static_x, **step_kwargs)
        except Exception as e:  # any capture failure means: train eagerly
            self.disabled = f"{type(e).__name__}: {e}".splitlines()[0]
            self.graphs.clear()
            _release_generators()
            rank_zero_warn(
                f"mmsae: CUDA graph capture failed ({self.disabled}); training goes on without "
                "graphs. Something in the step reads the GPU on the host; pass cuda_graphs=False "
                "to skip the attempt."
            )
            return None
        self.pool = self.pool or graph.pool()
        self.graphs[key] = captured = _Captured(graph, static_x, outputs)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured


def graph_blocker(trainer: L.Trainer) -> str | None:
    """Why a run of `trainer` cannot replay its steps as CUDA graphs (None: it can)."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return f"the SAEs are on {device.type}, not a CUDA device"
    if trainer.world_size > 1:
        return "DDP all-reduces gradients from hooks a graph cannot hold; graphs are single-device"
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return "fp16 loss scaling checks for inf on the host every step; use bf16-mixed or 32-true"
    return None


def graphed_step_for_run(
    step_fn: StepFn, trainer: L.Trainer, cuda_graphs: bool | None, blocker: str | None
) -> GraphedStep | None:
    """The run's `GraphedStep`, or None (eager steps): `cuda_graphs` None = where possible (no `blocker`),
    True = required (an error names the blocker), False = never."""
    if cuda_graphs is False:
        return None
    if blocker is not None:
        if cuda_graphs:
            raise ValueError(
                f"cuda_graphs=True, but {blocker}. Pass cuda_graphs=None (use them where possible) or False."
            )
        return None
    device = trainer.strategy.root_device
    for group in trainer.optimizers[0].param_groups if device.type == "cuda" else []:  # CPU: nothing captured
        # Replays read the LR from a device tensor the scheduler fills in place; a float would be frozen into
        # the graph. Capturable Adam likewise keeps its step count on the device.
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = True
    return GraphedStep(step_fn)


def _release_generators() -> None:
    """After an aborted capture the CUDA generators still count as captured, and any later random call on
    the device (torch.randn, dropout) fails with "Offset increment outside graph capture". One empty capture
    registers and releases them again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the CUDA graph is empty"
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
        except RuntimeError:
            pass  # nothing more to undo: the generators were not left captured
