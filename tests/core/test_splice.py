"""Splicing image and region embeddings at `<image>` and `<mask><pos>` (spec §5) and padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osprey_core import PromptError, build_model
from osprey_core import conversation as conv
from osprey_core.image_processing import preprocess, to_pil
from osprey_core.modeling.modeling_osprey import IMAGE_TOKEN_INDEX
from osprey_core.tokenizer import build_tiny_tokenizer, tokenizer_image_token


@pytest.fixture(scope="module")
def parts(image, masks):
    model = build_model("tiny")
    tok = build_tiny_tokenizer()
    feats = model.encode_images(preprocess(to_pil(image), model.cfg.vision)[None])[0]
    mask_tok, pos_tok = model.region_embeddings(feats, torch.from_numpy(np.stack(masks[:2])))
    return model, tok, feats, mask_tok, pos_tok


def test_splice_lengths_and_positions(parts):
    model, tok, feats, mask_tok, pos_tok = parts
    question = conv.OVERVIEW + conv.multi_region_intro(2) + "What are they?"
    ids = tokenizer_image_token(conv.chat_prompt(question), tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(model.cfg.mask_token_id) == 2
    embeds = model.splice(torch.tensor(ids), feats.tokens, mask_tok, pos_tok)
    n_img = feats.tokens.shape[0]
    assert embeds.shape == (len(ids) - 1 + n_img, model.cfg.text.hidden_size)
    k = ids.index(IMAGE_TOKEN_INDEX)
    torch.testing.assert_close(embeds[k : k + n_img], feats.tokens)
    mask_positions = [i for i, t in enumerate(ids) if t == model.cfg.mask_token_id]
    for r, p in enumerate(mask_positions):
        q = p - 1 + n_img  # shifted by the image tokens replacing one placeholder
        torch.testing.assert_close(embeds[q], mask_tok[r])
        torch.testing.assert_close(embeds[q + 1], pos_tok[r])
    # ordinary tokens are the embedding table's rows
    torch.testing.assert_close(embeds[0], model.model.embed_tokens.weight[ids[0]])


def test_mask_count_mismatch_is_clear(parts):
    model, tok, feats, mask_tok, pos_tok = parts
    ids = tokenizer_image_token(conv.chat_prompt(conv.CATEGORY_PROMPT), tok)
    with pytest.raises(PromptError, match="1 <mask> tokens but 2 regions"):
        model.splice(torch.tensor(ids), feats.tokens, mask_tok, pos_tok)
    with pytest.raises(PromptError, match="1 <mask> tokens but 0 regions"):
        model.splice(torch.tensor(ids), feats.tokens, None, None)


def test_mask_without_pos_is_clear(parts):
    model, tok, feats, mask_tok, pos_tok = parts
    ids = tokenizer_image_token(conv.chat_prompt("<image>\nWhat is <mask> here?"), tok)
    with pytest.raises(PromptError, match="followed by <pos>"):
        model.splice(torch.tensor(ids), feats.tokens, mask_tok[:1], pos_tok[:1])


def test_padded_batch_equals_single_sequences(parts):
    """Left and right padding with the mask and position ids from pad_batch change nothing."""
    model, tok, feats, mask_tok, pos_tok = parts
    seqs = []
    for r, q in enumerate([conv.CATEGORY_PROMPT, conv.DETAILED_PROMPT]):
        ids = tokenizer_image_token(conv.chat_prompt(q), tok)
        seqs.append(model.splice(torch.tensor(ids), feats.tokens, mask_tok[r : r + 1], pos_tok[r : r + 1]))
    assert seqs[0].shape[0] != seqs[1].shape[0]
    with torch.no_grad():
        alone = [model(s[None])[0][0] for s in seqs]
        for left in (False, True):
            embeds, attn, pos = model.pad_batch(seqs, left=left)
            logits, _ = model(embeds, attention_mask=attn, position_ids=pos)
            for i, s in enumerate(seqs):
                n = s.shape[0]
                rows = logits[i, -n:] if left else logits[i, :n]
                torch.testing.assert_close(rows, alone[i], rtol=1e-4, atol=1e-4)
