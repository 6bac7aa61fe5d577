"""Prompt-to-Prompt on the reverse (decoder) steps of an iCD edit.

The decoder runs one batch of ``[source rows..., target rows...]`` from the same inverted
latents: the source rows unguided with the source prompt (they reconstruct the input), the
target rows with the target prompt and dynamic CFG. While the first ``cross_fraction`` of
the steps run, each target row's cross-attention maps are taken from its source row (mapped
token by token); while the first ``self_fraction`` run, its self-attention maps too. With 4
steps, 0.3 covers step 0 and 0.6 covers steps 0-1. ``word_weights`` scales the target's
attention to chosen words at every step (P2P's re-weighting).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class P2POptions:
    cross_fraction: float = 0.3
    self_fraction: float = 0.6
    # "replace": target token i takes source token i's attention (a word swap, same token count);
    # "refine": tokens common to both prompts take the source's, new ones keep their own;
    # "auto": replace when the token counts match, else refine.
    mapping: str = "auto"
    word_weights: dict[str, float] = field(default_factory=dict)  # target word -> attention factor

    @classmethod
    def from_config(cls, editing) -> "P2POptions":
        return cls(cross_fraction=editing.p2p_cross_fraction, self_fraction=editing.p2p_self_fraction)

    def __post_init__(self):
        for name in ("cross_fraction", "self_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.mapping not in ("auto", "replace", "refine"):
            raise ValueError(f"mapping must be 'auto', 'replace' or 'refine', got {self.mapping!r}")


def token_mapping(source_ids: list[int], target_ids: list[int], mode: str) -> torch.Tensor:
    """For each target token position, the source position whose attention it takes (-1: keep its own)."""
    length = len(target_ids)
    if mode == "auto":
        mode = "replace" if len(source_ids) == length else "refine"
    if mode == "replace":
        if len(source_ids) != length:
            raise ValueError("mapping='replace' needs prompts with the same number of tokens; use 'refine'")
        return torch.arange(length)
    mapping = torch.full((length,), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(a=source_ids, b=target_ids, autojunk=False)
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            mapping[b0:b1] = torch.arange(a0, a1)
    return mapping


class PromptToPromptController:
    """Edits attention probabilities of a ``[sources; targets]`` batch (see module docstring)."""

    def __init__(self, options: P2POptions, num_steps: int, mappings: torch.Tensor, weights: torch.Tensor):
        self.options = options
        # P2P's count: int(fraction * steps); 4 steps: 0.3 -> step 0, 0.6 -> steps 0-1.
        self.cross_steps = int(options.cross_fraction * num_steps + 1e-9)
        self.self_steps = int(options.self_fraction * num_steps + 1e-9)
        self.mappings = mappings  # (pairs, tokens): source token per target token, -1 = own
        self.weights = weights  # (pairs, tokens): factor on each target token's attention
        self.step = 0

    @classmethod
    def for_prompts(cls, options: P2POptions, num_steps: int, tokenizer, sources: list[str],
                    targets: list[str]) -> "PromptToPromptController":
        length = tokenizer.model_max_length
        mappings, weights = [], []
        for source, target in zip(sources, targets):
            src = tokenizer(source, truncation=True, max_length=length).input_ids
            tgt = tokenizer(target, truncation=True, max_length=length).input_ids
            mapping = torch.arange(length)  # padding positions map to themselves
            mapping[: len(tgt)] = token_mapping(src, tgt, options.mapping)
            mappings.append(mapping)
            weight = torch.ones(length)
            for word, factor in options.word_weights.items():
                word_ids = tokenizer(word, add_special_tokens=False).input_ids
                for i in range(len(tgt) - len(word_ids) + 1):
                    if tgt[i:i + len(word_ids)] == word_ids:
                        weight[i:i + len(word_ids)] = factor
            weights.append(weight)
        return cls(options, num_steps, torch.stack(mappings), torch.stack(weights))

    def __call__(self, probs: torch.Tensor, is_cross: bool, layer: str) -> torch.Tensor:
        pairs = self.mappings.shape[0]
        heads = probs.shape[0] // (2 * pairs)
        view = probs.view(2, pairs, heads, *probs.shape[1:])
        source, target = view[0], view[1]
        if is_cross:
            mapping = self.mappings.to(probs.device)
            if self.step < self.cross_steps:
                taken = torch.gather(source, -1, mapping.clamp(min=0)[:, None, None, :].expand_as(target))
                keep_own = (mapping < 0)[:, None, None, :]
                target = torch.where(keep_own, target, taken)
            target = target * self.weights.to(probs.device, probs.dtype)[:, None, None, :]
        elif self.step < self.self_steps:
            target = source
        return torch.stack([source, target]).reshape(probs.shape)
