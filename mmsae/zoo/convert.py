"""Converters from the weight files inside the zoo's wheels to timm state dicts, and their checks.

Each converter returns a state dict that the timm architecture loads with `strict=True`; the DINOv2
converter reads the ONNX graph (the `onnx` package is needed only here, at install time).
Shape suffixes: D width, N tokens, G grid side.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

StateDict = dict[str, Tensor]


class ConversionError(RuntimeError):
    """A weight file does not have the layout its converter expects."""


def by_position(source: StateDict, arch: str, origin: str, **model_kw: Any) -> StateDict:
    """Rename `source`'s tensors to timm `arch`'s keys by position; every shape and leaf name must agree.

    torchvision's MobileNetV2 and the EfficientNet-Lite0 port list their tensors in the same order as
    timm (stem, blocks in order, head); the leaf check (weight / bias / running_mean …) catches a
    reordering that happens to keep shapes."""
    target = timm.create_model(arch, pretrained=False, **model_kw).state_dict()
    if len(source) != len(target):
        raise ConversionError(f"{origin}: {len(source)} tensors, timm {arch} expects {len(target)}.")
    out: StateDict = {}
    for (src_key, value), (key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape or src_key.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1]:
            raise ConversionError(
                f"{origin}: tensor {src_key} {tuple(value.shape)} does not match timm {arch}'s "
                f"{key} {tuple(ref.shape)}; the file is not the expected checkpoint."
            )
        out[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def load_torch_file(data: bytes, origin: str) -> StateDict:
    """A plain `torch.save`d state dict, read without unpickling code (`weights_only=True`)."""
    import io

    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{origin} is not a state dict of tensors.")
    return dict(obj)


# ---------------------------------------------------------------- DINOv2 from ONNX
_HF_TO_TIMM = {  # Hugging Face Dinov2Model names (after `backbone.`) → timm VisionTransformer names
    "embeddings.cls_token": "cls_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER_TO_TIMM = {
    "norm1": "norm1",
    "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _onnx_tensors(model: Any) -> dict[str, np.ndarray]:
    """Backbone tensors by Hugging Face name, the anonymous MatMul weights named after their bias."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {k[len("backbone.") :]: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        weight = next((i for i in node.input if i.startswith("onnx::MatMul_")), None)
        if node.op_type != "MatMul" or weight is None or not node.name.startswith("/backbone/"):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for a in adds for i in a.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(bias) != 1:
            raise ConversionError(f"ONNX MatMul {node.name} has no single bias Add to name its weight.")
        # exported as x @ W with W [in, out]; torch Linear stores [out, in]
        named[bias[0][len("backbone.") : -len(".bias")] + ".weight"] = inits[weight].T
    named["embeddings.position_embeddings"] = _position_embedding(graph, inits, consumers)
    return named


def _position_embedding(graph: Any, inits: dict[str, np.ndarray], consumers: dict) -> np.ndarray:
    """Constant folding split the [1, 1 + G², D] table into a CLS part (Concat) and a grid (Reshape)."""
    parts: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        users = consumers.get(name, [])
        if not name.startswith("onnx::") or not users or not users[0].name.startswith("/backbone/embeddings"):
            continue
        if name.startswith("onnx::Concat_") and value.shape[:2] == (1, 1):
            parts["cls"] = value
        elif name.startswith("onnx::Reshape_") and value.ndim == 3:
            parts["grid"] = value
    if set(parts) != {"cls", "grid"}:
        raise ConversionError(f"ONNX position embedding parts not found (found {sorted(parts)}).")
    return np.concatenate([parts["cls"], parts["grid"]], axis=1)


def resample_position_embedding(pos_1ND: Tensor, grid: int, n_prefix: int = 1) -> Tensor:
    """Bicubic resampling of the patch part to grid×grid, as Hugging Face Dinov2 does at run time.

    `align_corners=False, antialias=False` (the ONNX `Resize` is half-pixel cubic, a = −0.75); timm's
    own `resample_abs_pos_embed` antialiases when shrinking and would not reproduce the exported model."""
    prefix, patches = pos_1ND[:, :n_prefix], pos_1ND[:, n_prefix:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ConversionError(f"position embedding has {patches.shape[1]} patch positions, not a square.")
    grid_1DGG = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    out = F.interpolate(
        grid_1DGG.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
    )
    return torch.cat([prefix, out.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_1ND.dtype)], 1)


