"""Compile every Triton kernel of `mmsae.kernels` for Hopper (sm_90) on a machine without a GPU, through the
product's own launches.

The CPU tests run the kernels in Triton's interpreter, which executes their Python and so never meets the
compiler's rules (constexpr-only globals, one type per loop-carried value, layouts). Here every launch
`kernel[grid](...)` compiles instead of running: the arguments' types come from the call, as a real launch
specialises them, and Triton's bundled ptxas takes the kernel to a cubin. The launch's tensors are then
zeroed (so that indices the torch code reads next are in range), and the product's calls go on. Run it
without TRITON_INTERPRET; it prints one line per compiled kernel variant and exits 1 if a compile failed or
a kernel of the package was never launched.

    python tests/hopper_compile.py
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

HOPPER = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
COMPILED: set[str] = set()


def _compile_instead(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    names = [p.name for p in self.params]
    bound = dict(zip(names, args))
    bound.update({key: value for key, value in kwargs.items() if key in names})
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound.get(p.name, p.default)
        if p.is_constexpr or value is None:  # a None argument is a constexpr, as a launch specialises it
            signature[p.name], constexprs[p.name] = "constexpr", value
        else:
            signature[p.name] = mangle_type(value)
    options = {key: value for key, value in kwargs.items() if key in LAUNCH_OPTIONS}
    triton.compile(ASTSource(self, signature, constexprs), target=HOPPER, options=options)
    COMPILED.add(self.__name__)
    print(f"compiled {self.__name__} {constexprs}", flush=True)
    for value in bound.values():
        if isinstance(value, torch.Tensor):
            value.data.zero_()  # not through autograd: a launch's outputs are saved for backward


def all_kernels() -> set[str]:
    """Names of the package's Triton kernels: the `@triton.jit` functions called `_…_kernel`."""
    import mmsae.kernels as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("triton_"):
            module = importlib.import_module(f"mmsae.kernels.{info.name}")
            names |= {
                n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")
            }
    return names


def _training_step(arch: str) -> Callable[[], None]:
    def step() -> None:
        from mmsae.sae import build_sae
        from mmsae.trainer.optim import make_optimizer

        sae = build_sae(arch, 64, 1024, k=16)
        optimizer = make_optimizer([sae], [1e-4], grad_clip=1.0)  # unit-norm atoms, clipping
        x = torch.randn(256, 64)
        sae.loss(x, sae(x)).loss.backward()
        optimizer.step()

    return step


def _decode_with_mse() -> None:
    from mmsae import kernels

    values = torch.rand(256, 16, requires_grad=True)
    indices = torch.randint(0, 1024, (256, 16))
    W_dec = torch.randn(1024, 64, requires_grad=True)
    _, loss = kernels.decode_with_mse(values, indices, W_dec, torch.zeros(64), torch.randn(256, 64))
    loss.backward()


