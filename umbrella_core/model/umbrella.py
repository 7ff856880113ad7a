"""The UMBRELLA model: a transformers Llava model whose vision tower embeds 3D/4D patches.

The vision tower's patch embedding is replaced by :class:`ModalityEmbeddings`
(one embedder per active modality). Tokens of each modality go through the
shared vision body (the tower's transformer layers) and the multimodal
projector, and are spliced into the text embeddings, each image at its own
placeholder (the batch records each image's row and placeholder ordinal; see
:meth:`UmbrellaModel.splice`). One next-token loss trains everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from umbrella_core.constants import IGNORE_INDEX
from umbrella_core.errors import ModelError, TokenCountError
from umbrella_core.model.embeddings import ModalityEmbeddings
from umbrella_core.model.loss import LogitHead, learned_token_loss
from umbrella_core.model.placement import ordered_features
from umbrella_core.types import Batch, LossTerm, ModalitySpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel

__all__ = ["UmbrellaModel", "UmbrellaOutput", "TRAINABLE_SETS"]

TRAINABLE_SETS = ("embedders", "projector", "lora", "full")


@dataclass
class UmbrellaOutput(ModelOutput):
    """What :meth:`UmbrellaModel.forward` returns.

    Full-vocabulary logits are computed only when asked: a 262,144-token
    vocabulary makes them ~1 GB per 1,000-token sample in float32. The loss
    needs logits only where labels are learned, and computes them there, chunk
    by chunk (:mod:`umbrella_core.model.loss`).

    Attributes:
        loss: Unified NLL plus every loss-hook term (weighted); None without labels.
        logits: ``(B, L, vocab)``, when there are no labels (generation), in eval
            mode, with ``return_logits=True``, or when a loss term sets
            ``needs_logits``; otherwise None.
        nll: The unified next-token NLL (mean over learned tokens).
        token_loss: ``(B, L - 1)`` float32 NLL of ``labels[:, 1:]`` at each
            position, 0.0 where nothing is learned (in the graph: a loss term
            may weight it).
        token_correct: ``(B, L - 1)`` bool, whether the most likely next token
            equals the label at a learned position (False elsewhere); in eval
            mode or with ``return_correct=True``, else None.
        key_losses: Mean NLL per sample modality key (``t1``, ``t1+dmri``) in this batch.
        key_tokens: Number of learned tokens per key (to average across steps).
        terms: Each loss-hook term, unweighted.
        image_features: Projected image tokens per modality present, ``(n, N, D)``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None
    token_correct: torch.Tensor | None = None
    key_losses: dict[str, float] | None = None
    key_tokens: dict[str, int] | None = None
    terms: dict[str, torch.Tensor] | None = None
    image_features: dict[str, torch.Tensor] | None = field(default=None)


def vision_tower(llava: Any) -> Any:
    tower = llava.model.vision_tower
    return getattr(tower, "vision_model", tower)


