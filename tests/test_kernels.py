"""The fused low-rank Triton kernels against the PyTorch reference (Triton interpreter on CPU).

References are computed in float64 from the same (already rounded) inputs, so the measured error is the
kernel's own: fp32 accumulation, plus for half precision the rounding of the intermediate and of the
output to the input dtype (the two-GEMM PyTorch path rounds at the same two places).
"""

import os

import pytest
import torch

from hf_vitcompress.kernels import lowrank
from hf_vitcompress.kernels.lowrank import (
    EPILOGUE_ACTIVATIONS,
    fused_grouped_lowrank_linear,
    fused_lowrank_linear,
    grouped_lowrank_linear,
    grouped_lowrank_linear_reference,
    lowrank_linear,
    lowrank_linear_reference,
)

pytest.importorskip("triton")  # in the dev extra, so CI has it
assert os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest before anything imports triton

# Relative (Frobenius) error limits against float64. fp16/bf16: two roundings to the input dtype (the
# intermediate and the output), unit roundoff 2^-11 and 2^-8; measured at most 3.5e-4 and 2.5e-3 (fp32:
# 1.9e-7), so the limits leave a wide margin for other seeds and shapes.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu"]
SHAPES = [  # rows (ragged: not multiples of the block), in, out, rank (not multiples of 16), bias
    (17, 48, 40, 5, True),
    (3, 20, 70, 1, True),
    (50, 128, 64, 24, False),
    (64, 96, 96, 33, True),
]


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return ((result.double() - expected).norm() / expected.norm()).item()


def factors(rows, in_features, out_features, rank, bias, dtype=torch.float32, seed=0, leading=(2,)):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, rows, in_features, generator=generator)
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    return x.to(dtype), down.to(dtype), up.to(dtype), None if b is None else b.to(dtype)


