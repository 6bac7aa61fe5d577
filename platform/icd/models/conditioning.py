"""SDXL's extra conditioning carried inside the one context tensor every sampler already passes around.

SD1.5's UNet takes the text encoder's hidden states, (B, 77, D). SDXL's takes the concatenated
hidden states of its two text encoders (B, 77, 768 + 1280) plus ``added_cond_kwargs``: the second
encoder's pooled, projected embedding ``text_embeds`` (B, 1280) and the six size ids ``time_ids``
(original height and width, crop top and left, target height and width). Here those two ride as
one extra token at the end of the context::

    context = [h_1 .. h_77 | pooled (P) · time_ids (6) · zeros]      (B, 78, D), P + 6 <= D

so every operation a sampler, an editing mode or a training objective does on contexts along the
batch dimension (concatenating source/target/unconditional rows, indexing, expanding, moving to a
device or dtype, caching a prompt's row) carries the SDXL conditioning with it, and only the UNet
call (`ModelBundle.unet_kwargs`) unpacks it. Attention never sees the extra token.
"""

from __future__ import annotations

import torch

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w): SDXL's micro-conditioning


class ConditioningError(ValueError):
    """Contexts or sizes that do not fit the packed layout; the message says what was expected."""


def size_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> torch.Tensor:
    """time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as SDXL was trained on them."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def pack(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states, (B, P) pooled, (B, 6) or (6,) time ids -> (B, L + 1, D) context."""
    b, _, d = hidden.shape
    p = pooled.shape[-1]
    if p + TIME_IDS > d:
        raise ConditioningError(f"a pooled embedding of {p} plus {TIME_IDS} time ids does not fit a context "
                                f"token of width {d}")
    extra = hidden.new_zeros(b, 1, d)
    extra[:, 0, :p] = pooled.to(hidden.dtype)
    extra[:, 0, p:p + TIME_IDS] = time_ids.to(hidden.dtype).expand(b, TIME_IDS)
    return torch.cat([hidden, extra], dim=1)


def unpack(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L + 1, D) context -> hidden (B, L, D), pooled (B, P), time_ids (B, 6); the inverse of `pack`."""
    extra = context[:, -1]
    return context[:, :-1], extra[:, :pooled_dim], extra[:, pooled_dim:pooled_dim + TIME_IDS]


def with_time_ids(context: torch.Tensor, time_ids: torch.Tensor, pooled_dim: int) -> torch.Tensor:
    """The context with its time ids replaced by ``time_ids`` ((B, 6) or (6,)); hidden and pooled kept."""
    out = context.clone()
    out[:, -1, pooled_dim:pooled_dim + TIME_IDS] = time_ids.to(context.dtype).expand(context.shape[0], TIME_IDS)
    return out


def time_ids_of(context: torch.Tensor, pooled_dim: int) -> torch.Tensor:
    """The (B, 6) time ids a packed context carries."""
    return context[:, -1, pooled_dim:pooled_dim + TIME_IDS]
