"""Model cards and ``push_to_hub`` for compressed models: publish only what was measured.

The card is rendered from ``hf_vitcompress/model_cards/template.md`` with ``huggingface_hub``'s
``ModelCard`` / ``ModelCardData``. Counted facts (parameters, multiply-accumulates) are computed from the
checkpoint itself; measured facts (accuracy, latency) come only from an :class:`EvaluationReport` taken on
these exact weights. A field that was not measured is left out, never estimated.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .calibration.data import image_config_of, image_size_of, interpolated_positions
from .data import DEFAULT_MODEL_DIR
from .evaluation import EvaluationReport, count_macs, dense_architecture
from .plan import CompressionPlan, count_parameters

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "template.md"


def describe_method(
    config: dict[str, Any], selection: dict[str, Any] | None = None, shared_blocks: int | None = None
) -> tuple[str, str]:
    """A title and one paragraph saying what was done, from the saved ``compression_config`` and, where the
    factorization was chosen by measurement, the plan's ``selection`` record."""
    method = config.get("method", "unknown")
    if method == "head_factorization":
        return "head-level attention factorization (COMCAT-style)", (
            "In every attention, each head's query·key and value·output weight products are replaced by low-rank "
            "factors found by an SVD whitened with the calibration activations (the value·output products with the "
            "Gram of each head's attention-mixed tokens, so each head's error is its output error; query bias kept in the "
            "factorization, key bias dropped exactly, value bias folded exactly into the output bias); the MLP "
            "linears become low-rank pairs; all ranks, per head, are allocated under one global parameter budget."
        )
    if method == "pruning":
        parts = "attention heads, value dims inside heads and MLP neurons" + (
            ", and whole blocks," if config.get("skip_blocks") else ""
        )
        return "structured pruning under a FLOPs budget", (
            f"{parts[0].upper() + parts[1:]} are removed physically (smaller weight tensors, not masks) until the "
            f"model needs at most {config.get('target_flops_ratio')} of the dense model's multiply-accumulates per "
            "image under any attention implementation; with PruningTrainer the structure is learned by UVC's "
            "primal-dual search with distillation, "
            f"otherwise groups are ranked one-shot by {config.get('pruning_importance', 'magnitude')} importance."
        )
    if method != "activation_aware":
        return method, ""
    chosen = {**config, **((selection or {}).get("chosen") or {})}
    whitening = {
        "gram": "an SVD whitened with the calibration activations' Gram matrix",
        "diagonal": "an SVD scaled by per-channel activation magnitudes (ASVD-style)",
        "none": "a plain SVD of the weights",
    }.get(chosen.get("whitening", "gram"), "an SVD")
    if chosen.get("loss_weighting") == "fisher":
        whitening += ", each output channel weighted by its Fisher sensitivity (how much its error reaches the output)"
    allocation = (
        "allocated across layers under one global parameter budget"
        if chosen.get("rank_allocation", "global") == "global"
        else "the same fraction of each layer's rank"
    )
    text = (
        f"Each selected linear layer is replaced by a pair of thin linears found by {whitening}; ranks are {allocation}"
    )
    if selection and selection.get("candidates"):
        text = (
            f"{text} (chosen among {len(selection['candidates'])} factorizations as the lowest "
            f"{str(selection.get('metric', 'output error')).replace('_', ' ')} on {selection.get('held_out_images')} "
            "held-out calibration images)"
        )
    if chosen.get("sequential") is True:
        text += (
            "; block by block, each pair was then fitted to the dense layer's output on the compressed model's own "
            "activations"
            + (" (kept because it lowered the held-out error)" if config.get("sequential") == "auto" else "")
        )
    shared = shared_blocks if shared_blocks is not None else chosen.get("shared_qkv")
    if shared and not isinstance(shared, (bool, str)):  # how many blocks (the plan's count, or the record's)
        text += (
            f"; in {shared} attention blocks query, key and value share one down-projection of their input (one thin "
            "matrix, computed once, and three up-projections)"
            + (" (kept because it lowered the held-out error)" if config.get("shared_qkv") == "auto" else "")
        )
    if config.get("compensation_rank", 0):
        text += f", and a rank-{config['compensation_rank']} learned residual compensates the remaining error"
    return "activation-aware mixed-rank factorization", text + "."


class ModelCardTemplateError(ValueError):
    """The card template uses a variable that was not provided (or is broken)."""


class HubTokenError(ValueError):
    """No Hugging Face token is available for a push."""