def as_double(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize(
    "rows, in_features, out_features, rank, bias",
    [(17, 48, 40, 5, True), (64, 96, 96, 33, False), (3, 20, 70, 1, True), (50, 128, 64, 24, True)],
)
def test_fused_kernel_matches_the_reference_fp32(rows, in_features, out_features, rank, bias):
    generator = torch.Generator().manual_seed(rows + rank)
    x = torch.randn(2, rows, in_features, generator=generator)
    down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    up = torch.randn(out_features, rank, generator=generator) / rank**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    expected = lowrank_linear_reference(x.double(), down.double(), up.double(), None if b is None else b.double())
    result = fused_lowrank_linear(x, down, up, b)
    assert result.shape == (2, rows, out_features)
    error = (result.double() - expected).norm() / expected.norm()
    assert error <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_kernel_dtypes_and_activations(shape, activation, dtype):
    x, down, up, b = factors(*shape, dtype=dtype, seed=sum(shape[:4]))
    expected = lowrank_linear_reference(*as_double(x, down, up, b), activation=activation)
    result = fused_lowrank_linear(x, down, up, b, activation)
    assert result.dtype == dtype and result.shape == (2, shape[0], shape[2])
    error = relative_error(result, expected)
    assert error <= TOLERANCE[dtype]
    if dtype != torch.float32:
        # No less accurate than PyTorch's two GEMMs in the same dtype (measured ratio ≤ 1.0: the kernel
        # applies the activation before rounding). Catches rounding regressions, e.g. a truncating cast
        # (about 2×), which the absolute limit alone would let through.
        assert error <= 1.25 * relative_error(lowrank_linear_reference(x, down, up, b, activation), expected)


def test_small_blocks_loop_over_input_and_output_tiles():
    # 16-wide blocks: several K iterations and output tiles per program, and a ragged last row tile.
    x, down, up, b = factors(37, 70, 50, 9, True, seed=1)
    expected = lowrank_linear_reference(*as_double(x, down, up, b), activation="gelu")
    result = fused_lowrank_linear(x, down, up, b, "gelu", block_m=16, block_k=16, block_n=16)
    assert relative_error(result, expected) <= 1e-5


def test_half_input_with_fp32_bias_and_odd_layouts():
    x, down, up, _ = factors(17, 48, 40, 5, False, dtype=torch.bfloat16, seed=2)
    bias = torch.randn(80, generator=torch.Generator().manual_seed(3))[::2]  # fp32, strided
    x_t = x.transpose(0, 1)  # non-contiguous [17, 2, 48]
    expected = lowrank_linear_reference(*as_double(x_t, down, up, bias))
    result = fused_lowrank_linear(x_t, down, up, bias)
    assert result.dtype == torch.bfloat16 and result.shape == (17, 2, 40)
    assert relative_error(result, expected) <= TOLERANCE[torch.bfloat16]
    empty = fused_lowrank_linear(x[:, :0], down, up, bias)
    assert empty.shape == (2, 0, 40) and empty.dtype == torch.bfloat16


def test_activation_names():
    x, down, up, b = factors(5, 16, 24, 3, True, seed=4)
    assert set(EPILOGUE_ACTIVATIONS) >= {"gelu", "gelu_tanh", "gelu_new", "relu"}
    with torch.no_grad():
        reference = lowrank_linear_reference(x, down, up, b)
        torch.testing.assert_close(
            lowrank_linear_reference(x, down, up, b, "gelu"), torch.nn.functional.gelu(reference)
        )
        for alias in ("gelu_new", "gelu_pytorch_tanh"):
            torch.testing.assert_close(
                fused_lowrank_linear(x, down, up, b, alias), fused_lowrank_linear(x, down, up, b, "gelu_tanh")
            )
        for function in (lowrank_linear_reference, fused_lowrank_linear, lowrank_linear):
            with pytest.raises(ValueError, match="'gelu', 'gelu_tanh'"):
                function(x, down, up, b, activation="swish")


GROUPED = [  # rows, in, (out_g, rank_g, bias_g) per group: ranks differ and are not multiples of 16
    (17, 48, [(48, 5, True), (40, 24, False), (56, 33, True)]),
    (50, 64, [(64, 1, False), (64, 16, True), (32, 7, True)]),
    (3, 32, [(24, 12, True), (20, 3, False)]),
]


def grouped_factors(rows, in_features, groups, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, in_features, generator=generator).to(dtype)
    downs, ups, biases = [], [], []
    for out_features, rank, bias in groups:
        downs.append((torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(dtype))
        ups.append((torch.randn(out_features, rank, generator=generator) / rank**0.5).to(dtype))
        biases.append(torch.randn(out_features, generator=generator).to(dtype) if bias else None)
    return x, downs, ups, biases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GROUPED, ids=["qkv", "qkv-rank1", "kv"])
def test_grouped_kernel_matches_the_reference(case, dtype):
    rows, in_features, groups = case
    x, downs, ups, biases = grouped_factors(rows, in_features, groups, dtype, seed=rows)
    expected = grouped_lowrank_linear_reference(x.double(), as_double(*downs), as_double(*ups), as_double(*biases))
    result = fused_grouped_lowrank_linear(x, downs, ups, biases)
    assert len(result) == len(groups)
    for y, reference, (out_features, _, _) in zip(result, expected, groups, strict=True):
        assert y.dtype == dtype and y.shape == (2, rows, out_features)
        assert relative_error(y, reference) <= TOLERANCE[dtype]


def test_grouped_kernel_equals_one_kernel_per_group():
    x, downs, ups, biases = grouped_factors(*GROUPED[0], torch.float32, seed=5)
    grouped = fused_grouped_lowrank_linear(x, downs, ups, biases, block_m=16, block_k=16, block_n=16)
    for y, down, up, bias in zip(grouped, downs, ups, biases, strict=True):
        torch.testing.assert_close(y, fused_lowrank_linear(x, down, up, bias), rtol=1e-5, atol=1e-5)
    assert all(y.shape[1] == 0 for y in fused_grouped_lowrank_linear(x[:, :0], downs, ups, biases))


def test_dispatch(monkeypatch):
    x, down, up, b = factors(6, 16, 12, 3, True, seed=6, leading=())
    x_grouped, downs, ups, biases = grouped_factors(*GROUPED[0], torch.float32, seed=6)
    calls = []
    real_fused, real_grouped = lowrank.fused_lowrank_linear, lowrank.fused_grouped_lowrank_linear
    monkeypatch.setattr(lowrank, "fused_lowrank_linear", lambda *a, **k: calls.append(1) or real_fused(*a, **k))
    monkeypatch.setattr(
        lowrank, "fused_grouped_lowrank_linear", lambda *a, **k: calls.append(3) or real_grouped(*a, **k)
    )
    with torch.no_grad():  # the interpreter is on in tests, so this runs the kernels
        torch.testing.assert_close(
            lowrank_linear(x, down, up, b, "relu"), lowrank_linear_reference(x, down, up, b, "relu")
        )
        for y, expected in zip(
            grouped_lowrank_linear(x_grouped, downs, ups, biases),
            grouped_lowrank_linear_reference(x_grouped, downs, ups, biases),
            strict=True,
        ):
            torch.testing.assert_close(y, expected)
        assert calls == [1, 3]
        lowrank_linear(x.double(), down.double(), up.double())  # no float64 kernel: PyTorch
        assert calls == [1, 3]
    # With autograd on, the reference runs (the kernels have no backward) and gradients flow.
    leaf = x.clone().requires_grad_()
    y = lowrank_linear(leaf, down, up, b, "gelu")
    assert y.requires_grad and calls == [1, 3]
    torch.testing.assert_close(y, lowrank_linear_reference(x, down, up, b, "gelu"))
    y.sum().backward()
    assert leaf.grad is not None
    assert all(y.requires_grad for y in grouped_lowrank_linear(leaf, [down, down], [up, up]))
    # Where Triton cannot run, the PyTorch fallback runs even without autograd.
    monkeypatch.setattr(lowrank, "triton_available", lambda device: False)
    with torch.no_grad():
        torch.testing.assert_close(lowrank_linear(x, down, up, b), lowrank_linear_reference(x, down, up, b))
        assert len(grouped_lowrank_linear(x_grouped, downs, ups, biases)) == 3
    assert calls == [1, 3]


def test_bad_input():
    x, down, up = torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3)
    with pytest.raises(ValueError, match="do not chain"):
        fused_lowrank_linear(x, down, torch.randn(5, 4))
    with pytest.raises(ValueError, match="do not chain"):
        lowrank_linear(x, down, up, torch.randn(4))
    with pytest.raises(TypeError, match="share a dtype"):
        fused_lowrank_linear(x, down.double(), up)
    with pytest.raises(TypeError, match="share a dtype"):
        lowrank_linear(x, down.half(), up)
    with pytest.raises(TypeError, match="bias must be in the input dtype"):
        fused_lowrank_linear(x.half(), down.half(), up.half(), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fused_lowrank_linear(x.double(), down.double(), up.double())
    with pytest.raises(ValueError, match="power of two"):
        fused_lowrank_linear(x, down, up, block_m=24)
    with pytest.raises(ValueError, match="power of two"):
        fused_lowrank_linear(x, down, up, block_k=8)
    with pytest.raises(ValueError, match="2 or 3 factor pairs"):
        fused_grouped_lowrank_linear(x, [down], [up])
    with pytest.raises(ValueError, match="2 or 3 factor pairs"):
        grouped_lowrank_linear(x, [down] * 4, [up] * 4)
    with pytest.raises(ValueError, match="2 or 3 factor pairs"):
        fused_grouped_lowrank_linear(x, [down] * 3, [up] * 2)
    with pytest.raises(ValueError, match="do not chain in group 1"):
        fused_grouped_lowrank_linear(x, [down, torch.randn(3, 9), down], [up] * 3)
    with pytest.raises(ValueError, match="do not chain in group 2"):
        grouped_lowrank_linear(x, [down] * 3, [up] * 3, [None, None, torch.randn(6)])
    with pytest.raises(TypeError, match="share a dtype in group 0"):
        fused_grouped_lowrank_linear(x, [down.half(), down], [up, up])
    with pytest.raises(ValueError, match="one bias"):
        fused_grouped_lowrank_linear(x, [down] * 3, [up] * 3, [None, None])


def test_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, down, up = torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 3)
    assert not lowrank.triton_available(x.device)
    with pytest.raises(RuntimeError, match="falls? back to PyTorch"):
        fused_lowrank_linear(x, down, up)
    with pytest.raises(RuntimeError, match="falls? back to PyTorch"):
        fused_grouped_lowrank_linear(x, [down] * 3, [up] * 3)
    with torch.no_grad():  # the dispatchers fall back
        torch.testing.assert_close(lowrank_linear(x, down, up), lowrank_linear_reference(x, down, up))
        assert len(grouped_lowrank_linear(x, [down] * 2, [up] * 2)) == 2


