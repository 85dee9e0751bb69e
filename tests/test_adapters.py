"""Head low-rank (COMCAT) customization adapters on diffusers attentions, alone and beside PEFT LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

from hf_vitcompress.adapters import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    HeadLowRankAdapterConfig,
    HeadLowRankAttnProcessor,
    add_head_lowrank_adapter,
    disable_head_lowrank_adapters,
    enable_head_lowrank_adapters,
    fuse_head_lowrank_adapters,
    head_lowrank_adapter_names,
    load_head_lowrank_adapter,
    remove_head_lowrank_adapter,
    save_head_lowrank_adapter,
    set_head_lowrank_adapters,
)
from hf_vitcompress.adapters.tiny import tiny_unet  # noqa: E402


class OneAttention(nn.Module):
    """A diffusers cross-attention alone (so effects can be compared without the rest of a UNet)."""

    def __init__(self, query_dim=16, context_dim=12, heads=2, head_dim=8, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.attn2 = Attention(query_dim, cross_attention_dim=context_dim, heads=heads, dim_head=head_dim, bias=bias)

    def forward(self, x, context, mask=None):
        return self.attn2(x, encoder_hidden_states=context, attention_mask=mask)


def _randomize(model, adapter_name="default", keep_zero=()):
    """Random weights in every factor of the adapter (a trained adapter), except those in ``keep_zero``."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if f"branches.{adapter_name}." in name and not any(f".{k}." in name for k in keep_zero):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _unet_inputs():
    generator = torch.Generator().manual_seed(2)
    return (
        torch.randn(2, 4, 16, 16, generator=generator),
        torch.tensor([10, 500]),
        torch.randn(2, 7, 32, generator=generator),
    )


def _unet_out(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _reference(attn, branch, factor, x, context, mask=None):
    """The COMCAT formula, head by head, in float64: logits = (Q Kᵀ + f Q′K′ᵀ)·d_h^{-1/2},
    out = to_out(A V) + f (A V′) O′ᵀ, with f = scale·α²."""
    d = torch.float64
    heads, head_dim, rank = attn.heads, attn.to_q.out_features // attn.heads, branch.rank_per_head
    x, context = x.to(d), context.to(d)

    def project(linear, inputs):
        return inputs @ linear.weight.to(d).T + (linear.bias.to(d) if linear.bias is not None else 0)

    q, k, v = project(attn.to_q, x), project(attn.to_k, context), project(attn.to_v, context)
    q2, k2, v2 = (
        project(m, i)
        for m, i in ((branch.query_lowrank, x), (branch.key_lowrank, context), (branch.value_lowrank, context))
    )
    base_columns, branch_columns = [], []
    for h in range(heads):
        base = slice(h * head_dim, (h + 1) * head_dim)
        extra = slice(h * rank, (h + 1) * rank)
        logits = (
            q[..., base] @ k[..., base].transpose(-1, -2) + factor * q2[..., extra] @ k2[..., extra].transpose(-1, -2)
        ) * head_dim**-0.5
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        weights = logits.softmax(-1)
        base_columns.append(weights @ v[..., base])
        branch_columns.append(weights @ v2[..., extra])
    out = project(attn.to_out[0], torch.cat(base_columns, -1))
    return out + factor * torch.cat(branch_columns, -1) @ branch.output_lowrank.weight.to(d).T


@pytest.mark.parametrize("alpha, scale", [(1.0, 1.0), (1.5, 0.5)])
def test_the_branch_equals_the_formula_head_by_head(alpha, scale):
    model = OneAttention(bias=True)
    add_head_lowrank_adapter(model, HeadLowRankAdapterConfig(rank_per_head=3, targets=("attn2",), alpha=alpha))
    _randomize(model)
    set_head_lowrank_adapters(model, "default", scale)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    branch = model.attn2.processor.branches["default"]
    with torch.no_grad():
        expected = _reference(model.attn2, branch, scale * alpha**2, x, context)
        torch.testing.assert_close(model(x, context).double(), expected, rtol=1e-5, atol=1e-6)
        mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
        expected = _reference(model.attn2, branch, scale * alpha**2, x, context, mask)
        torch.testing.assert_close(model(x, context, mask).double(), expected, rtol=1e-5, atol=1e-6)


def test_adding_leaves_the_model_unchanged_and_disabling_is_exact():
    unet, inputs = tiny_unet().eval(), _unet_inputs()
    before = _unet_out(unet, inputs)
    names = add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())
    assert len(names) == 8 and {n.rsplit(".", 1)[1] for n in names} == {"attn1", "attn2"}
    # Zero factors add exact zeros; the wider SDPA call only rounds differently (measured 8e-7 here).
    torch.testing.assert_close(_unet_out(unet, inputs), before, rtol=1e-5, atol=1e-5)
    _randomize(unet)
    adapted = _unet_out(unet, inputs)
    assert (adapted - before).abs().max() > 1e-3
    disable_head_lowrank_adapters(unet)
    assert torch.equal(_unet_out(unet, inputs), before)  # the original processor runs: bit for bit
    enable_head_lowrank_adapters(unet)
    torch.testing.assert_close(_unet_out(unet, inputs), adapted)
    set_head_lowrank_adapters(unet, "default", 0.0)
    assert torch.equal(_unet_out(unet, inputs), before)


