"""Osprey = LLaVA-1.5 layout + mask extractor, with the official parameter names (spec §1.1, §6.1):

    model.embed_tokens / model.layers.* / model.norm     LLaMA decoder (transformers)
    model.vision_tower.vision_tower.visual.trunk.*       ConvNeXt CLIP trunk (frozen)
    model.mm_projector.{0,2}                             mlp2x_gelu projector, res4 -> LLM width
    mask_extractor.*                                      two embeddings per region
    lm_head                                               untied output head

Unlike the original, splicing builds a correct attention mask and position ids for padded batches,
and the LLM call accepts a KV cache plus a custom 4D mask so the engine can score many regions and
labels on one cached image prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from ..config import OspreyConfig
from ..errors import PromptError
from .mask_extractor import MaskExtractor
from .vision import CLIPConvNeXtTower

IMAGE_TOKEN_INDEX = -200


def llama_config(cfg: OspreyConfig) -> LlamaConfig:
    t = cfg.text
    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def build_projector(cfg: OspreyConfig) -> nn.Sequential:
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise ValueError(f"unsupported mm_projector_type {cfg.mm_projector_type!r} (Osprey uses mlp2x_gelu)")
    h = cfg.text.hidden_size
    return nn.Sequential(nn.Linear(cfg.mm_hidden_size, h), nn.GELU(), nn.Linear(h, h))


class OspreyLlamaModel(LlamaModel):
    """The LLaMA decoder with the vision tower and projector attached under the official names."""

    def __init__(self, cfg: OspreyConfig):
        super().__init__(llama_config(cfg))
        self.vision_tower = CLIPConvNeXtTower(cfg.vision)
        self.mm_projector = build_projector(cfg)


@dataclass
class ImageFeatures:
    """One image, encoded once: the four feature levels (each (C,h,w)) and its projected tokens (N, hidden)."""

    levels: dict[str, torch.Tensor]
    tokens: torch.Tensor


class OspreyForCausalLM(nn.Module):
    def __init__(self, cfg: OspreyConfig):
        super().__init__()
        self.cfg = cfg
        self.model = OspreyLlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.mask_extractor = MaskExtractor(cfg)

    @property
    def llama_config(self) -> LlamaConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # --- vision -------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> list[ImageFeatures]:
        """(B,3,S,S) normalised pixels -> per image: res2..res5 and res4 tokens through the projector."""
        levels = self.model.vision_tower(pixel_values)
        res4 = levels["res4"]
        b, c = res4.shape[:2]
        tokens = res4.reshape(b, c, -1).permute(0, 2, 1)
        proj = self.model.mm_projector
        tokens = proj(tokens.to(proj[0].weight.dtype))
        return [ImageFeatures({k: v[i] for k, v in levels.items()}, tokens[i]) for i in range(b)]

    def region_embeddings(self, image: ImageFeatures, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """masks (Q,H,W) at image resolution -> (mask tokens, pos tokens), each (Q, hidden) fp32."""
        return self.mask_extractor(image.levels, masks)

    # --- text + splicing ---------------------------------------------------------------------------

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed plain token ids; ids >= vocab (the added `<mask>`/`<pos>`) never reach the table."""
        if ids.numel() and int(ids.max()) >= self.cfg.text.vocab_size:
            raise PromptError("a `<mask>`/`<pos>` id reached the embedding table (every `<mask>` needs a region)")
        return self.model.embed_tokens(ids)

    def splice(
        self,
        ids: torch.Tensor,
        image_tokens: torch.Tensor | None,
        mask_tokens: torch.Tensor | None,
        pos_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """One sequence of ids (with at most one IMAGE_TOKEN_INDEX and Q `<mask><pos>` pairs) -> (L', hidden).

        The image placeholder becomes the N image tokens; the i-th `<mask>` and the `<pos>` after it
        become the i-th region's mask and position embeddings (spec §5).
        """
        ids = ids.to(self.device)
        n_img = int((ids == IMAGE_TOKEN_INDEX).sum())
        if n_img > 1:
            raise PromptError(f"a prompt may hold one <image>, found {n_img}")
        if n_img and image_tokens is None:
            raise PromptError("prompt has <image> but no image features were given")
        mask_pos = (ids == self.cfg.mask_token_id).nonzero().flatten().tolist()
        q = 0 if mask_tokens is None else mask_tokens.shape[0]
        if len(mask_pos) != q:
            raise PromptError(f"prompt has {len(mask_pos)} <mask> tokens but {q} regions were given")
        for p in mask_pos:
            if p + 1 >= len(ids) or int(ids[p + 1]) != self.cfg.pos_token_id:
                raise PromptError("every <mask> must be followed by <pos>")
        n_pos = int((ids == self.cfg.pos_token_id).sum())
        if n_pos != len(mask_pos):
            raise PromptError(f"prompt has {n_pos} <pos> tokens for {len(mask_pos)} <mask> tokens")

        dtype = self.model.embed_tokens.weight.dtype
        specials = {int(p): ("mask", i) for i, p in enumerate(mask_pos)}
        if n_img:
            specials[int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])] = ("image", 0)
        pieces: list[torch.Tensor] = []
        cursor = 0
        for p in sorted(specials):
            kind, i = specials[p]
            pieces.append(self.embed_ids(ids[cursor:p]))
            if kind == "image":
                pieces.append(image_tokens.to(dtype))
                cursor = p + 1
            else:
                pieces.append(mask_tokens[i : i + 1].to(dtype))
                pieces.append(pos_tokens[i : i + 1].to(dtype))
                cursor = p + 2
        pieces.append(self.embed_ids(ids[cursor:]))
        return torch.cat(pieces, dim=0)

    @staticmethod
    def pad_batch(seqs: list[torch.Tensor], left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad spliced sequences into (B,L,hidden) with a correct attention mask and position ids.

        Left padding suits generation (every row ends at the same column); position ids count only real
        tokens, so a padded row computes exactly what it computes alone.
        """
        length = max(s.shape[0] for s in seqs)
        hidden = seqs[0].shape[1]
        embeds = seqs[0].new_zeros(len(seqs), length, hidden)
        attn = torch.zeros(len(seqs), length, dtype=torch.long, device=seqs[0].device)
        for i, s in enumerate(seqs):
            sl = slice(length - s.shape[0], length) if left else slice(0, s.shape[0])
            embeds[i, sl] = s
            attn[i, sl] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        return embeds, attn, positions

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        """LLaMA on spliced embeddings -> (logits fp32, cache)."""
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return self.lm_head(out.last_hidden_state).float(), out.cache
