"""Tokenizers: the checkpoint's LLaMA tokenizer with exactly the ids Osprey was trained on, or a tiny
BPE trained here for tests and the demo model (nothing downloads), plus LLaVA's `<image>` handling
(spec §1.3).

Why not `AutoTokenizer`: Osprey was trained and evaluated with transformers 4.31 + tokenizers 0.13
(`use_fast=True`), i.e. the Rust tokenizer that the checkpoint's `tokenizer.json` describes. The ids
recorded from that stack (tests/fixtures/tokenizer, made by make_fixture.py) show that 4.31's fast
tokenizer ignored `legacy`, and that a `tokenizer.model`-only directory gave the same ids through
4.31's slow->fast conversion. transformers 5.x rebuilds the tokenizer from the flags instead
(`legacy: false` drops the `▁` after every added token: `<pos>`, `▁?` becomes `<pos>`, `?`). So we
read `tokenizer.json` with the `tokenizers` library itself (or convert `tokenizer.model` as 4.31 did)
and only wrap it in `PreTrainedTokenizerFast` for the familiar API, checking the wrapper changed nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import CheckpointError

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
ADDED_TOKENS = ["<mask>", "<pos>"]
# Text that crosses every boundary where tokenizer stacks disagree (added tokens, </s>, newlines).
_PROBE = "USER: <s>a\nb of <mask><pos>? Using  two</s>USER: c <unk>d ASSISTANT: é 東"


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt we build and common label words."""
    from . import conversation as conv

    words = (
        "cat dog person car bus tree sky road building grass water bird horse boat chair table bottle cup "
        "red green blue yellow black white orange purple gray brown pink small large medium big tiny "
        "circle square triangle rectangle ellipse star hexagon heart cross shape object region left right top "
        "bottom center "
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
    vocabulary, so they are never embedded), trained deterministically in well under a second.

    Filler tokens that pad the vocabulary to `vocab_size` are special, so a model that emits one never
    shows `<unused58>` in a description."""
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
        # Pad with unused filler tokens so the vocabulary is exactly `vocab_size`.
        tok.add_special_tokens([f"<unused{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="right", model_max_length=2048)
    fast.add_tokens(ADDED_TOKENS, special_tokens=True)
    return fast


# --- a checkpoint's tokenizer ------------------------------------------------------------------------


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer with the ids of the original stack (pad = unk as the official code
    sets, `<mask>`/`<pos>` as special tokens). `tokenizer.json` when present, else `tokenizer.model`."""
    from tokenizers import Tokenizer

    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    json_file, model_file = path / "tokenizer.json", path / "tokenizer.model"
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    if json_file.is_file() and json_file.stat().st_size > 0:  # an empty one is a known copy error (#39)
        try:
            backend = Tokenizer.from_file(str(json_file))
        except Exception as e:  # not a tokenizers JSON file
            raise CheckpointError(f"cannot read {json_file}: {e}") from e
        if str(config.get("tokenizer_class", "")).removesuffix("Fast") == "LlamaTokenizer":
            # 4.31's LlamaTokenizerFast rebuilt the BOS/EOS template from tokenizer_config.json, whatever
            # tokenizer.json held (recorded: saved_dir_add_eos_token in the fixture).
            backend.post_processor = _llama_template(backend, add_bos, add_eos)
        backend_json = backend.to_str()
    elif model_file.is_file():
        backend_json = convert_llama_sentencepiece(model_file, add_bos=add_bos, add_eos=add_eos).to_str()
        backend_json = _with_added_tokens_file(backend_json, path)
    else:
        raise CheckpointError(f"{path} has no tokenizer: expected tokenizer.json or tokenizer.model")
    return _wrap(backend_json, config, path)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return data


def _token_text(value: Any, default: str) -> str:
    """`tokenizer_config.json` stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return value if isinstance(value, str) else default


def _special(backend, name: str, config: dict[str, Any], default: str) -> str:
    token = _token_text(config.get(name), default)
    if backend.token_to_id(token) is None:
        raise CheckpointError(f"the tokenizer has no {name} {token!r}")
    return token


def _wrap(backend_json: str, config: dict[str, Any], path: Path):
    """`PreTrainedTokenizerFast` around the exact backend, `<mask>`/`<pos>` added as Osprey did
    (special, not normalized: what 4.31 recorded in every layout); refuses if the wrapper re-tokenizes."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(backend_json)
    missing = [t for t in ADDED_TOKENS if backend.token_to_id(t) is None]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    reference = Tokenizer.from_str(backend.to_str())  # untouched copy for the check below
    unk = _special(backend, "unk_token", config, "<unk>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=_special(backend, "bos_token", config, "<s>"),
        eos_token=_special(backend, "eos_token", config, "</s>"), unk_token=unk, pad_token=unk,
        padding_side="right", model_max_length=2048,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),  # 4.31 Llama default
    )
    tok.add_tokens(ADDED_TOKENS, special_tokens=True)  # a no-op now, as the official scripts re-call it
    if tok(_PROBE).input_ids != reference.encode(_PROBE).ids:
        raise CheckpointError(f"transformers changed how the tokenizer of {path} splits text; ids would "
                              "differ from the ones Osprey was trained with")
    return tok


