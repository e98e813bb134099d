"""Math-identical attention processors for families whose diffusers processors call SDPA directly.

SD3 (``JointAttnProcessor2_0``) and CogVideoX (``CogVideoXAttnProcessor2_0``) call
``F.scaled_dot_product_attention`` themselves, so diffusers' backend selection never reaches them. These
processors compute exactly the same projections, norms and RoPE in the same order and on the same
tensor layouts, and hand the attention itself to ``dispatch_attention_fn`` with the backend set on the
processor. With diffusers' ``native`` backend they reproduce the originals bit for bit (tested).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn


class _DispatchingProcessor:
    """Processors diffusers' ``set_attention_backend`` recognises (it looks for ``_attention_backend``)."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, query, key, value, attn_mask=None):
        """``[B, H, S, D]`` in (the layout the original processors give SDPA); ``[B, S, H, D]`` out."""
        return dispatch_attention_fn(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )


class FastJointAttnProcessor(_DispatchingProcessor):
    """SD3 / SD3.5 joint attention: image tokens then text tokens ``[img, txt]``.

    Also serves SD3.5's image-only second attention (``attn2``, no ``encoder_hidden_states``).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # [B, S, H*D] -> [B, H, S, D]: the norms then see exactly the tensors the original gives them.
        query, key, value = (
            x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            ctx_q = attn.add_q_proj(encoder_hidden_states)
            ctx_k = attn.add_k_proj(encoder_hidden_states)
            ctx_v = attn.add_v_proj(encoder_hidden_states)
            ctx_q, ctx_k, ctx_v = (
                x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (ctx_q, ctx_k, ctx_v)
            )
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        hidden_states = self._attend(query, key, value)  # [B, S, H, D]
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            n_img = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FastCogVideoXAttnProcessor(_DispatchingProcessor):
    """CogVideoX joint attention: text tokens then video tokens ``[txt, img]``, RoPE on the video part."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = self._attend(query, key, value, attention_mask)  # [B, S, H, D]
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


PROCESSORS = {c.__name__: c for c in (FastJointAttnProcessor, FastCogVideoXAttnProcessor)}
