"""UVC's search really moves things: the proximal step shrinks the selected groups, and the task loss reaches
the pruned fractions and block gates through the straight-through masks.

The trainer tests check the stages, the budget and reproducibility; these drive
:class:`~hf_vitcompress.methods.pruning.search.UVCController` by hand for a few search steps on a tiny
model (no Trainer), the way the trainer's callback does: ``on_step_begin``, loss + auxiliary loss,
backward, optimizer step, ``on_optimizer_step``.
"""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Model, TrainerState

from hf_vitcompress import CompressionConfig
from hf_vitcompress.methods.pruning.search import KINDS, UVCController
from hf_vitcompress.methods.pruning.structure import PrunableModel, attention_layout, block_attention, mlp_layout

from .conftest import tiny_dinov2, tiny_vit

STEPS = 5


def tiny_clip_tower() -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return CLIPVisionModel(CLIPVisionConfig(**sizes, image_size=16, patch_size=4))


MODELS = {  # ViT's attention / fc1-fc2 names, CLIP's self_attn / out_proj, DINOv2's SwiGLU gate/up/down
    "vit": tiny_vit,
    "clip_tower": tiny_clip_tower,
    "dinov2_swiglu": lambda: tiny_dinov2(Dinov2Model, use_swiglu_ffn=True),
}


def search_setup(skip_blocks=True, kind="vit"):
    """A tiny model in UVC's search stage from step 0 (no warm-up), with fast dual and proximal rates."""
    model = MODELS[kind]().train()
    structure = PrunableModel.of(model)
    config = CompressionConfig(
        method="pruning",
        target_flops_ratio=0.5,
        skip_blocks=skip_blocks,
        pruning_warmup_ratio=0.0,
        pruning_search_ratio=1.0,
        pruning_count_lr=0.5,
        pruning_dual_lr=5.0,
        pruning_proximal_lr=0.5,
    )
    controller = UVCController(structure, config, int(0.5 * structure.dense_macs))
    controller.attach(model)
    state = TrainerState(global_step=0, max_steps=2 * STEPS)
    controller.on_train_begin(model, state)
    assert controller.stage == "search"
    return model, controller, state


def batch():
    pixels = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return pixels, torch.arange(16) % 5


def task_loss(model):
    pixels, labels = batch()
    output = model(pixel_values=pixels)
    if getattr(output, "logits", None) is None:  # a backbone: any loss of its features
        return output.last_hidden_state.pow(2).mean()
    return torch.nn.functional.cross_entropy(output.logits, labels)


def group_rows(model, controller):
    """Per block: (v_proj rows of the heads/dims selected for pruning, fc1 rows of the selected neurons)."""
    masks = []
    for b in range(len(controller.structure.blocks)):
        dims = controller._selected(b, "heads")[:, None] | controller._selected(b, "value_dims")
        masks.append((dims.reshape(-1), controller._selected(b, "neurons")))
    return masks


def group_weights(model, controller, b):
    """Per kind (value dims, neurons): the matrices a group is one row of each of (v_proj and o_proj / out_proj
    transposed; fc1 and fc2 transposed, or SwiGLU's gate_proj, up_proj and down_proj transposed)."""
    block = model.get_submodule(controller.structure.block_names[b])
    attention = block_attention(block)[1]
    _, _, value, output = attention_layout(attention)
    inputs, mlp_output = mlp_layout(block.mlp)
    return (
        [getattr(attention, value).weight, getattr(attention, output).weight.T],
        [*(getattr(block.mlp, name).weight for name in inputs), getattr(block.mlp, mlp_output).weight.T],
    )


@pytest.mark.parametrize("kind", list(MODELS))
def test_proximal_step_shrinks_the_groups_selected_for_pruning(kind):
    model, controller, state = search_setup(kind=kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shrunk = 0
    for step in range(STEPS):
        state.global_step = step
        controller.on_step_begin(model, state)
        loss = task_loss(model) + controller.auxiliary_loss(model, state)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        before = [
            [[m.detach().clone() for m in group] for group in group_weights(model, controller, b)] for b in range(2)
        ]
        factor = 1.0 - controller.sparsity_multiplier  # the shrink this step applies
        controller.on_optimizer_step(model, state)
        masks = group_rows(model, controller)  # the groups the step selected (orders refreshed inside it)
        for b, (groups, kinds) in enumerate(zip(before, masks, strict=True)):
            for matrices, now, mask in zip(groups, group_weights(model, controller, b), kinds, strict=True):
                for old, new in zip(matrices, now, strict=True):
                    # selected groups are multiplied by 1 - y, the others are left alone
                    torch.testing.assert_close(new[mask], factor * old[mask], rtol=1e-5, atol=1e-7)
                    torch.testing.assert_close(new[~mask], old[~mask], rtol=0, atol=0)
                if mask.any() and factor < 0.95:
                    shrunk += 1
    assert controller.sparsity_multiplier > 0.1  # the dual ascent on y moved
    assert shrunk >= 4  # and selected groups really shrank, in several steps and groups
    # The net effect of the search: the groups now selected carry less of their kind's norm than before.
    norms = controller.group_norms(model)
    for b in range(2):
        selected = controller._selected(b, "neurons")
        assert selected.any()
        share = norms[b]["neurons"][selected].sum() / norms[b]["neurons"].sum()
        assert share < selected.float().mean() * 0.5  # well below a uniform share: they were shrunk


def test_task_loss_reaches_pruned_fractions_and_gates_through_the_straight_through_masks():
    model, controller, state = search_setup(skip_blocks=True)
    with torch.no_grad():  # mid-search: some groups of each kind pruned, fractions away from their bounds
        controller.fractions.fill_(0.3)
    controller.on_step_begin(model, state)
    task_loss(model).backward()  # no auxiliary loss: only the masks connect the fractions to the loss
    gradient = controller.fractions.grad
    assert gradient is not None, "the pruned fractions get no gradient from the task loss"
    for b in range(2):
        for k, kind in enumerate(KINDS):
            assert gradient[b, k].abs() > 1e-6, f"block {b} {kind}: no straight-through gradient"
    gates = controller.gate_logits.grad
    assert gates is not None and bool((gates.abs() > 1e-7).all()), "the block gates get no gradient"
    # ... and the primal step moves the fractions by that gradient.
    start = controller.fractions.detach().clone()
    controller.on_optimizer_step(model, state)
    torch.testing.assert_close(controller.fractions.detach(), start - 0.5 * gradient)
    assert (controller.fractions.detach() - start).abs().min() > 1e-6
