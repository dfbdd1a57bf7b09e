"""Tokenizers: the checkpoint's LLaMA tokenizer, or a tiny BPE trained here for tests and the demo
model (nothing downloads), plus LLaVA's `<image>` handling (spec §1.3)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError

IMAGE_TOKEN_INDEX = -200
ADDED_TOKENS = ["<mask>", "<pos>"]


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt we build and common label words."""
    from . import conversation as conv

    words = (
        "cat dog person car bus tree sky road building grass water bird horse boat chair table bottle cup "
        "red green blue yellow black white orange purple gray brown pink small large medium big tiny "
        "circle square triangle rectangle ellipse star shape object region left right top bottom center "
        "the a an of in on at is are with and this that there it its color size position category "
        # COCO's category names: label sets are mostly such words, and a real LLaMA vocabulary holds them
        # as one or two tokens each.
        "bicycle motorcycle airplane train truck traffic light fire hydrant stop sign parking meter bench "
        "sheep cow elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard "
        "sports ball kite baseball bat glove skateboard surfboard tennis racket wine glass fork knife spoon "
        "bowl banana apple sandwich broccoli carrot hot pizza donut cake couch potted plant bed toilet tv "
        "laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase "
        "scissors teddy hair drier toothbrush road building grass"
    )
    texts = [conv.SYSTEM_OSPREY_V1, conv.SYSTEM_VICUNA_V1, conv.CATEGORY_PROMPT, conv.SHORT_PROMPT,
             conv.DETAILED_PROMPT, conv.OPEN_QUESTION_PREFIX, conv.multi_region_intro(3), words,
             "USER: ASSISTANT: yes no Yes No"]
    texts += conv.DETAILED_TEMPLATES + conv.SHORT_TEMPLATES + conv.POSNEG_TEMPLATES
    return [t.replace("<mask><pos>", " ").replace("<image>", " ") for t in texts]


@lru_cache(maxsize=4)
def build_tiny_tokenizer(vocab_size: int = 1024):
    """A LLaMA-like tokenizer (metaspace BPE; <unk>=0 <s>=1 </s>=2; `<mask>`, `<pos>` added after the
    vocabulary, so they are never embedded), trained deterministically in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
        show_progress=False, min_frequency=1,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        # Pad with unused filler merges-free tokens so the vocabulary is exactly `vocab_size`.
        tok.add_tokens([f"<unused{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="right", model_max_length=2048)
    fast.add_tokens(ADDED_TOKENS, special_tokens=True)
    return fast


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (use_fast, pad = unk as the official code sets), with `<mask>`/`<pos>`."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True, padding_side="right", model_max_length=2048)
    except Exception as e:  # tokenizer files missing or unreadable
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}") from e
    tok.pad_token = tok.unk_token
    tok.add_tokens(ADDED_TOKENS, special_tokens=True)
    return tok


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """Split on the literal `<image>`, tokenize chunks separately, keep one BOS, join with -200."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            if chunk and chunk[0] == bos:
                chunk = chunk[1:]
        ids.extend(chunk)
    return ids


def continuation_ids(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> list[int]:
    """Ids of `answer` (then `</s>`) exactly as they follow `prompt` when the whole text is tokenized."""
    full = tokenizer_image_token(prompt + " " + answer, tokenizer)
    if full[: len(prompt_ids)] == prompt_ids:
        cont = full[len(prompt_ids) :]
    else:  # tokenization not prefix-stable at the boundary: tokenize the answer on its own
        cont = tokenizer(" " + answer, add_special_tokens=False).input_ids
    return cont + [tokenizer.eos_token_id]