def test_autotune_plumbing_on_cpu(monkeypatch):
    """The CUDA path (autotuned wrapper of the same kernel) run in the interpreter with a stand-in timer.

    The real benchmark needs a GPU driver; this checks the rest: keys, pruning, the grid from the chosen
    BLOCK_M, and that the tuned blocks are not also passed by the launcher.
    """
    timings = []

    def fake_do_bench(kernel_call, quantiles):
        kernel_call()
        timings.append(len(timings))
        return [float(len(timings))] * len(quantiles)  # the first config benchmarked wins

    monkeypatch.setattr(lowrank, "_use_autotune", lambda device: True)
    monkeypatch.setattr(
        lowrank,
        "_autotuners",
        {kind: lowrank._make_autotuner(kind, do_bench=fake_do_bench) for kind in ("single", "grouped")},
    )
    x, down, up, b = factors(17, 48, 40, 5, True, seed=7)
    expected = lowrank_linear_reference(*as_double(x, down, up, b), activation="relu")
    assert relative_error(fused_lowrank_linear(x, down, up, b, "relu"), expected) <= 1e-5
    tuned = len(timings)
    assert tuned >= 1
    fused_lowrank_linear(x, down, up, b, "relu")  # same key: no second tuning
    assert len(timings) == tuned
    x_grouped, downs, ups, biases = grouped_factors(*GROUPED[0], torch.bfloat16, seed=7)
    expected = grouped_lowrank_linear_reference(
        x_grouped.double(), as_double(*downs), as_double(*ups), as_double(*biases)
    )
    for y, reference in zip(fused_grouped_lowrank_linear(x_grouped, downs, ups, biases), expected, strict=True):
        assert relative_error(y, reference) <= TOLERANCE[torch.bfloat16]
    assert len(timings) > tuned