def test_training_reaches_every_factor_and_only_the_adapter():
    unet, inputs = tiny_unet(), _unet_inputs()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(targets=("attn2",)))
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".processor.branches.default." in name for name in trainable)
    assert len(trainable) == 4 * 4  # 4 cross-attentions, Q′ K′ V′ O′ each
    parameters = {name.rsplit(".", 2)[-2]: p for name, p in unet.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(parameters.values()), lr=0.1)
    unet(*inputs).sample.pow(2).mean().backward()
    # K′ and O′ start at zero but get gradients at once; Q′ and V′ wait for them (their partners are 0).
    assert parameters["key_lowrank"].grad.abs().sum() > 0 and parameters["output_lowrank"].grad.abs().sum() > 0
    assert parameters["query_lowrank"].grad.abs().sum() == 0 and parameters["value_lowrank"].grad.abs().sum() == 0
    optimizer.step()
    optimizer.zero_grad()
    unet(*inputs).sample.pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in parameters.values())  # after one step, all four train


def test_several_named_adapters_scale_switch_and_remove():
    unet, inputs = tiny_unet().eval(), _unet_inputs()
    before = _unet_out(unet, inputs)
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "dog")
    _randomize(unet, "dog")
    dog = _unet_out(unet, inputs)
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=1, targets=("attn2",)), "style")
    _randomize(unet, "style")
    assert head_lowrank_adapter_names(unet) == ["dog", "style"]
    both = _unet_out(unet, inputs)
    assert (both - dog).abs().max() > 1e-3
    set_head_lowrank_adapters(unet, ["dog"])
    torch.testing.assert_close(_unet_out(unet, inputs), dog)
    set_head_lowrank_adapters(unet, ["dog", "style"], [1.0, 1.0])
    torch.testing.assert_close(_unet_out(unet, inputs), both)
    with pytest.raises(AdapterError, match="already on this model"):
        add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "dog")
    with pytest.raises(AdapterError, match=r"No head low-rank adapter named \['cat'\]"):
        set_head_lowrank_adapters(unet, ["cat"])
    remove_head_lowrank_adapter(unet, "style")
    torch.testing.assert_close(_unet_out(unet, inputs), dog)
    remove_head_lowrank_adapter(unet, "dog")
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert torch.equal(_unet_out(unet, inputs), before)
    assert not any("branches" in name for name, _ in unet.named_parameters())