class UmbrellaModel(nn.Module):
    """A Llava model with per-modality 3D/4D patch embedders.

    Args:
        llava: A ``LlavaForConditionalGeneration``.
        specs: Active modalities in canonical order (name → spec).
        embedders: Patch embedder per active modality.
        image_token_id: Id of the image placeholder token.
        loss_terms: Extra terms from the loss hook.
    """

    def __init__(
        self,
        llava: Any,
        specs: Mapping[str, ModalitySpec],
        embedders: Mapping[str, nn.Module],
        *,
        image_token_id: int,
        loss_terms: Sequence[LossTerm] = (),
    ) -> None:
        super().__init__()
        if not specs:
            raise ModelError("no active modality: install a modality plugin or check --modalities")
        # Any: a transformers Llava model (of whichever llava_class), whose parts
        # (model.vision_tower, model.multi_modal_projector, config.vision_config,
        # ...) are reached by name; nn.Module's stubs type those as Tensor | Module.
        self.llava = llava
        self.config = llava.config
        # Our embedders emit no CLS token: keep every token (see ARCHITECTURE pitfalls).
        self.config.vision_feature_select_strategy = "full"
        self.image_token_id = int(image_token_id)
        self.loss_terms = list(loss_terms)
        #: Absent modalities also go through the shared vision body, so every
        #: rank calls the same modules in the same order: DeepSpeed ZeRO needs
        #: this (UmbrellaTrainer sets it); DDP and one process do not.
        self.uniform_module_order = False
        tower = vision_tower(llava)
        hidden = int(getattr(tower.config, "hidden_size", llava.config.vision_config.hidden_size))
        for name, module in embedders.items():
            if sum(p.numel() for p in module.parameters()) == 0:
                raise ModelError(f"the {name} patch embedder has no parameters")
        tower.embeddings = ModalityEmbeddings(specs, embedders)
        self.vision_hidden_size = hidden
        # The LoRA settings once adapters are added (saved in checkpoints).
        self.lora_settings: dict[str, Any] | None = None
        #: The vision body was built fresh (random, or trained only by UMBRELLA):
        #: it has nothing pretrained to keep, so it trains wherever the projector
        #: does (saved in checkpoints).
        self.vision_is_new = False

    # -- structure ------------------------------------------------------------

    @property
    def embeddings(self) -> ModalityEmbeddings:
        return vision_tower(self.llava).embeddings

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.embeddings.order

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.embeddings.specs

    @property
    def language_model(self) -> PreTrainedModel:
        """The Llava model's decoder (without its ``lm_head``)."""
        return self.llava.model.language_model

    def _body_layers(self) -> list[nn.Module]:
        """The vision encoder layers the selected features depend on.

        A LLaVA-1.5 tower selects the penultimate layer (``vision_feature_layer
        = -2``): its last layer never runs, so its parameters are ``unused``.
        """
        layers = list(vision_tower(self.llava).encoder.layers)
        index = self.config.vision_feature_layer
        wanted = [index] if isinstance(index, int) else list(index)
        # hidden_states[i] is the output of layer i (0: the embeddings).
        needed = max((i if i >= 0 else len(layers) + 1 + i) for i in wanted)
        return layers[:needed]

    def _has_body(self) -> bool:
        """Whether image tokens pass a vision body (``model.vision: none`` has no layer)."""
        return len(vision_tower(self.llava).encoder.layers) > 0

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: ``embedders``, ``projector``, ``vision``, ``language``,
        ``lora``, ``unused``.

        ``lora`` holds the language model's LoRA adapters (see :meth:`add_lora`);
        ``language`` its other weights and the ``lm_head``. ``unused`` holds
        parameters that never run: vision-tower parts LLaVA skips (the pooled
        output's ``post_layernorm``, a SigLIP head, layers after the selected
        feature layer, the pre-norm of a tower without layers) and anything
        else a checkpoint carries beside the three parts (LLaVA-OneVision's
        ``image_newline``). They never train, or DDP would wait for their
        gradients forever.
        """
        tower = vision_tower(self.llava)
        lora_ids = {id(p) for n, p in self.language_model.named_parameters() if ".lora_" in n}
        embed_ids = {id(p) for p in self.embeddings.parameters()}
        proj_ids = {id(p) for p in self.llava.model.multi_modal_projector.parameters()}
        body: list[nn.Module] = list(self._body_layers())
        if self._has_body() and hasattr(tower, "pre_layrnorm"):
            body.append(tower.pre_layrnorm)
        vision_ids = {id(p) for m in body for p in m.parameters()}
        language_ids = {id(p) for p in self.language_model.parameters()} | {
            id(p) for p in self.llava.get_output_embeddings().parameters()
        }
        groups: dict[str, list[nn.Parameter]] = {
            k: [] for k in ("embedders", "projector", "vision", "language", "lora", "unused")
        }
        for p in self.parameters():
            key = (
                "embedders"
                if id(p) in embed_ids
                else "projector"
                if id(p) in proj_ids
                else "vision"
                if id(p) in vision_ids
                else "lora"
                if id(p) in lora_ids
                else "language"
                if id(p) in language_ids
                else "unused"
            )
            groups[key].append(p)
        return groups

    def set_trainable(self, which: str) -> None:
        """Choose what trains; everything else is frozen (``requires_grad=False``).

        ``embedders``; ``projector`` (embedders + projector); ``lora`` (the LoRA
        adapters added by :meth:`add_lora`, plus embedders + projector; the
        language model's own weights stay frozen); ``full`` (everything that
        runs, adapters included). A new vision body (:attr:`vision_is_new`)
        trains with the projector; a pretrained one only under ``full``.
        """
        if which not in TRAINABLE_SETS:
            raise ModelError(f"trainable must be one of {', '.join(TRAINABLE_SETS)}, got {which!r}")
        if which == "lora" and self.lora_settings is None:
            raise ModelError("trainable 'lora' needs LoRA adapters: call add_lora() first")
        keep = {
            "embedders": {"embedders"},
            "projector": {"embedders", "projector"},
            "lora": {"embedders", "projector", "lora"},
        }.get(which, {"embedders", "projector", "vision", "language", "lora"})
        if self.vision_is_new and "projector" in keep:
            keep = keep | {"vision"}
        for group, params in self.parameter_groups().items():
            for p in params:
                p.requires_grad_(group in keep)

    def add_lora(
        self,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        seed: int = 0,
    ) -> None:
        """Add peft LoRA adapters to the language model's linear layers named ``target_modules``.

        Only the language model is adapted (the vision tower has layers named
        ``q_proj`` too). The adapters start as an exact no-op (``lora_B`` is
        zero), so the model's outputs are unchanged until they train. They are
        initialised under ``seed`` so every rank builds the same ones.
        """
        from peft import LoraConfig, inject_adapter_in_model

        settings: dict[str, Any] = {
            "r": int(r),
            "alpha": float(alpha),
            "dropout": float(dropout),
            "target_modules": list(target_modules),
        }
        if self.lora_settings is not None:
            if self.lora_settings != settings:
                raise ModelError(
                    f"the model already has LoRA adapters {self.lora_settings}, not {settings}"
                )
            return
        layers = {n.rsplit(".", 1)[-1] for n, _ in self.language_model.named_modules()}
        missing = [t for t in settings["target_modules"] if t not in layers]
        if missing:
            raise ModelError(
                f"LoRA target_modules: the language model has no layer named {missing[0]!r}"
            )
        config = LoraConfig(
            r=settings["r"],
            lora_alpha=settings["alpha"],
            lora_dropout=settings["dropout"],
            target_modules=settings["target_modules"],
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            inject_adapter_in_model(config, self.language_model)
        self.lora_settings = settings

    # -- memory ---------------------------------------------------------------

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute the language model's activations in the backward pass.

        Called by the transformers Trainer for ``gradient_checkpointing``. Only
        the language model (the long sequences) is checkpointed; the vision path
        and its coverage term run as usual. Non-reentrant checkpointing by
        default: it needs no input that requires grad (frozen token embeddings)
        and gives the same gradients as without.
        """
        self.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs or {"use_reentrant": False},
            every_n_layers=every_n_layers,
            offload=offload,
        )

    def activation_checkpointing_disable(self) -> None:
        self.language_model.activation_checkpointing_disable()

    # -- vision path ----------------------------------------------------------

    def _vision_body(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = vision_tower(self.llava)
        has_body = self._has_body()
        hidden = tokens
        if has_body and hasattr(tower, "pre_layrnorm"):  # CLIP has one, SigLIP does not
            hidden = tower.pre_layrnorm(tokens)
        states = [hidden]
        for layer in self._body_layers():
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
        if not has_body:
            return self.llava.model.multi_modal_projector(hidden)
        total = len(tower.encoder.layers) + 1  # hidden states of the whole tower
        index = self.config.vision_feature_layer
        wanted = [index] if isinstance(index, int) else list(index)
        selected = torch.cat([states[i if i >= 0 else total + i] for i in wanted], dim=-1)
        return self.llava.model.multi_modal_projector(selected)

    def image_features(
        self, pixel_values: Mapping[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Projected features per present modality, and the coverage term (exactly 0.0).

        Every active embedder runs, in canonical order, on every call: absent
        modalities embed a single zero image whose output enters the loss
        multiplied by exactly 0.0 (I4), so their parameters get exact-zero
        gradients and DDP finds every parameter used. With
        :attr:`uniform_module_order` (DeepSpeed) each embedder is followed by
        the shared vision body and projector, for absent modalities on the
        first token of their zero image: then every rank calls the same
        modules in the same order whatever modalities its batch holds. ZeRO-3
        gathers parameters module by module in that order, and autograd runs
        the backward in reverse creation order, so gradients become ready in
        the same order on every rank too (ZeRO-2's buckets).
        """
        pixel_values = dict(pixel_values or {})
        unknown = set(pixel_values) - set(self.modalities)
        if unknown:
            raise ModelError(
                f"batch holds modality {sorted(unknown)} but the model has embedders for "
                f"{', '.join(self.modalities)}"
            )
        param = next(self.embeddings.parameters())
        features: dict[str, torch.Tensor] = {}
        dummy = torch.zeros((), device=param.device, dtype=torch.float32)
        first_absent = None
        for modality in self.modalities:
            spec = self.specs[modality]
            images = pixel_values.get(modality)
            if images is not None and images.shape[0] > 0:
                if tuple(images.shape[1:]) != spec.input_shape:
                    raise ModelError(
                        f"{modality} images have shape {tuple(images.shape[1:])}, the model "
                        f"expects {spec.input_shape}"
                    )
                tokens = self.embeddings.embed(modality, images.to(param.dtype))
                features[modality] = self._vision_body(tokens)
            else:
                zero = torch.zeros((1, *spec.input_shape), device=param.device, dtype=param.dtype)
                tokens = self.embeddings.embed(modality, zero)
                if self.uniform_module_order:
                    # One token is enough to put the body and projector in the
                    # graph in this position; the whole image would cost ~7 % a step.
                    dummy = dummy + self._vision_body(tokens[:, :1]).float().sum()
                else:
                    dummy = dummy + tokens.float().sum()
                    first_absent = tokens if first_absent is None else first_absent
        if not features and first_absent is not None and not self.uniform_module_order:
            # A text-only batch: the shared body and projector must still be in the graph.
            dummy = dummy + self._vision_body(first_absent[:, :1]).float().sum()
        return features, dummy * 0.0

    def splice(
        self,
        input_ids: torch.Tensor,
        features: Mapping[str, torch.Tensor],
        image_modalities: Sequence[str] | None,
        image_places: Mapping[str, Sequence[tuple[int, int]]] | None = None,
    ) -> torch.Tensor:
        """Text embeddings with each image's features at its own placeholder tokens (I3).

        ``image_places[m][j]`` is ``(row, ordinal)`` of ``features[m][j]``,
        checked against the placeholders (:mod:`umbrella_core.model.placement`):
        a disagreement is a :class:`TokenCountError`, never a misplaced image.
        """
        embeds = self.llava.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        n_placeholders = int(mask.sum())
        n_features = sum(f.shape[0] * f.shape[1] for f in features.values())
        if n_placeholders != n_features:
            per = ", ".join(
                f"{m}: {features[m].shape[0]} image(s) x {features[m].shape[1]} tokens"
                for m in features
            )
            raise TokenCountError(
                f"the batch has {n_placeholders} image placeholder tokens but its images give "
                f"{n_features} feature tokens ({per or 'no images'}); each <image> must expand "
                "to exactly its modality's token count"
            )
        if not n_features:
            return embeds
        flat = ordered_features(mask, features, image_modalities, image_places)
        return embeds.masked_scatter(mask.unsqueeze(-1), flat.to(embeds.dtype))

    # -- forward --------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: Mapping[str, torch.Tensor] | None = None,
        image_modalities: Sequence[str] | None = None,
        image_places: Mapping[str, Sequence[tuple[int, int]]] | None = None,
        sample_keys: Sequence[str] | None = None,
        sample_sources: Sequence[str | None] | None = None,
        *,
        return_logits: bool | None = None,
        return_correct: bool | None = None,
        loss_chunk_size: int | None = None,
    ) -> UmbrellaOutput:
        """Run the model; with ``labels``, the unified loss over the learned tokens.

        Logits are computed where labels are learned only, in chunks that the
        backward pass recomputes (:func:`umbrella_core.model.loss.learned_token_loss`),
        with the text model's logit scaling and soft-capping applied.

        The arguments before ``*`` are a :class:`~umbrella_core.types.Batch`'s
        keys (``model(**batch)``); the loss terms get them back as that ``Batch``.

        Args:
            input_ids: ``(B, L)`` token ids with image placeholders.
            attention_mask: ``(B, L)``.
            labels: ``(B, L)``, ``-100`` where nothing is learned; None to generate.
            pixel_values: Images per modality, ``(n, C, ...)``.
            image_modalities: Modality of each image placeholder run, in order.
            image_places: Per modality, ``(row, ordinal)`` of each image of
                ``pixel_values[m]``: where it goes (:meth:`splice`).
            sample_keys: Modality key per row, for :attr:`UmbrellaOutput.key_losses`.
            sample_sources: Where each row's record was read, for the loss terms'
                batch (the trainer's reports of a non-finite loss name it).
            return_logits: Full ``(B, L, vocab)`` logits. Default: without labels,
                in eval mode, or when a loss term sets ``needs_logits``.
            return_correct: :attr:`UmbrellaOutput.token_correct`. Default: in eval mode.
            loss_chunk_size: Rows of logits per chunk (memory ~ rows x vocab x 4 bytes x 3).

        Returns:
            An :class:`UmbrellaOutput`.
        """
        features, coverage = self.image_features(pixel_values)
        embeds = self.splice(input_ids, features, image_modalities, image_places)
        # The base model, not Llava's head: logits at every position would be
        # B x L x vocab (see ARCHITECTURE's pitfalls).
        hidden = self.llava.model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        head = LogitHead(self.llava.get_output_embeddings(), self.config.get_text_config())
        if return_logits is None:
            return_logits = (
                labels is None
                or not self.training
                or any(getattr(t, "needs_logits", False) for t in self.loss_terms)
            )
        logits = head(hidden, upcast=False) if return_logits else None
        result = UmbrellaOutput(logits=logits, image_features=features)
        if labels is None:
            return result
        batch = Batch(
            input_ids=input_ids,
            attention_mask=attention_mask
            if attention_mask is not None
            else torch.ones_like(input_ids),
            labels=labels,
            pixel_values=dict(pixel_values or {}),
            image_places={m: list(p) for m, p in (image_places or {}).items()},
            image_modalities=list(image_modalities or ()),
            sample_keys=list(sample_keys or ()),
            sample_sources=list(sample_sources or ()),
        )
        want_correct = not self.training if return_correct is None else return_correct
        self._add_loss(result, head, hidden, batch, coverage, want_correct, loss_chunk_size)
        if sample_keys is not None and result.token_loss is not None:  # _add_loss set it
            result.key_losses, result.key_tokens = _key_losses(
                result.token_loss, labels[:, 1:].to(hidden.device) != IGNORE_INDEX, sample_keys
            )
        return result

    def _add_loss(
        self,
        result: UmbrellaOutput,
        head: LogitHead,
        hidden: torch.Tensor,
        batch: Batch,
        coverage: torch.Tensor,
        want_correct: bool,
        chunk_size: int | None,
    ) -> None:
        """The unified loss into ``result``: the NLL of the learned tokens, the coverage
        term (exactly 0), and each loss term's value, weighted."""
        labels = batch["labels"]
        token_loss, token_correct = learned_token_loss(
            head,
            hidden,
            labels,
            chunk_size=chunk_size,
            uniform=self.uniform_module_order,
            want_correct=want_correct,
        )
        learned = labels[:, 1:].to(hidden.device) != IGNORE_INDEX
        result.nll = token_loss.sum() / learned.sum().clamp(min=1)
        result.token_loss = token_loss
        result.token_correct = token_correct
        terms: dict[str, torch.Tensor] = {}
        loss = result.loss = result.nll + coverage
        for term in self.loss_terms:
            value = term.compute(result, batch)
            terms[term.name] = value
            loss = loss + term.weight * value
        result.loss = loss
        result.terms = terms


def _key_losses(
    token_loss: torch.Tensor, learned: torch.Tensor, sample_keys: Sequence[str]
) -> tuple[dict[str, float], dict[str, int]]:
    """The mean NLL of each modality key's learned tokens, and how many there were."""
    per_row = token_loss.detach().sum(dim=1)
    rows = learned.sum(dim=1)
    key_sum: dict[str, float] = {}
    key_tokens: dict[str, int] = {}
    for key, s, n in zip(sample_keys, per_row.tolist(), rows.tolist(), strict=False):
        key_sum[key] = key_sum.get(key, 0.0) + s
        key_tokens[key] = key_tokens.get(key, 0) + int(n)
    return {k: key_sum[k] / max(key_tokens[k], 1) for k in key_sum}, key_tokens