def dinov2_from_onnx(model: Any, img_size: int, patch: int = 14) -> StateDict:
    """timm `vit_small_patch14_dinov2` (at `img_size`) from an ONNX export of HF `Dinov2Model`."""
    hf = {k: torch.from_numpy(np.array(v)) for k, v in _onnx_tensors(model).items()}
    out: StateDict = {new: hf.pop(old) for old, new in _HF_TO_TIMM.items()}
    out["pos_embed"] = resample_position_embedding(
        hf.pop("embeddings.position_embeddings"), img_size // patch
    )
    depth = 1 + max(int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer."))
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            qkv = [hf.pop(f"{pre}attention.attention.{p}.{leaf}") for p in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(qkv)
        for old, new in _HF_LAYER_TO_TIMM.items():
            for leaf in ("weight", "bias") if "layer_scale" not in old else ("",):
                src = f"{pre}{old}.{leaf}".rstrip(".")
                out[f"blocks.{i}.{new}.{leaf}".rstrip(".")] = hf.pop(src)
    leftover = sorted(hf)
    if leftover:
        raise ConversionError(f"ONNX backbone tensors left unconverted: {leftover[:8]}")
    return {k: v.contiguous() for k, v in out.items()}


def onnx_backbone_output(model: Any, pixels_BCHW: np.ndarray) -> np.ndarray:
    """The exported backbone's final LayerNorm output [B, 1 + N, D], run by onnxruntime if installed,
    else by the ONNX reference evaluator (slower, same semantics)."""
    import onnx

    graph = model.graph
    final = [n for n in graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(final))
    feeds = {graph.input[0].name: pixels_BCHW.astype(np.float32)}
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(probe).run(None, feeds)[0]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def onnx_input_size(model: Any) -> int:
    """The fixed square input side of the exported graph (its first input is [B, 3, S, S])."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] != dims[3] or not dims[2]:
        raise ConversionError(f"ONNX input has shape {dims}; expected [B, 3, S, S].")
    return int(dims[2])


# ---------------------------------------------------------------- checks run at install time
def check_dinov2(graph: Any, state: StateDict, arch: str, model_kw: dict[str, Any]) -> dict[str, Any]:
    """Max |timm − ONNX| of the backbone's final tokens on two seeded random images; must be ≤ 1e-3."""
    size = onnx_input_size(graph)
    model = timm.create_model(arch, pretrained=False, **model_kw).eval()
    model.load_state_dict(state, strict=True)
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    reference = onnx_backbone_output(graph, pixels)
    with torch.no_grad():
        ours = model.forward_features(torch.from_numpy(pixels)).numpy()
    diff = float(np.abs(ours - reference).max())
    if not diff <= 1e-3:
        raise ConversionError(f"converted DINOv2 differs from the ONNX graph by {diff:.3g} (> 1e-3).")
    try:
        import onnxruntime  # noqa: F401

        against = "onnxruntime"
    except ImportError:
        against = "onnx reference evaluator"
    return {"check": f"max |timm - ONNX| = {diff:.2e} ({against})", "max_abs_diff": diff}


def check_against_torchvision(source: StateDict, state: StateDict, arch: str) -> dict[str, Any]:
    """Max |timm − torchvision| of MobileNetV2 logits on two seeded random images; must be ≤ 1e-4."""
    import torchvision

    reference = torchvision.models.mobilenet_v2().eval()
    reference.load_state_dict(source, strict=True)
    model = timm.create_model(arch, pretrained=False).eval()
    model.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(pixels) - reference(pixels)).abs().max())
    if not diff <= 1e-4:
        raise ConversionError(f"timm {arch} differs from torchvision's MobileNetV2 by {diff:.3g} (> 1e-4).")
    return {"check": f"max |timm - torchvision| logits = {diff:.2e}", "max_abs_diff": diff}
