"""Prompt strings and `<image>` tokenization as the official code builds them."""

from __future__ import annotations

from osprey_core import conversation as conv
from osprey_core.tokenizer import (
    IMAGE_TOKEN_INDEX,
    build_tiny_tokenizer,
    continuation_ids,
    tokenizer_image_token,
)


def test_lvis_prompt_verbatim():
    assert conv.chat_prompt(conv.CATEGORY_PROMPT) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nThis provides an overview of the "
        "picture.\nWhat is the category of <mask><pos>? Using only one word or phrase. ASSISTANT:"
    )


def test_multi_turn_rendering():
    text = conv.chat_prompt("q2", answers=[("q1", "a1")])
    assert text.endswith("USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:")


def test_image_token_single_bos_and_placeholder():
    tok = build_tiny_tokenizer()
    ids = tokenizer_image_token(conv.chat_prompt(conv.CATEGORY_PROMPT), tok)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(tok.convert_tokens_to_ids("<mask>"))
    assert ids[k + 1] == tok.convert_tokens_to_ids("<pos>")


def test_added_tokens_follow_vocabulary():
    tok = build_tiny_tokenizer(1024)
    assert tok.convert_tokens_to_ids(["<mask>", "<pos>"]) == [1024, 1025]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)


def test_continuation_ends_with_eos_and_is_prefix_stable():
    tok = build_tiny_tokenizer()
    text = conv.chat_prompt(conv.CATEGORY_PROMPT)
    ids = tokenizer_image_token(text, tok)
    cont = continuation_ids(tok, ids, text, "red car")
    assert cont[-1] == tok.eos_token_id
    assert tokenizer_image_token(text + " red car", tok) == ids + cont[:-1]
    assert tok.decode(cont, skip_special_tokens=True).strip() == "red car"


def test_postprocess_keeps_segment_after_first_colon():
    assert conv.postprocess_answer(" region1: a red car</s>") == "a red car"
    assert conv.postprocess_answer("a: b: c") == "b"


def test_paper_template_tables():
    assert len(conv.DETAILED_TEMPLATES) == 30 and len(conv.SHORT_TEMPLATES) == 30 and len(conv.POSNEG_TEMPLATES) == 9
    assert all("<category>" in t and "<region>" in t for t in conv.POSNEG_TEMPLATES)


def test_open_question_forms():
    assert conv.open_question("Is <region> a car?").endswith("Is <mask><pos> a car?")
    assert "region1<mask><pos>. How many wheels?" in conv.open_question("How many wheels?")