def test_autotune_pruning():
    configs = lowrank._autotune_configs()
    assert len(configs) > 1

    def block_ms(kept):
        return sorted(c.kwargs["BLOCK_M"] for c in kept)

    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    assert len(lowrank._prune_configs(configs, {"rows": 4096, "x_ptr": half}, BLOCK_R=16)) == len(configs)
    assert max(block_ms(lowrank._prune_configs(configs, {"rows": 20, "x_ptr": half}, BLOCK_R=16))) == 32  # ≤ rows
    # rank 256 in fp32: only configs whose pipelined tiles fit in shared memory stay
    kept = lowrank._prune_configs(configs, {"rows": 4096, "x_ptr": single}, BLOCK_R=256)
    assert 0 < len(kept) < len(configs)
    assert all(lowrank._shared_memory(c, 256, 1, 4) <= lowrank._SHARED_MEMORY_BUDGET for c in kept)
    # nothing fits: the one with the smallest footprint
    kept = lowrank._prune_configs(configs, {"rows": 4096, "x_ptr": single}, BLOCK_R=256, GROUPS=3)
    assert len(kept) == 1
    smallest = min(lowrank._shared_memory(c, 256, 3, 4) for c in configs)
    assert lowrank._shared_memory(kept[0], 256, 3, 4) == smallest