def _with_added_tokens_file(backend_json: str, path: Path) -> str:
    """4.31 appended `added_tokens.json` entries after the vocabulary; their ids must be consecutive."""
    from tokenizers import AddedToken, Tokenizer

    added = _read_json(path / "added_tokens.json")
    backend = Tokenizer.from_str(backend_json)
    for token, index in sorted(added.items(), key=lambda kv: kv[1]):
        have = backend.token_to_id(token)
        if have is not None:
            if have != index:
                raise CheckpointError(f"added_tokens.json gives {token!r} id {index}, the vocabulary has {have}")
            continue
        if index != backend.get_vocab_size(with_added_tokens=True):
            raise CheckpointError(f"added_tokens.json gives {token!r} id {index}, but the next free id is "
                                  f"{backend.get_vocab_size(with_added_tokens=True)}")
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return backend.to_str()


def convert_llama_sentencepiece(model_file: str | Path, add_bos: bool = True, add_eos: bool = False):
    """A LLaMA `tokenizer.model` -> the `tokenizers.Tokenizer` transformers 4.31 built from it.

    4.31 (LlamaConverter): the first three pieces forced to <unk>/<s>/</s>, byte-fallback BPE whose
    merges are every split of a piece into two pieces, ordered by the merged piece's score (ties by the
    halves' ids), normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer, and a BOS template.
    Checked against sentencepiece on a probe text (a Unigram model would fail it).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:  # not a sentencepiece model
        raise CheckpointError(f"cannot read {model_file} as a SentencePiece model: {e}") from e
    size = sp.get_piece_size()
    if size < 3:
        raise CheckpointError(f"{model_file} has only {size} pieces")
    pieces = ["<unk>", "<s>", "</s>"] + [sp.id_to_piece(i) for i in range(3, size)]
    scores = [0.0, 0.0, 0.0] + [sp.get_score(i) for i in range(3, size)]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges: list[tuple[float, int, tuple[str, str]]] = []
    for piece, score in zip(pieces, scores, strict=True):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((score, len(merges), lr) for lr in local)
    merges.sort(key=lambda m: (-m[0], m[1]))  # stable: by score, descending
    tok = Tokenizer(models.BPE(vocab, [m[2] for m in merges], unk_token=pieces[0], fuse_unk=True,
                               byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pieces[:3]])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = _llama_template(tok, add_bos, add_eos)
    text = "Hello world, a red car.\nIt has 4 wheels: ok? é 東京"
    if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
        raise CheckpointError(f"{model_file} is not a LLaMA-style BPE SentencePiece model (its conversion "
                              "does not reproduce SentencePiece's own ids)")
    return tok


def _llama_template(backend, add_bos: bool, add_eos: bool):
    """LlamaTokenizerFast's template: `<s>:0 $A:0 [</s>:0]`, pairs `... <s>:1 $B:1 [</s>:1]`."""
    from tokenizers import processors

    single = (["<s>:0"] if add_bos else []) + ["$A:0"] + (["</s>:0"] if add_eos else [])
    pair = single + [t[:-1] + "1" if not t.startswith("$") else "$B:1" for t in single]
    specials = [(t, backend.token_to_id(t)) for t in ("<s>", "</s>") if f"{t}:0" in single]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# --- prompts -> ids ----------------------------------------------------------------------------------


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


def training_ids_and_labels(conversation: str, tokenizer) -> tuple[list[int], list[int]]:
    """A whole training conversation (conversation.training_conversation) -> (ids, labels) as Osprey's
    `preprocess_v1` masks them: BOS and every instruction through "ASSISTANT: " (its length - 2) are
    IGNORE_INDEX; answers and their `</s>` are supervised. A round-length mismatch ignores the sample,
    as the original did ("tokenization mismatch")."""
    ids = tokenizer_image_token(conversation, tokenizer)
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX]
    for rnd in conversation.split("</s>"):
        if not rnd:
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(rnd, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0] + sep, tokenizer)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    if cur != len(ids):
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


def decode_answer(tokenizer, ids: list[int]) -> str:
    """Generated ids -> text without any special, added or filler token (`<mask>`, `<unused58>`...)."""
    hidden = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    hidden.update(tokenizer.all_special_ids)
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=True).strip()