def test_save_and_load_reproduce_the_outputs(tmp_path):
    unet, inputs = tiny_unet().eval(), _unet_inputs()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=2, alpha=2.0), "concept")
    _randomize(unet, "concept")
    expected = _unet_out(unet, inputs)
    save_head_lowrank_adapter(unet, tmp_path, "concept")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # nothing staged left
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["config"] == {"rank_per_head": 2, "targets": ["attn1", "attn2"], "alpha": 2.0}
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 100_000  # 19k parameters in float32

    fresh = tiny_unet().eval()  # the same base weights (same seed)
    assert load_head_lowrank_adapter(fresh, tmp_path, adapter_name="dog") == "dog"
    torch.testing.assert_close(_unet_out(fresh, inputs), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for name, p in fresh.named_parameters() if "branches" in name)


def test_loading_onto_the_wrong_model_or_a_damaged_file_fails_clearly(tmp_path):
    unet = tiny_unet()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())
    save_head_lowrank_adapter(unet, tmp_path)
    other = tiny_unet(cross_attention_dim=24)
    with pytest.raises(AdapterError, match="attn2 differs from this one's \\(context_dim 32 there vs 24 here\\)"):
        load_head_lowrank_adapter(other, tmp_path)
    assert not head_lowrank_adapter_names(other)  # nothing was added
    with pytest.raises(AdapterError, match="does not fit this model: No attention module matches"):
        load_head_lowrank_adapter(OneAttention(), tmp_path)
    with pytest.raises(
        AdapterError,
        match="is not a saved head low-rank adapter: head_lowrank_adapter_config.json, head_lowrank_adapter.safetensors missing",
    ):
        load_head_lowrank_adapter(tiny_unet(), tmp_path / "nowhere")
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / WEIGHTS_NAME).read_bytes()[:200])
    with pytest.raises(AdapterError, match="cannot be read as safetensors"):
        load_head_lowrank_adapter(tiny_unet(), tmp_path)


def test_bad_configs_and_targets_are_refused():
    with pytest.raises(AdapterError, match="rank_per_head must be an integer >= 1"):
        HeadLowRankAdapterConfig(rank_per_head=0)
    with pytest.raises(AdapterError, match="alpha must not be 0"):
        HeadLowRankAdapterConfig(alpha=0)
    with pytest.raises(AdapterError, match="Unknown HeadLowRankAdapterConfig fields \\['rank'\\]"):
        HeadLowRankAdapterConfig.from_dict({"rank": 2})
    with pytest.raises(AdapterError, match="No attention module matches targets \\['attn3'\\]"):
        add_head_lowrank_adapter(tiny_unet(), HeadLowRankAdapterConfig(targets=("attn3",)))
    unet = tiny_unet()
    unet.fuse_qkv_projections()
    with pytest.raises(AdapterError, match="cannot take a head low-rank adapter"):
        add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig())


@pytest.mark.parametrize("base_processor", [AttnProcessor2_0, AttnProcessor])
def test_fusing_into_wider_heads_gives_the_same_outputs(base_processor):
    unet, inputs = tiny_unet().eval(), _unet_inputs()
    unet.set_attn_processor(base_processor())
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=2, alpha=1.5), "a")
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(rank_per_head=1, targets=("attn1",)), "b")
    _randomize(unet, "a")
    _randomize(unet, "b")
    set_head_lowrank_adapters(unet, ["a", "b"], [0.7, 1.0])
    adapted = _unet_out(unet, inputs)
    parameters = sum(p.numel() for p in unet.parameters())
    fused = fuse_head_lowrank_adapters(unet)
    assert len(fused) == 8 and not head_lowrank_adapter_names(unet)
    assert all(type(p) is base_processor for p in unet.attn_processors.values())
    attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn1.to_q.out_features == attn1.heads * 8  # head width 4, plus both adapters (3), padded to 8
    assert sum(p.numel() for p in unet.parameters()) > parameters  # the same numbers plus zero padding
    torch.testing.assert_close(_unet_out(unet, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_fusing_is_refused_where_it_would_lose_something():
    from peft import LoraConfig

    unet = tiny_unet()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "a")
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "b")
    set_head_lowrank_adapters(unet, ["a"])
    with pytest.raises(AdapterError, match=r"Adapters \['b'\] are on .* but not active"):
        fuse_head_lowrank_adapters(unet)
    remove_head_lowrank_adapter(unet, "b")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    with pytest.raises(AdapterError, match="projections are wrapped"):
        fuse_head_lowrank_adapters(unet)
    assert head_lowrank_adapter_names(unet) == ["a"]  # nothing changed


