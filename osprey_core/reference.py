"""The plain path: one region at a time, the image encoded every time, the whole prompt run from
scratch — what the original code does. Tests prove the engine equals it; the benchmark measures
the engine against it."""

from __future__ import annotations

import torch

from . import conversation as conv
from .image_processing import preprocess, to_pil
from .tokenizer import continuation_ids, tokenizer_image_token


def _encode(model, image, mask):
    pil = to_pil(image)
    pixels = preprocess(pil, model.cfg.vision).to(model.device)
    feats = model.encode_images(pixels[None])[0]
    masks = torch.as_tensor(mask, device=model.device)[None].bool()
    mask_tok, pos_tok = model.region_embeddings(feats, masks)
    return feats, mask_tok, pos_tok


@torch.inference_mode()
def plain_option_logliks(model, tokenizer, image, mask, question: str, options: list[str]) -> list[float]:
    """Full forward of prompt + option + </s>, separately for each option, summing token log-probs."""
    feats, mask_tok, pos_tok = _encode(model, image, mask)
    text = conv.chat_prompt(question)
    ids = tokenizer_image_token(text, tokenizer)
    out = []
    for option in options:
        o_ids = continuation_ids(tokenizer, ids, text, option)
        embeds = model.splice(torch.tensor(ids + o_ids), feats.tokens, mask_tok, pos_tok)
        logits, _ = model(embeds[None])
        logp = torch.log_softmax(logits[0], dim=-1)
        start = embeds.shape[0] - len(o_ids)
        out.append(sum(logp[start - 1 + t, tok].item() for t, tok in enumerate(o_ids)))
    return out


@torch.inference_mode()
def plain_generate(model, tokenizer, image, mask, question: str, max_new_tokens: int) -> str:
    """Greedy decoding with an ordinary KV cache, one region, the image encoded for this call alone."""
    feats, mask_tok, pos_tok = _encode(model, image, mask)
    ids = tokenizer_image_token(conv.chat_prompt(question), tokenizer)
    embeds = model.splice(torch.tensor(ids), feats.tokens, mask_tok, pos_tok)
    logits, cache = model(embeds[None], use_cache=True)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        logits, cache = model(model.embed_ids(torch.tensor([[nxt]], device=model.device)), cache=cache, use_cache=True)
    return tokenizer.decode(out, skip_special_tokens=True).strip()