def _encode_only_launches(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> list[tuple[str, Callable]]:
    """The encode-only pass's entry points: maxima without pre, e4m3 rows, the scaled e4m3 GEMM (with and
    without pre) and the group encode on 16-bit and on e4m3 maxima."""
    from mmsae.kernels import triton_fp8, triton_gemm, triton_group

    def fp8_maxima(write_pre: bool) -> Callable[[], object]:
        def call() -> object:
            (x8, x_scale), (W8, w_scale) = triton_fp8.e4m3_rows(x), triton_fp8.e4m3_rows(W)
            return triton_gemm.linear_group_maxima(
                x8, W8, b, 16, write_pre=write_pre, scales=(x_scale, w_scale)
            )

        return call

    return [
        (
            "linear_group_maxima (no pre)",
            lambda: triton_gemm.linear_group_maxima(x, W, b, 16, write_pre=False),
        ),
        ("e4m3_rows", lambda: triton_fp8.e4m3_rows(x)),
        ("centred_e4m3_rows", lambda: triton_fp8.centred_e4m3_rows(x, x[0], x.dtype)),
        ("linear_group_maxima (e4m3)", fp8_maxima(True)),
        ("linear_group_maxima (e4m3, no pre)", fp8_maxima(False)),
        ("group_topk", lambda: triton_group.group_topk(x, W, b, 16)),
        (
            "group_topk (fp8)",
            lambda: triton_group.group_topk(x, W, b, 16, kept=32, fp8_weights=triton_fp8.e4m3_rows(W)),
        ),
    ]


def launches() -> list[tuple[str, Callable[[], object]]]:
    """(name, call) of the product's Triton entry points at small sizes, on CPU tensors."""
    from mmsae.kernels import triton_gemm, triton_pairs, triton_select, triton_stats

    bf16 = dict(dtype=torch.bfloat16)
    x, W, b = torch.randn(256, 64, **bf16), torch.randn(1024, 64, **bf16), torch.randn(1024, **bf16)
    pre = torch.randn(256, 1024, **bf16)

    def select(method: str) -> Callable[[], None]:
        values, indices = torch.empty(256, 16, **bf16), torch.empty(256, 16, dtype=torch.long)
        return lambda: triton_select.topk_select_into(pre, 16, values, indices, method=method)

    k, n, M = 16, 1024, 4096
    top_v, top_meta = torch.zeros(k, n), torch.zeros(k, n, 3, dtype=torch.long)
    f64 = dict(dtype=torch.float64)
    acc = [torch.zeros(n + 1, **f64), torch.zeros(n + 1, **f64), torch.zeros(n + 1)]
    hist, sums, scalar = torch.zeros(n + 1, 64, **f64), torch.zeros(64, **f64), torch.zeros((), **f64)
    grp, raw = torch.zeros(M, dtype=torch.long), torch.zeros(M)
    return [
        *[(f"training step ({arch})", _training_step(arch)) for arch in ("topk", "batchtopk", "abstopk")],
        ("decode_with_mse", _decode_with_mse),
        ("linear_group_maxima", lambda: triton_gemm.linear_group_maxima(x, W, b, 16)),
        *_encode_only_launches(x, W, b),
        ("topk_select (bound)", select("bound")),
        ("topk_select (bisect)", select("bisect")),
        ("feature_sums_", lambda: triton_stats.feature_sums_(grp, raw, *acc, hist, (-4.0, 4.0))),
        ("residual_sums_", lambda: triton_stats.residual_sums_(x, x, torch.zeros(64), sums, scalar, scalar)),
        *[(f"merge_sorted_top_ ({d})", _merge(triton_stats, top_v, top_meta, grp, raw, d)) for d in (0, 1)],
        ("pair_keys", lambda: triton_pairs.pair_keys(grp, raw.bfloat16())),
        ("gather_pairs", lambda: triton_pairs.gather_pairs(grp, grp, raw.bfloat16(), 16)),
    ]


def _merge(triton_stats, top_v, top_meta, grp, raw, distinct: int) -> Callable[[], None]:
    """The top-k merge without (0) and with (1) its duplicate checks."""
    rows, meta = torch.zeros_like(grp), torch.zeros(grp.shape[0], 3, dtype=torch.long)
    return lambda: triton_stats.merge_sorted_top_(top_v, top_meta, grp, raw, rows, meta, bool(distinct))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("Run without TRITON_INTERPRET: the interpreter never compiles.")
    from mmsae import kernels

    kernels.set_backend("triton")  # the Triton path on CPU tensors
    JITFunction.run = _compile_instead  # every launch compiles instead of running
    torch.manual_seed(0)
    failed = []
    for name, call in launches():
        try:
            call()
        except Exception:
            failed.append(name)
            print(f"FAILED {name}:\n{traceback.format_exc()}", flush=True)
    missing = sorted(all_kernels() - COMPILED)
    print(f"never launched: {', '.join(missing) or 'none'}")
    print(f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