def test_lora_and_the_adapter_add_up_where_the_math_says_so():
    """With LoRA on to_v/to_out.0 and the branch's key factor at zero, neither changes the attention
    weights A, so each adds its own term to the output: the joint effect is the sum of the two."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = OneAttention(bias=True).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    with torch.no_grad():
        base = model(x, context)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_v", "to_out.0"], init_lora_weights=False), model)
        lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert len(lora_layers) == 2
        lora = model(x, context)
        add_head_lowrank_adapter(model, HeadLowRankAdapterConfig(targets=("attn2",)))
        _randomize(model, keep_zero=("key_lowrank",))
        both = model(x, context)
        for layer in lora_layers:
            layer.enable_adapters(False)
        adapter = model(x, context)
    for effect in (lora - base, adapter - base):
        assert effect.abs().max() > 1e-3
    torch.testing.assert_close(both - base, (lora - base) + (adapter - base), rtol=1e-4, atol=1e-5)


def test_lora_through_diffusers_and_the_adapter_switch_independently():
    from peft import LoraConfig

    unet, inputs = tiny_unet().eval(), _unet_inputs()
    base = _unet_out(unet, inputs)
    unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False), "lora"
    )
    lora = _unet_out(unet, inputs)
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "comcat")
    _randomize(unet, "comcat")
    both = _unet_out(unet, inputs)
    branch = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor.branches["comcat"]
    assert type(branch.query_lowrank) is nn.Linear  # LoRA's target names never reach the branch
    unet.disable_adapters()  # diffusers' PEFT switch: LoRA off, the head adapter stays
    comcat = _unet_out(unet, inputs)
    disable_head_lowrank_adapters(unet)
    torch.testing.assert_close(_unet_out(unet, inputs), base)
    unet.enable_adapters()
    torch.testing.assert_close(_unet_out(unet, inputs), lora)
    enable_head_lowrank_adapters(unet)
    torch.testing.assert_close(_unet_out(unet, inputs), both)
    assert len({round(float((t - base).abs().max()), 6) for t in (lora, comcat, both)}) == 3
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor, HeadLowRankAttnProcessor)


def test_the_example_trains_saves_and_the_adapter_reloads(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from hf_vitcompress.adapters.tiny import tiny_pipeline
    from hf_vitcompress.adapters.training import load_placeholder_token, prompt_ids

    path = Path(__file__).resolve().parents[1] / "examples" / "customize_diffusion.py"
    spec = importlib.util.spec_from_file_location("customize_diffusion", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    output = tmp_path / "concept"
    argv = [
        "customize_diffusion.py",
        "--steps",
        "4",
        "--samples",
        "1",
        "--inference-steps",
        "2",
        "--output",
        str(output),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    example.main()
    assert {p.name for p in output.iterdir()} == {
        WEIGHTS_NAME,
        CONFIG_NAME,
        "placeholder_token.safetensors",
        "sample_0.png",
    }

    pipe = tiny_pipeline(seed=0)  # the example's base pipeline, rebuilt
    assert load_placeholder_token(pipe, output) == "<v>"
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    untrained_row = embeddings[pipe.tokenizer.convert_tokens_to_ids("sneaker")]
    assert not torch.equal(embeddings[pipe.tokenizer.convert_tokens_to_ids("<v>")], untrained_row)  # it trained
    load_head_lowrank_adapter(pipe.unet, output)
    branch = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor.branches["concept"]
    assert branch.key_lowrank.weight.abs().sum() > 0  # trained away from its zero start
    context = pipe.text_encoder(prompt_ids(pipe, "a photo of <v> sneaker"))[0]
    assert context.shape == (1, 16, 32)


def test_training_moves_only_the_adapter_and_the_placeholder_row():
    from hf_vitcompress.adapters.tiny import tiny_pipeline
    from hf_vitcompress.adapters.training import add_placeholder_token, train_customization

    pipe = tiny_pipeline(seed=0)
    token_id = add_placeholder_token(pipe, "<v>", initializer="dog")
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(embeddings[token_id], embeddings[pipe.tokenizer.convert_tokens_to_ids("dog")])
    for module in (pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    add_head_lowrank_adapter(pipe.unet, HeadLowRankAdapterConfig(), "concept")
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    embeddings_before = embeddings.detach().clone()
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    parameters = [p for p in pipe.unet.parameters() if p.requires_grad]
    record = train_customization(
        pipe, latents, "a photo of <v> dog", parameters, steps=3, learning_rate=1e-2, placeholder_token_id=token_id
    )
    assert len(record.losses) == 3 and record.seconds_per_step > 0
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, unet_before[k])}
    assert changed and all(".branches.concept." in k for k in changed)
    moved = (embeddings.detach() != embeddings_before).any(dim=1).nonzero().flatten().tolist()
    assert moved == [token_id] and not embeddings.requires_grad
    with pytest.raises(ValueError, match="already has '<v>'"):
        add_placeholder_token(pipe, "<v>")


def test_a_vae_style_attention_with_residual_group_norm_and_4d_input():
    torch.manual_seed(0)
    attn = Attention(
        16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, rescale_output_factor=2.0, bias=True
    )
    holder = nn.ModuleDict({"attn1": attn})
    x = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        base = attn(x)
        add_head_lowrank_adapter(holder, HeadLowRankAdapterConfig(rank_per_head=3, targets=("attn1",)))
        torch.testing.assert_close(attn(x), base, rtol=1e-5, atol=1e-6)
        _randomize(holder)
        adapted = attn(x)
        assert adapted.shape == x.shape and (adapted - base).abs().max() > 1e-3
        fuse_head_lowrank_adapters(holder)
        torch.testing.assert_close(attn(x), adapted, rtol=1e-5, atol=1e-5)


def test_float32_factors_on_a_bfloat16_model_run_without_autocast():
    model = OneAttention(bias=True)
    add_head_lowrank_adapter(model, HeadLowRankAdapterConfig(targets=("attn2",)))
    _randomize(model)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    with torch.no_grad():
        reference = model(x, context)
        model.to(torch.bfloat16)
        model.attn2.processor.to(torch.float32)  # the branch stays float32, as cast_training_params leaves it
        out = model(x.bfloat16(), context.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_replacing_the_processors_removes_the_adapters_consistently(tmp_path):
    unet = tiny_unet()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(), "dog")
    unet.set_attn_processor(AttnProcessor2_0())  # any diffusers call that swaps processors
    assert head_lowrank_adapter_names(unet) == []
    assert not any("branches" in name for name, _ in unet.named_parameters())
    with pytest.raises(AdapterError, match="No head low-rank adapter named 'dog'.*remove adapters with them"):
        save_head_lowrank_adapter(unet, tmp_path, "dog")


def test_names_keep_their_order_duplicates_are_refused_and_a_disabled_model_stays_disabled():
    unet, inputs = tiny_unet().eval(), _unet_inputs()
    before = _unet_out(unet, inputs)
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(targets=("attn2",)), "first")
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(targets=("attn1",)), "second")
    assert head_lowrank_adapter_names(unet) == ["first", "second"]
    with pytest.raises(AdapterError, match="Each adapter may be named once"):
        set_head_lowrank_adapters(unet, ["first", "first"], [1.0, 1.0])
    remove_head_lowrank_adapter(unet, "second")
    disable_head_lowrank_adapters(unet)
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(targets=("attn1",)), "third")
    _randomize(unet, "first")
    _randomize(unet, "third")
    assert torch.equal(_unet_out(unet, inputs), before)  # the new attn1 processors joined the disabled state


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile's own
def test_compiled_models_use_the_plain_module_names(tmp_path):
    unet = tiny_unet()
    compiled = torch.compile(unet)  # never run: only its module names matter here
    names = add_head_lowrank_adapter(compiled, HeadLowRankAdapterConfig())
    assert not any(name.startswith("_orig_mod") for name in names)
    save_head_lowrank_adapter(compiled, tmp_path)
    assert load_head_lowrank_adapter(tiny_unet(), tmp_path) == "default"


def test_an_interrupted_save_or_damaged_config_is_detected(tmp_path, monkeypatch):
    import os

    unet = tiny_unet()
    add_head_lowrank_adapter(unet, HeadLowRankAdapterConfig(alpha=1.0))
    save_head_lowrank_adapter(unet, tmp_path)
    _randomize(unet)
    replace = os.replace
    calls = []

    def interrupted(source, target):  # the weights move into place, then the process dies
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_head_lowrank_adapter(unet, tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporaries
    with pytest.raises(AdapterError, match="is not the weights file .* was saved with"):
        load_head_lowrank_adapter(tiny_unet(), tmp_path)

    save_head_lowrank_adapter(unet, tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    for damage, message in (
        ({"modules": ["attn1"]}, "modules .* is missing or empty"),
        ({"format_version": "1"}, "format_version is '1', not an integer"),
        ({"adapter_name": None}, "adapter_name .* is missing"),
    ):
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**document, **damage}))
        with pytest.raises(AdapterError, match=message):
            load_head_lowrank_adapter(tiny_unet(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterError, match="adapter_name must be a non-empty string"):
        load_head_lowrank_adapter(tiny_unet(), tmp_path, adapter_name="")


def test_pipeline_load_lora_weights_beside_a_loaded_head_adapter(tmp_path):
    """The issue's user story: a saved head adapter and a saved LoRA, both loaded onto a fresh pipeline."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from hf_vitcompress.adapters.tiny import tiny_pipeline

    inputs = _unet_inputs()
    trained = tiny_pipeline(seed=0)
    trained.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_v"], init_lora_weights=False), "style")
    type(trained).save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=get_peft_model_state_dict(trained.unet, adapter_name="style"),
        unet_lora_adapter_metadata=trained.unet.peft_config["style"].to_dict(),  # keeps lora_alpha
    )
    add_head_lowrank_adapter(trained.unet, HeadLowRankAdapterConfig(), "dog")
    _randomize(trained.unet, "dog")
    save_head_lowrank_adapter(trained.unet, tmp_path / "dog", "dog")
    expected = _unet_out(trained.unet.eval(), inputs)

    pipe = tiny_pipeline(seed=0)
    load_head_lowrank_adapter(pipe.unet, tmp_path / "dog")
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    torch.testing.assert_close(_unet_out(pipe.unet.eval(), inputs), expected)
    pipe.set_adapters(["style"], [0.0])  # both switched off, each through its own API: the base UNet again
    set_head_lowrank_adapters(pipe.unet, [])
    torch.testing.assert_close(_unet_out(pipe.unet, inputs), _unet_out(tiny_pipeline(seed=0).unet.eval(), inputs))


def test_the_adapter_keeps_its_own_config_and_a_saved_config_must_be_complete(tmp_path):
    config = HeadLowRankAdapterConfig(alpha=2.0)
    unet = tiny_unet()
    add_head_lowrank_adapter(unet, config)
    config.alpha = 5.0  # the caller's object changes; the adapter computes and saves with 2.0
    save_head_lowrank_adapter(unet, tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert document["config"]["alpha"] == 2.0
    del document["config"]["alpha"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterError, match=r"lacks \['alpha'\]"):
        load_head_lowrank_adapter(tiny_unet(), tmp_path)
    document["config"].update(alpha=2.0, targets=5)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterError, match="targets must be a non-empty list"):
        load_head_lowrank_adapter(tiny_unet(), tmp_path)


def test_adding_under_ddp_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(OneAttention())
        with pytest.raises(AdapterError, match="before wrapping the model in DistributedDataParallel"):
            add_head_lowrank_adapter(wrapped, HeadLowRankAdapterConfig(targets=("attn2",)))
    finally:
        dist.destroy_process_group()
