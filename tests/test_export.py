"""ONNX export (``export_onnx`` and ``hf-vitcompress export``): every family with every method it supports
exports, and onnxruntime computes what PyTorch computes at two batch sizes; int8 on top; bad input refused
with nothing written."""

import json

import pytest
import torch
from transformers import (
    BeitForImageClassification,
    CLIPModel,
    CLIPVisionModelWithProjection,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Dinov2Backbone,
    Dinov2Model,
    Dinov2WithRegistersForImageClassification,
    SiglipVisionModel,
    SwinForImageClassification,
    Swinv2Model,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hf_vitcompress import LowRankLinear, compress  # noqa: E402
from hf_vitcompress.export import INT8_FILE, ONNX_FILE, REPORT_FILE, OnnxExportError, export_onnx  # noqa: E402
from hf_vitcompress.families import family_for  # noqa: E402

from .conftest import tiny_deit, tiny_dinov2, tiny_vit  # noqa: E402
from .test_families import (  # noqa: E402
    METHODS,
    SWIN_METHODS,
    images,
    tiny_beit,
    tiny_swin,
    tiny_tower,
    tiny_two_towers,
)


def tiny_data2vec() -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_labels=5)
    config = Data2VecVisionConfig(**sizes, image_size=16, patch_size=4, use_relative_position_bias=True)
    return Data2VecVisionForImageClassification(config).eval()


FAMILIES = {  # one class per family (two for DINOv2: a backbone's feature maps are outputs of their own)
    "vit": (tiny_vit, 16),
    "deit": (tiny_deit, 16),
    "dinov2": (lambda: tiny_dinov2(Dinov2Model), 16),
    "dinov2_backbone": (lambda: tiny_dinov2(Dinov2Backbone), 16),
    "dinov2_registers": (lambda: tiny_dinov2(Dinov2WithRegistersForImageClassification), 16),
    "clip": (lambda: tiny_tower(CLIPVisionModelWithProjection), 16),
    "siglip": (lambda: tiny_tower(SiglipVisionModel), 16),
    "clip_two_towers": (lambda: tiny_two_towers(CLIPModel), 16),
    "beit": (lambda: tiny_beit(BeitForImageClassification), 16),
    "data2vec_vision": (tiny_data2vec, 16),
    "swin": (lambda: tiny_swin(SwinForImageClassification), 32),
    "swinv2": (lambda: tiny_swin(Swinv2Model), 32),
}


DEFAULT_CASES = {  # one export per distinct graph, each method among them; the rest of the matrix: pytest -m slow
    "vit": "activation_aware",  # plain ViT (and test_int8_..., test_a_graph_that_differs_...)
    "clip_two_towers": "pruning",  # get_image_features of a two-tower model
    "siglip": "head_factorization",  # an nn.MultiheadAttention pooling head
    "beit": "pruning",  # a relative position bias through attention_mask
}
# DINOv2: test_the_exported_graph_is_checked_on_... (a backbone's feature maps), test_a_dynamic_image_size_...
# Swin (windows, shifts, patch merging; 8 s an export) runs in the slow matrix only: the suite must stay under 5 min.


def _cases() -> list:
    """Every family x every method it supports; an export costs seconds, so by default only DEFAULT_CASES."""
    cases = []
    for name, (build, _) in FAMILIES.items():
        for method in METHODS:
            if method in family_for(build()).methods:
                marks = () if DEFAULT_CASES.get(name) == method else (pytest.mark.slow,)
                cases.append(pytest.param(name, method, marks=marks, id=f"{name}-{method}"))
    return cases


def _attention_implementations(model: torch.nn.Module) -> list:
    return [m.config._attn_implementation for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")]


@pytest.mark.parametrize(("family", "method"), _cases())
def test_every_family_and_method_exports_and_onnxruntime_matches_pytorch(tmp_path, family, method):
    build, size = FAMILIES[family]
    dense = build()
    config = (SWIN_METHODS if family.startswith("swin") else METHODS)[method]
    small = compress(dense, config, images(16, size, size), progress=False)
    state = family_for(small).forward_state_of(small)  # Swin's layers clamp their window to the input they see
    implementations = _attention_implementations(small)
    report = export_onnx(small, tmp_path / "onnx", images(5, size, size))
    assert family_for(small).forward_state_of(small) == state and not small.training
    assert _attention_implementations(small) == implementations  # traced as eager, given back as it was
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "onnx" / ONNX_FILE)).graph.node}
    assert "IsNaN" not in ops  # sdpa's guard against emptied rows, 8 % of a ViT-S graph's time: not traced
    assert not ops & {"ScatterND", "GatherElements"}  # mixed head ranks padded by copies, not scattered
    if method == "head_factorization":
        ranks = {r for m in small.modules() for r in getattr(m, "vo_ranks", [])}
        assert len(ranks) > 1 or family.startswith("swin")  # the case is one of mixed ranks
    if family in ("siglip", "clip_two_towers"):  # the pooled embedding is what retrieval uses
        assert report.outputs == ["last_hidden_state", "pooler_output"]
    assert report.max_rel_diff <= 1e-4
    assert [row["batch"] for row in report.validation] == [1, 5]  # the batch axis is dynamic
    assert report.outputs and (tmp_path / "onnx" / ONNX_FILE).is_file()
    saved = json.loads((tmp_path / "onnx" / REPORT_FILE).read_text())
    assert saved["validation"] == report.validation
    config_json = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert config_json["compression_plan"]["layers"] == small.config.compression_plan["layers"]


