"""The softmax scale of a head-factorized attention is the *original* ``head_dim ** -0.5``, under every kernel.

COMCAT's factors reproduce the original scores ``q·kᵀ`` at full rank, so truncating a head to rank ``r``
must keep the original scale, not ``r ** -0.5``. The reference tests elsewhere keep at least one head at
full rank, where SDPA's default scale (``padded width ** -0.5``) happens to equal the right one; here
*every* head is truncated, and the module is compared with a float64 reference computed by hand from its
factor weights.
"""

import pytest
import torch

from hf_vitcompress.attention import HeadFactorizedAttention

from .conftest import tiny_vit

HEAD_DIM = 12
RANKS = {  # (query/key ranks, value/output ranks), every rank below HEAD_DIM
    "irregular": ([5, 7, 3, 9], [4, 6, 8, 2]),  # padded per head, and q/k padded to the value width or back
    "uniform": ([6, 6, 6, 6], [6, 6, 6, 6]),  # one width everywhere: the no-padding fast path
    "narrow_values": ([8, 8, 8, 8], [3, 3, 3, 3]),  # what pruning with truncated q/k would look like
}


def truncated_attention(qk_ranks, vo_ranks, implementation):
    config = tiny_vit().config
    config._attn_implementation = implementation
    module = HeadFactorizedAttention(config, 48, HEAD_DIM, qk_ranks, vo_ranks, dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # large enough that scores span several units: a wrong scale changes the softmax
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.4)
    return module


def reference(module, x, scale=HEAD_DIM**-0.5):
    """softmax((x L_h + l_h)(x R_h)ᵀ · scale) (x D_h) U_hᵀ summed over heads, plus the output bias."""
    left, left_bias = module.qk_left.weight, module.qk_left.bias
    right, down = module.qk_right.weight, module.vo_down.weight
    up, up_bias = module.vo_up.weight, module.vo_up.bias
    out = torch.zeros(*x.shape[:-1], up.shape[0], dtype=torch.float64) + up_bias
    qk_start = vo_start = 0
    for qk_rank, vo_rank in zip(module.qk_ranks, module.vo_ranks, strict=True):
        qk, vo = slice(qk_start, qk_start + qk_rank), slice(vo_start, vo_start + vo_rank)
        query = x @ left[qk].T + left_bias[qk]
        key = x @ right[qk].T
        weights = torch.softmax(query @ key.transpose(-1, -2) * scale, dim=-1)
        out = out + weights @ (x @ down[vo].T) @ up[:, vo].T
        qk_start, vo_start = qk_start + qk_rank, vo_start + vo_rank
    return out


@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_every_head_truncated_keeps_the_original_scale(ranks, implementation):
    module = truncated_attention(*ranks, implementation)
    x = torch.randn(3, 17, 48, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        expected = reference(module, x)
        output = module(x)[0]
        wrong = reference(module, x, scale=max(module.qk_ranks) ** -0.5)
    # The scale matters here: the rank-based scale gives a clearly different output.
    assert (wrong - expected).abs().max() > 0.1
    # The eager kernel takes its softmax in float32 (as transformers' ViT does); SDPA stays in float64.
    tolerance = 1e-5 if implementation == "eager" else 1e-10
    torch.testing.assert_close(output, expected, rtol=tolerance, atol=tolerance)