def test_ranks_above_the_kernel_limit_run_pytorch():
    from hf_vitcompress.kernels.lowrank import MAX_FUSED_RANK

    generator = torch.Generator().manual_seed(5)
    rank = MAX_FUSED_RANK + 1
    x = torch.randn(4, 300, generator=generator)
    down, up = torch.randn(rank, 300, generator=generator), torch.randn(290, rank, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(lowrank_linear(x, down, up), lowrank_linear_reference(x, down, up))
    with pytest.raises(ValueError, match="ranks up to 256"):
        fused_lowrank_linear(x, down, up)


# -- the kernel as a custom op: torch.compile keeps it, exports do not see it ----------------------------------
def _fused_model():
    from hf_vitcompress import CompressionConfig, LowRankLinear, compress

    from .conftest import tiny_vit

    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    config = CompressionConfig(target_param_ratio=0.6, whitening="none", loss_weighting="none", compensation_rank=0)
    model = compress(tiny_vit(), config, pixels, progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for layer in layers:
        layer.implementation = "fused"
    return model, layers, pixels


def _ops_in(graphs) -> int:
    return sum(
        node.target is torch.ops.hf_vitcompress.fused_lowrank_linear.default
        for graph in graphs
        for node in graph.graph.nodes
    )


def test_the_custom_op_agrees_with_its_fake_implementation():
    x, down, up, bias = factors(7, 32, 24, 5, bias=True)
    torch.library.opcheck(torch.ops.hf_vitcompress.fused_lowrank_linear, (x, down, up, bias))
    torch.library.opcheck(torch.ops.hf_vitcompress.fused_lowrank_linear, (x, down, up, None))


def test_a_compiled_model_runs_the_kernel_in_every_fused_layer(monkeypatch):
    model, layers, pixels = _fused_model()
    with torch.no_grad():
        expected = model(pixel_values=pixels[:4]).logits  # eager: the kernel too
    calls, graphs = [], []
    real = lowrank.fused_lowrank_linear
    monkeypatch.setattr(lowrank, "fused_lowrank_linear", lambda *a: calls.append(1) or real(*a))

    def recording_backend(graph, _inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend)
    with torch.no_grad():
        got = compiled(pixel_values=pixels[:4]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert _ops_in(graphs) == len(layers) and len(calls) == len(layers)  # in the graph, and run
    graphs.clear()
    with torch.enable_grad():  # training: the two GEMMs, with gradients
        compiled(pixel_values=pixels[:2]).logits.sum().backward()
    assert _ops_in(graphs) == 0 and layers[0].lowrank_down.weight.grad is not None
    torch._dynamo.reset()


def test_inductor_compiles_a_fused_layer_around_the_kernel(monkeypatch):
    from hf_vitcompress import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(32, 24, 5)
    layer.implementation = "fused"
    x = torch.randn(3, 7, 32)
    calls = []
    real = lowrank.fused_lowrank_linear
    monkeypatch.setattr(lowrank, "fused_lowrank_linear", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(x)
        expected = layer.lowrank_up(layer.lowrank_down(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert calls == [1]
    torch._dynamo.reset()


def test_an_exported_graph_holds_the_two_gemms_not_the_kernel():
    model, layers, pixels = _fused_model()
    model.eval()
    with torch.no_grad():
        program = torch.export.export(model, (), {"pixel_values": pixels[:2]})
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any("hf_vitcompress" in target for target in targets)
    torch.testing.assert_close(
        program.module()(pixel_values=pixels[:2]).logits, model(pixel_values=pixels[:2]).logits, rtol=1e-5, atol=1e-6
    )