def test_the_exported_graph_is_checked_on_other_images_than_it_was_traced_on(tmp_path):
    """onnxruntime's outputs equal PyTorch's on fresh images at a third batch size, and the names are the model's."""
    import onnxruntime

    small = compress(tiny_dinov2(Dinov2Backbone), METHODS["activation_aware"], images(), progress=False)
    for layer in small.modules():  # tuned to the kernel: the graph still gets the two GEMMs
        if isinstance(layer, LowRankLinear):
            layer.implementation = "fused"
    report = export_onnx(small, tmp_path, images(4))
    import onnx

    nodes = onnx.load(str(tmp_path / ONNX_FILE)).graph.node
    assert nodes and not any(node.metadata_props or node.doc_string for node in nodes)  # debug metadata dropped
    assert report.outputs == ["feature_maps.0"] + [f"feature_maps.{i}" for i in range(1, len(report.outputs))]
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    fresh = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    got = session.run(None, {"pixel_values": fresh.numpy()})
    with torch.no_grad():
        want = small(pixel_values=fresh).feature_maps
    assert len(got) == len(want)
    for out, ref in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_int8_is_written_smaller_and_close(tmp_path, monkeypatch):
    dense = tiny_vit(hidden_size=64, intermediate_size=256)
    small = compress(dense, METHODS["activation_aware"], images(), progress=False)
    report = export_onnx(small, tmp_path, images(8), int8=True)
    assert report.int8_file == INT8_FILE and (tmp_path / INT8_FILE).is_file()
    assert report.files[INT8_FILE] < report.files[ONNX_FILE]
    import onnx

    graph = onnx.load(str(tmp_path / INT8_FILE)).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    float_matmul_weights = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & set(weights)]
    assert not float_matmul_weights  # every linear, factor or dense leftover, is int8
    int8_weights = [weights[i] for n in graph.node if n.op_type == "MatMulInteger" for i in n.input if i in weights]
    assert int8_weights and all(w.data_type == onnx.TensorProto.INT8 for w in int8_weights)
    assert all(row["max_rel_diff"] < 0.1 for row in report.int8_validation)  # an approximation, but a close one
    for fp32, quantized in zip(report.validation, report.int8_validation, strict=True):  # measured on the int8 graph
        assert quantized["max_rel_diff"] > 10 * fp32["max_rel_diff"]
    # the leftovers too: the patch embedding's weight and the position table are int8 per channel, read through
    # DequantizeLinear, within half a step of the fp32 values; only small or 1-d tensors are left in fp32
    left = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert [t.name for t in left] == ["model.vit.embeddings.cls_token"]
    from onnx import numpy_helper

    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    conv = next(n for n in graph.node if n.op_type == "Conv")
    expected = {
        conv.input[1]: (small.vit.embeddings.patch_embeddings.projection.weight, 0),
        "model.vit.embeddings.position_embeddings": (small.vit.embeddings.position_embeddings, 2),
    }
    for name, (parameter, axis) in expected.items():
        node = dequantized[name]
        assert node.attribute[0].i == axis  # per output channel of the convolution, per hidden unit of the table
        quantized, scale, zero = (torch.from_numpy(numpy_helper.to_array(weights[i])) for i in node.input)
        shape = [1] * quantized.dim()
        shape[axis] = -1
        step = scale.reshape(shape)
        values = (quantized.float() - zero.float().reshape(shape)) * step  # DequantizeLinear along axis
        error = (values - parameter.detach()).abs()
        assert (error <= step / 2 + 1e-7).all() and quantized.dtype == torch.int8
    from hf_vitcompress import export

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(export, "_int8_leftovers", lambda path: (_ for _ in ()).throw(KeyError("an unknown op")))
    with pytest.raises(OnnxExportError, match="could not quantize .* Export without int8"):
        export_onnx(small, tmp_path, images(8), int8=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing lost, nothing half-written


def test_int8_folds_what_depends_on_weights_only(tmp_path):
    """At a fixed size other than its own, DINOv2's graph resizes its position table (too large for the
    exporter's constant folding: over 8,192 numbers) on every run; the int8 graph holds the resized table instead
    (on DINOv2-S at 224 px: 257 of its 1,370 positions, 2.1 -> 0.4 MB fp32)."""
    import onnx

    dense = tiny_dinov2(Dinov2Model, image_size=56)  # a 14 x 14 table of width 48, served at 4 x 4 patches
    small = compress(dense, METHODS["activation_aware"], images(), progress=False)
    report = export_onnx(small, tmp_path, images(4), int8=True)
    ops = {name: [n.op_type for n in onnx.load(str(tmp_path / name)).graph.node] for name in (ONNX_FILE, INT8_FILE)}
    assert "Resize" in ops[ONNX_FILE] and "Resize" not in ops[INT8_FILE]
    assert all(row["max_rel_diff"] < 0.1 for row in report.int8_validation)


@pytest.mark.parametrize("family", ["dinov2", pytest.param("vit", marks=pytest.mark.slow)])
def test_a_dynamic_image_size_serves_other_sizes(tmp_path, family):
    import onnxruntime

    dense = tiny_dinov2(Dinov2Model) if family == "dinov2" else tiny_vit()
    small = compress(dense, METHODS["head_factorization"], images(), progress=False)
    export_onnx(small, tmp_path, images(3), dynamic_image_size=True)
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    other = images(2, 24, 32)
    (got, *_) = session.run(None, {"pixel_values": other.numpy()})
    with torch.no_grad():
        output = small(pixel_values=other, **({"interpolate_pos_encoding": True} if family == "vit" else {}))
    torch.testing.assert_close(torch.from_numpy(got), output[0], rtol=1e-4, atol=1e-5)


def test_a_graph_that_differs_from_pytorch_is_refused_and_the_earlier_export_is_kept(tmp_path, monkeypatch):
    from hf_vitcompress import export

    small = compress(tiny_vit(), METHODS["activation_aware"], images(), progress=False)
    out = tmp_path / "out"
    export_onnx(small, out, images(4))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_session = export._session

    class Off:  # what a wrong graph would give: every output off by 1 %
        def __init__(self, path):
            self.session = real_session(path)

        def run(self, names, feed):
            return [out * 1.01 for out in self.session.run(names, feed)]

    monkeypatch.setattr(export, "_session", Off)
    with pytest.raises(OnnxExportError, match="differs from PyTorch"):
        export_onnx(small, out, images(4))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_finite_outputs_and_onnxruntime_failures_are_export_errors(tmp_path, monkeypatch):
    from hf_vitcompress import export

    small = compress(tiny_vit(), METHODS["activation_aware"], images(), progress=False)
    real_session = export._session

    class NaNs:  # max() over differences would skip a NaN: it must not pass the check
        def __init__(self, path):
            self.session = real_session(path)

        def run(self, names, feed):
            return [out * float("nan") for out in self.session.run(names, feed)]

    monkeypatch.setattr(export, "_session", NaNs)
    with pytest.raises(OnnxExportError, match="non-finite"):
        export_onnx(small, tmp_path / "nan", images(2))

    class Broken(NaNs):
        def run(self, names, feed):
            raise Exception("INVALID_ARGUMENT: Got invalid dimensions")  # what onnxruntime raises: no RuntimeError

    monkeypatch.setattr(export, "_session", Broken)
    with pytest.raises(OnnxExportError, match="could not run the exported graph"):
        export_onnx(small, tmp_path / "broken", images(2))
    assert list(tmp_path.iterdir()) == []


def test_a_size_the_graph_cannot_serve_is_refused(tmp_path):
    """BEiT's relative position bias is built for its own grid: torch.export fixes height and width without an
    error, and the export says so instead of writing a graph that takes one size."""
    small = compress(tiny_beit(BeitForImageClassification), METHODS["activation_aware"], images(), progress=False)
    with pytest.raises(OnnxExportError, match="export without dynamic_image_size|Export without dynamic_image_size"):
        export_onnx(small, tmp_path / "beit", images(2), dynamic_image_size=True)
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_refused_with_what_to_do(tmp_path):
    small = compress(tiny_vit(), METHODS["activation_aware"], images(), progress=False)
    with pytest.raises(TypeError, match="float32 model"):
        export_onnx(small.half(), tmp_path / "a", images(2).half())
    small.float()
    with pytest.raises(ValueError, match=r"\[n, channels, height, width\]"):
        export_onnx(small, tmp_path / "a", images(2)[0])
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier ONNX export"):
        export_onnx(small, other, images(2))
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="replace the checkpoint folder"):
        export_onnx(small, other, images(2), source_dir=other)
    with torch.device("meta"):
        meta = type(small)(small.config)
    with pytest.raises(ValueError, match="meta device"):
        export_onnx(meta, tmp_path / "b", images(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
