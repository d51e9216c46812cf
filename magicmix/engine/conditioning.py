"""How a family's prompts guide its denoiser: text encoders in, the denoiser's inputs out.

The sampler (`pipeline.py`) sees a `Conditioning` (named tensors, one row per sample, rows
[uncond..., cond...]) and a `Conditioner`, which encodes texts and calls the denoiser with
them. A family whose denoiser takes other inputs (SD3's and Flux's transformers take
`pooled_projections` and T5 states, not `added_cond_kwargs`) brings a conditioner of its
own, named by its `ModelFamily.conditioning`, and reuses the sampler loop as it is.

`ClipConditioner` serves the UNet families with CLIP text encoders, as their
`ModelFamily` describes them:
- SD 1.x: the one encoder's final hidden states;
- SDXL: both encoders' penultimate hidden states side by side, the second's pooled
  embedding, and the size/crop time ids (original = target = the output size, crop
  (0, 0)), for the unconditional and the conditional rows alike.
An empty negative prompt is zeros where the checkpoint asks for that
(`force_zeros_for_empty_prompt`), as diffusers' SDXL pipeline does.

CLIP reads at most 77 tokens, its start and end markers included; a longer text is cut
there. The conditioner counts each text's tokens so that the cut is reported, not silent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from magicmix.engine.loading import Components
from magicmix.request import MixRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextRead:
    """How much of one text the encoders read: its own tokens (no start or end marker),
    and whether some were cut off because the encoders' window is shorter."""

    tokens: int
    truncated: bool


@dataclass(frozen=True)
class EncodedText:
    """One text through a family's encoders: tensors without a batch axis, and what was read."""

    tensors: dict[str, torch.Tensor]
    read: TextRead


@dataclass(frozen=True)
class Conditioning:
    """What guides the denoiser for rows [uncond..., cond...]: named tensors, batch first."""

    tensors: dict[str, torch.Tensor]

    def rows(self, index: list[int]) -> Conditioning:
        return self._map(lambda tensor: tensor[index])

    def padded(self, to: int) -> Conditioning:
        """Each half padded (with its last row) to `to` rows."""

        def pad(tensor: torch.Tensor) -> torch.Tensor:
            halves = tensor.chunk(2)
            missing = to - halves[0].shape[0]
            return torch.cat([torch.cat([h, h[-1:].expand(missing, *h.shape[1:])]) for h in halves])

        return self._map(pad)

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning({name: change(tensor) for name, tensor in self.tensors.items()})


class Conditioner(Protocol):
    """A family's side of the sampler: its texts encoded, its denoiser called."""

    def encode(self, texts: list[str]) -> list[EncodedText]:
        """Each text on its own (the engine caches them by text)."""
        ...

    def condition(
        self,
        requests: Sequence[MixRequest],
        uncond: Sequence[EncodedText],
        cond: Sequence[EncodedText],
    ) -> Conditioning:
        """The batch's conditioning from its encoded negative prompts and prompts."""
        ...

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        """The denoiser's noise prediction for `latents` (rows as in `conditioning`) at t."""
        ...


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """SD's text input: every text padded (or cut) to the tokenizer's 77 tokens."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def text_window(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many of a text's own tokens `token_ids` keeps (the rest are start/end markers)."""
    return int(tokenizer.model_max_length - tokenizer.num_special_tokens_to_add())


def text_reads(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[TextRead]:
    """Each text's own tokens, and whether they exceed what `token_ids` keeps of them."""
    window = text_window(tokenizer)
    counts = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [TextRead(len(ids), len(ids) > window) for ids in counts.input_ids]


class ClipConditioner:
    """SD 1.x and SDXL: CLIP hidden states, pooled embeddings and size ids as the family says."""

    def __init__(
        self,
        components: Components,
        *,
        device: torch.device,
        dtype: torch.dtype,
        pieces: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> None:
        self.components = components
        self.family = components.family
        self.device = device
        self.dtype = dtype
        self._pieces = pieces  # the batch whole, or one row at a time (batch invariance)
        self.window = min(map(text_window, components.tokenizers))

    def encode(self, texts: list[str]) -> list[EncodedText]:
        parts = self.components
        states: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        reads = [TextRead(0, False)] * len(texts)
        for spec, tokenizer, encoder in zip(
            self.family.text_encoders, parts.tokenizers, parts.text_encoders, strict=True
        ):
            reads = [
                TextRead(max(a.tokens, b.tokens), a.truncated or b.truncated)
                for a, b in zip(reads, text_reads(tokenizer, texts), strict=True)
            ]
            ids = token_ids(tokenizer, texts).to(self.device)
            hidden = spec.hidden_layer is not None
            outputs = [encoder(piece, output_hidden_states=hidden) for piece in self._pieces(ids)]
            states.append(
                torch.cat(
                    [
                        out.hidden_states[spec.hidden_layer] if hidden else out.last_hidden_state
                        for out in outputs
                    ]
                )
            )
            if spec.pooled:
                pooled.append(torch.cat([out.text_embeds for out in outputs]))
        tensors = {"text": torch.cat(states, dim=-1).to(self.dtype)}
        if pooled:
            tensors["pooled"] = torch.cat(pooled, dim=-1).to(self.dtype)
        for read in reads:
            if read.truncated:
                log.warning("a text of %d tokens was cut to the %d read", read.tokens, self.window)
        return [
            EncodedText({name: tensor[i] for name, tensor in tensors.items()}, read)
            for i, read in enumerate(reads)
        ]

    def condition(
        self,
        requests: Sequence[MixRequest],
        uncond: Sequence[EncodedText],
        cond: Sequence[EncodedText],
    ) -> Conditioning:
        rows = [*uncond, *cond]
        tensors = {
            name: torch.stack([row.tensors[name] for row in rows]) for name in rows[0].tensors
        }
        if self.components.zeros_for_empty_prompt:  # as diffusers' SDXL pipeline does
            empty = [r.negative_prompt == "" for r in requests] + [False] * len(requests)
            mask = torch.tensor(empty, device=self.device)
            tensors = {
                name: torch.where(
                    mask.view(-1, *[1] * (tensor.dim() - 1)), torch.zeros_like(tensor), tensor
                )
                for name, tensor in tensors.items()
            }
        if self.family.size_ids:
            # original size, crop corner, target size: the output size, uncropped
            sizes = [[r.height, r.width, 0, 0, r.height, r.width] for r in requests]
            tensors["time_ids"] = torch.tensor(sizes * 2, dtype=self.dtype, device=self.device)
        return Conditioning(tensors)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        given = conditioning.tensors
        extra: dict[str, object] = {}
        if self.family.size_ids:
            extra["added_cond_kwargs"] = {
                "text_embeds": given["pooled"],
                "time_ids": given["time_ids"],
            }
        return self.components.denoiser(
            latents, t, encoder_hidden_states=given["text"], **extra
        ).sample


CONDITIONERS: dict[str, Callable[..., Conditioner]] = {"clip": ClipConditioner}
"""Each `ModelFamily.conditioning` name and the class that implements it."""