# -- card ------------------------------------------------------------------------------------------
def render_template(template: str, **variables: Any) -> str:
    """Render a Jinja template where a *missing* variable is an error, not an empty string.

    ``ModelCard.from_template`` renders undefined variables as "", which would silently publish a card
    with holes; optional sections use ``{% if name is defined %}`` instead.
    """
    import jinja2

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return environment.from_string(template).render(**variables)
    except jinja2.UndefinedError as error:
        raise ModelCardTemplateError(
            f"The model card template needs a value that was not provided: {error.message}. Pass it to "
            "build_model_card(..., <name>=...) or remove it from the template."
        ) from error
    except jinja2.TemplateSyntaxError as error:
        raise ModelCardTemplateError(f"The model card template is invalid (line {error.lineno}): {error}") from error


def template_variable_names(template: str) -> set[str]:
    """Names a Jinja template reads (so that a misspelt option is an error, not a silently unused variable)."""
    import jinja2
    import jinja2.meta

    return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` looks like ``namespace/name`` on the Hub and is not a local path."""
    if not name or Path(name).exists() or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _describe_base(provenance: dict[str, Any], model: nn.Module) -> str:
    base = provenance.get("base_model")
    cls = provenance.get("base_model_class") or type(model).__name__.removeprefix("Compressed")
    if is_hub_id(base):
        return f"[`{base}`](https://huggingface.co/{base}) (`{cls}`)"
    if base and Path(base).resolve() == DEFAULT_MODEL_DIR:
        return "hf_vitcompress's embedded default model (a small ViT trained on Fashion-MNIST)"
    if base:
        return f"a local `{cls}` checkpoint (`{Path(base).name}`)"
    return f"a dense `{cls}`"


def _plan_row(name: str, layer: Any, dense: nn.Module) -> dict[str, Any]:
    """One row of the card's plan table: what the module became, and its dense vs compressed weights
    (the dense count is read from the architecture the model was compressed from)."""
    if layer.kind == "head_factorized":
        shape = f"QK {layer.qk_ranks} / VO {layer.vo_ranks}"
    elif layer.kind == "pruned_linear":
        shape = f"{layer.in_features}→{layer.out_features} (pruned)"
    elif layer.kind == "skipped_block":
        shape = "skipped"
    elif layer.kind == "shared_input":
        shape = f"shared rank {layer.rank} ({', '.join(layer.projections)})"
    else:
        shape = f"rank {layer.rank}"
    module = dense.get_submodule(name)
    parts = [getattr(module, p) for p in layer.projections] if layer.kind == "shared_input" else [module]
    dense_weights = sum(p.numel() for part in parts for p in part.parameters())
    return {"name": name, "rank": shape, "dense": dense_weights, "factorized": layer.num_parameters}


def _measured_section(report: EvaluationReport) -> dict[str, Any]:
    where = []
    if report.num_images:
        where.append(f"{report.num_images:,} images")
    if report.dataset:
        where.append(f"of {report.dataset}" + (f" ({report.dataset_split} split)" if report.dataset_split else ""))
    sentence = "Measured on " + (" ".join(where) if where else "the evaluation data")
    if report.reference is not None:
        sentence += f", compressed and {report.reference_name} model in the same run"
    sentence += f" ({report.source})." if report.source else "."
    section: dict[str, Any] = {
        "model": report.model,
        "reference": report.reference,
        "reference_name": report.reference_name or "reference",
        "source_sentence": sentence,
    }
    reference = report.reference or {}
    if "latency_s" in report.model and "latency_s" in reference and report.latency_setup:
        section["latency"] = {
            "reference_ms": 1e3 * reference["latency_s"],
            "model_ms": 1e3 * report.model["latency_s"],
            "speedup": reference["latency_s"] / report.model["latency_s"],
            **report.latency_setup,
        }
    return section


def _macs_sentence(
    macs: int, dense_macs: int, implementation: str, other_macs: int, image_size: tuple[int, int]
) -> str:
    """The exact MAC counts, under each attention implementation when they differ.

    The table's GMACs hide small models' differences, and a card rendered under one implementation is
    read by users loading under another: narrowed heads are zero-padded for fused kernels (SDPA, the
    transformers default) but not for eager attention, so both real figures are stated.
    """
    if macs == other_macs:
        return (
            f"Exactly {macs:,} of the dense model's {dense_macs:,} multiply-accumulates per "
            f"{image_size[0]}x{image_size[1]} image, under every attention implementation."
        )
    padded, unpadded = (macs, other_macs) if implementation != "eager" else (other_macs, macs)
    return (
        f"Exactly {padded:,} of the dense model's {dense_macs:,} multiply-accumulates per {image_size[0]}x{image_size[1]} "
        "image with "
        '`attn_implementation="sdpa"` (the transformers default) or another fused kernel, which zero-pad narrowed '
        f'heads to one width, and {unpadded:,} with `attn_implementation="eager"`; the table counts '
        f'`"{implementation}"`, which this model is set to.'
    )


def _eval_results(report: EvaluationReport) -> list[EvalResult]:
    if not report.dataset_id:
        return []  # the Hub's model-index needs a dataset id; the table in the card still shows the numbers
    results = []
    for key, name in (("top1", "Top-1 accuracy"), ("top5", "Top-5 accuracy")):
        if key in report.model:
            results.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=report.dataset_id,
                    dataset_name=report.dataset or report.dataset_id,
                    dataset_split=report.dataset_split,
                    metric_type="accuracy" if key == "top1" else "top_5_accuracy",
                    metric_name=name,
                    metric_value=round(float(report.model[key]), 4),
                )
            )
    return results


_CANDIDATE_WORDS = {"dense": "as dense", "factorized": "as two factor matmuls", "fused": "with the fused Triton kernel"}


def describe_tuning(plan: CompressionPlan) -> str:
    """One sentence for the card from ``plan.tuning`` (written by :func:`hf_vitcompress.tune`).

    It names only the forms that were actually timed (a finite time in some layer: a form that could not
    run there is recorded as infinite), and counts what the last ``tune`` decided separately from layers
    an earlier ``tune`` merged or that its forward pass never reached."""
    tuning = plan.tuning
    layers = list(tuning.get("layers", {}).values())
    choices = [layer["choice"] for layer in layers]
    timed = [
        candidate
        for candidate in _CANDIDATE_WORDS
        if any(math.isfinite(layer.get("milliseconds", {}).get(candidate, math.inf)) for layer in layers)
    ]
    where = tuning.get("device") or "an unrecorded device"
    details = ", ".join(
        part
        for part in (
            tuning.get("dtype"),
            "input " + "×".join(str(size) for size in tuning["example_inputs_shape"])
            if tuning.get("example_inputs_shape")
            else None,
        )
        if part
    )
    where += f" ({details})" if details else ""
    counts = f"{choices.count('factorized')} as two matmuls, {choices.count('fused')} fused, {choices.count('dense')} merged back to dense"
    if len(timed) > 1:
        sentence = (
            f"{len(layers)} factorized layers were then timed on {where} "
            f"{', '.join(_CANDIDATE_WORDS[c] for c in timed[:-1])} and {_CANDIDATE_WORDS[timed[-1]]}, "
            f"and run the fastest way: {counts}."
        )
    else:
        sentence = f"{len(layers)} factorized layers were then set, without a comparison, on {where}: {counts}."
    earlier = len(set(tuning.get("merged_to_dense", [])) - set(tuning.get("layers", {})))
    if earlier:
        sentence += f" {earlier} more were merged back to dense by an earlier tuning."
    pairs = {name for name, layer in plan.layers.items() if layer.kind == "low_rank"}  # what tune times
    untimed = len(pairs - set(tuning.get("layers", {})))
    if untimed:
        sentence += f" {untimed} factorized layers were not reached by the timing pass and run as two matmuls."
    if choices.count("fused"):
        sentence += (
            " The fused layers run the kernel for inference on a CUDA GPU with Triton installed; elsewhere, and"
            " whenever gradients are needed, they run the two matmuls."
        )
    if choices.count("dense") or earlier:
        sentence += " Merged layers hold their dense weights again; the parameter count above includes them."
    return sentence


def build_model_card(
    model: nn.Module,
    *,
    report: EvaluationReport | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    template_path: str | Path | None = None,
    **template_variables: Any,
) -> ModelCard:
    """The model card of a compressed model, with its counted size and (if any) its measured numbers.

    ``report`` defaults to ``model.evaluation_report`` (set by :func:`~hf_vitcompress.evaluate_model`, by
    ``CompressionCallback`` after ``Trainer.evaluate``, or loaded from a saved folder). A report taken on
    other weights is dropped and the card says so. Extra ``template_variables`` reach custom templates.
    """
    config = model.config
    if not getattr(config, "compression_plan", None):
        raise ValueError(
            f"{type(model).__name__} has no compression plan: build_model_card is for models made by "
            "hf_vitcompress.compress (or loaded from such a checkpoint)."
        )
    plan = CompressionPlan.from_dict(config.compression_plan)
    compression_config = dict(config.compression_config or {})
    provenance = dict(getattr(config, "compression_provenance", None) or {})
    method = compression_config.get("method", "unknown")
    title, summary = describe_method(compression_config, plan.selection, plan.shared_blocks)

    report = report if report is not None else getattr(model, "evaluation_report", None)
    variables: dict[str, Any] = {}
    if report is not None and not report.matches(model):
        variables["stale_note"] = (
            "_An evaluation report was found but it was measured on different weights (the model changed "
            "since, e.g. more fine-tuning), so its numbers are not shown._"
        )
        report = None

    parameter = next(model.parameters())
    # Counted at the resolution the compression counted its budget at (pruning calibrated at another size
    # than config.image_size records it), else at config.image_size; the card names it.
    image_size = tuple(provenance.get("macs_image_size") or image_size_of(config))
    channels = image_config_of(config).num_channels
    example = torch.zeros(1, channels, *image_size, dtype=parameter.dtype, device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        dense = dense_architecture(model)
        with interpolated_positions(model), interpolated_positions(dense):
            macs = count_macs(model, example)
            implementation = getattr(config, "_attn_implementation", None) or "eager"
            other = "sdpa" if implementation == "eager" else "eager"
            other_macs = count_macs(model, example, attn_implementation=other)
            dense_macs = count_macs(dense, example)
    finally:
        model.train(was_training)
    parameters = count_parameters(model)
    dense_parameters = plan.dense_parameters or parameters

    calibration_images = provenance.get("calibration_images")
    if calibration_images:
        source = provenance.get("calibration_data")
        calibration = f"{calibration_images:,} calibration images" + (f" ({source})" if source else "") + "."
    elif calibration_images == 0:
        calibration = "No calibration data was used (the configured method works from the weights alone)."
    else:
        calibration = "The calibration data was not recorded in this checkpoint."

    base = provenance.get("base_model")
    # A backbone (Dinov2Model, Dinov2Backbone) is a feature extractor on the Hub, not a classifier; a two-tower
    # model (CLIPModel, SiglipModel) is a zero-shot classifier.
    if "ForImageClassification" in type(model).__name__:
        task = "image-classification"
    elif hasattr(model, "get_text_features"):
        task = "zero-shot-image-classification"
    else:
        task = "image-feature-extraction"
    variables["is_classifier"] = task == "image-classification"
    variables["is_zero_shot"] = task == "zero-shot-image-classification"
    if tower := provenance.get("image_tower"):
        variables["image_tower_parameters"] = f"{tower['parameters']:,} of {tower['dense_parameters']:,}"
    card_tags = ["hf-vitcompress", "vision", task, "model-compression", method.replace("_", "-")]
    card_tags += [tag for tag in tags if tag not in card_tags]
    eval_results = _eval_results(report) if report is not None else []
    model_name = repo_id.split("/")[-1] if repo_id else template_variables.pop("model_name", "compressed-vit")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        base_model=base if is_hub_id(base) else None,
        license=license,
        tags=card_tags,
        datasets=[report.dataset_id] if report is not None and report.dataset_id else None,
        metrics=["accuracy"] if report is not None and "top1" in report.model else None,
        eval_results=eval_results or None,
        model_name=model_name,
    )
    if report is not None:
        variables["measured"] = _measured_section(report)
    finetuning = provenance.get("finetuning")
    if finetuning:
        variables["finetuning_sentence"] = describe_finetuning(finetuning)
    search = provenance.get("rank_search")
    if search:
        variables["calibration_extra"] = (
            f" The per-head ranks were then searched for {search['steps']} steps (Gumbel-softmax, β={search['beta']:g}) "
            f"on {search['images']:,} held-out training images"
            + (f" ({search['data']})" if search.get("data") else "")
            + "."
        )
    if plan.tuning:
        variables["tuning_sentence"] = describe_tuning(plan)
    variables.update(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        base_model_display=_describe_base(provenance, model),
        library_version=provenance.get("hf_vitcompress_version", ""),
        method_title=title,
        method_summary=summary,
        params={"dense": dense_parameters, "compressed": parameters, "ratio": parameters / dense_parameters},
        macs={"dense": dense_macs, "compressed": macs, "ratio": macs / dense_macs},
        macs_sentence=_macs_sentence(macs, dense_macs, implementation, other_macs, image_size),
        calibration_sentence=calibration,
        compression_config_json=json.dumps(compression_config, indent=2, sort_keys=True),
        plan_rows=[_plan_row(name, layer, dense) for name, layer in plan.layers.items()],
        load_id=repo_id or "<path or repo id>",
        model_type=config.model_type,
    )
    template = Path(template_path or TEMPLATE_PATH).read_text(encoding="utf-8")
    unused = sorted(set(template_variables) - template_variable_names(template))
    if unused:
        raise TypeError(
            f"build_model_card got unexpected argument(s) {unused}: they are neither options nor variables of the "
            "card template (a typo?)."
        )
    variables.update(template_variables)
    return ModelCard(render_template(template, **variables))


def describe_finetuning(recipe: dict[str, Any]) -> str:
    """One sentence for the card from ``compression_provenance["finetuning"]`` (written by DistillationTrainer)."""
    alpha = recipe.get("alpha", 0.0)
    images = f" of {recipe['examples']:,} images" if recipe.get("examples") else ""
    data = f" ({recipe['data']})" if recipe.get("data") else ""
    if alpha > 0:
        loss = f"{1 - alpha:g}·cross-entropy + {alpha:g}·{recipe.get('kind', 'soft')} distillation from the dense model"
        if recipe.get("kind", "soft") == "soft":
            loss += f" (temperature {recipe.get('temperature', 1.0):g})"
    else:
        loss = "cross-entropy on the labels (no teacher)"
    if recipe.get("feature_weight"):
        loss += f" + feature alignment of hidden states {recipe['feature_layers']} (weight {recipe['feature_weight']:g}, decaying to 0)"
    if recipe.get("controllers"):
        loss += f"; training-time controllers: {', '.join(recipe['controllers'])}"
    batch = f", batch {recipe['batch_size']}" if recipe.get("batch_size") else ""
    rate = f", learning rate {recipe['learning_rate']:g}" if recipe.get("learning_rate") else ""
    return f"After compression the model was fine-tuned for {recipe['steps']:,} steps{batch}{rate} on a training set{images}{data}; loss: {loss}."


# -- push ------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> None:
    """Raise a ``ValueError`` that says what a valid repo id looks like."""
    try:
        if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1:
            raise HFValidationError("expected 'name' or 'namespace/name'")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id ({error}). Use 'name' or 'namespace/name' with letters, "
            "digits, '-', '_' and '.', e.g. 'your-name/deit-small-vitcompress-50'."
        ) from error


def resolve_token(token: str | bool | None) -> str:
    """The token to push with: ``token`` itself, else the saved login / ``HF_TOKEN``; a clear error if none."""
    if isinstance(token, str) and token:
        return token
    if token is not False:
        from huggingface_hub import get_token

        found = get_token()
        if found:
            return found
    raise HubTokenError(
        "Pushing to the Hub needs a token and none was found: run `hf auth login`, set the HF_TOKEN "
        "environment variable, or pass token='hf_...'."
    )


def push_model_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    model_card: ModelCard | None = None,
    extra_files: Iterable[str | Path] = (),
    endpoint: str | None = None,
    **card_options: Any,
):
    """Upload weights, config (plan and ``auto_map``), loader shim, model card and ``extra_files`` in one commit.

    Everything is prepared locally first (the card is rendered, the checkpoint written) so that a bad
    template or argument fails before the repository is created. Returns the ``CommitInfo``.
    """
    check_repo_id(repo_id)
    token = resolve_token(token)
    api = HfApi(token=token, endpoint=endpoint)
    with tempfile.TemporaryDirectory(prefix="vitcompress-push-") as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        for extra in map(Path, extra_files):
            target = Path(folder) / extra.name
            if target.exists() or extra.name == "README.md":
                raise ValueError(
                    f"extra file {extra.name!r} would replace the checkpoint's own {extra.name}; rename it."
                )
            shutil.copy(extra, target)
        card = model_card if model_card is not None else build_model_card(model, repo_id=repo_id, **card_options)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        created = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if created != repo_id and model_card is None:  # 'name' became 'user/name': the loading snippet says so
            card = build_model_card(model, repo_id=created, **card_options)
        card.save(Path(folder) / "README.md")
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(Path(folder) / "README.md")))
        return api.create_commit(
            repo_id=created,
            operations=operations,
            commit_message=commit_message or "Upload model compressed with hf_vitcompress",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = [
    "HubTokenError",
    "ModelCardTemplateError",
    "TEMPLATE_PATH",
    "build_model_card",
    "check_repo_id",
    "is_hub_id",
    "push_model_to_hub",
    "render_template",
    "resolve_token",
]
