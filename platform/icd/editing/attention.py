"""Attention control through diffusers attention processors (no monkey-patching of ``forward``).

`attention_control(unet, controller)` installs a `ControlledAttnProcessor` on every attention
layer for the duration of a ``with`` block and puts the original processors back afterwards,
also after an exception. The processor computes attention exactly like diffusers'
``AttnProcessor`` but hands the probabilities to ``controller(probs, is_cross, layer)`` first.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch


class AttentionController(Protocol):
    def __call__(self, probs: torch.Tensor, is_cross: bool, layer: str) -> torch.Tensor:
        """probs: (batch * heads, queries, keys) softmax probabilities; return the ones to use."""


class ControlledAttnProcessor:
    def __init__(self, controller: AttentionController, layer: str):
        self.controller, self.layer = controller, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = self.controller(probs, is_cross, self.layer)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def attention_control(unet, controller: AttentionController):
    """Route every attention layer of ``unet`` through ``controller`` inside the block."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, name) for name in original})
    try:
        yield
    finally:
        unet.set_attn_processor(original)
