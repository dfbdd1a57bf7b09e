"""RegionEngine: category, attributes and descriptions for many regions of one image, fast by structure.

Per image: preprocess + vision tower + projector once (LRU cache keyed by content hash); per (image,
prompt): the system + image prefix (~1,070 tokens on the 7B) prefilled once and its KV cache reused.
Per call: all regions' mask embeddings in one extractor pass; every region × every candidate label
scored in one packed forward (see packing.py); greedy generation decodes all regions together.
`osprey_core.reference` holds the plain one-region-at-a-time path the tests compare against.

Scores (docs/scores-and-versions.md): softmax over the candidates' sequence log-likelihoods (sum over the
answer's tokens and its `</s>`, or their mean with `score_length_normalized`) divided by
`score_temperature`; "calibrated" only when that temperature was fitted on held-out data.

Not thread-safe: the caches (images, prefix KV, prompts, layouts) and `stats` are plain dicts mutated
by every call, and one model forward at a time is what the memory budget assumes. Call one engine from
one thread, or hold a lock around every call (the backend worker runs one job at a time).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import conversation as conv
from .errors import PromptError, RegionError
from .image_processing import image_hash, preprocess, to_pil
from .modeling.modeling_osprey import ImageFeatures, OspreyForCausalLM
from .packing import PackedSequence, PrefixState, run_prefix
from .tokenizer import continuation_ids, decode_answer, tokenizer_image_token


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]
    logprobs: dict[str, float] = field(default_factory=dict)  # summed token log-likelihoods
    token_counts: dict[str, int] = field(default_factory=dict)  # answer tokens + </s>, per candidate


@dataclass
class _ScoreLayout:
    parent: dict[int, int | None]
    branches: list[int]
    positions: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    slots: torch.Tensor


@dataclass
class _Encoded:
    key: str  # content hash
    features: ImageFeatures
    size: tuple[int, int]  # (width, height)


def region_masks(regions, size: tuple[int, int]) -> np.ndarray:
    """Regions (Region objects or HxW arrays) -> (Q,H,W) float32 0/1, checked against the image size.

    Converted to float here, in one numpy pass, because the extractor needs float masks and numpy's
    conversion is several times faster than torch's bool->float on CPU.
    """
    w, h = size
    out = np.empty((len(regions), h, w), dtype=np.float32)
    for i, r in enumerate(regions):
        m = np.asarray(getattr(r, "mask", r))
        if m.ndim != 2:
            raise RegionError(f"region {i}: mask must be 2-D, got shape {m.shape}")
        if m.shape != (h, w):
            raise RegionError(f"region {i}: mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h}")
        if m.dtype != bool:
            m = m != 0
        if not m.any():
            raise RegionError(f"region {i}: mask is empty")
        out[i] = m
    return out


class RegionEngine:
    def __init__(
        self,
        model: OspreyForCausalLM,
        tokenizer,
        model_version: str,
        image_cache_size: int = 8,
        prefix_cache_size: int | None = None,
        max_new_tokens: int = 64,
        max_packed_tokens: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_version = model_version
        self.image_cache_size = image_cache_size
        # Prefix KV caches are the big entries (~0.56 GB each on the 7B in bf16): one bound for all images.
        if prefix_cache_size is None:
            prefix_cache_size = 4 if model.device.type == "cuda" else 16
        self.prefix_cache_size = prefix_cache_size
        self._prefixes: OrderedDict[tuple[str, tuple[int, ...]], PrefixState] = OrderedDict()
        self.max_new_tokens = max_new_tokens
        # Packed tokens per forward: attention is quadratic in it, so CPUs want small packs and GPUs
        # large ones (fewer launches); results do not depend on it (tested).
        if max_packed_tokens is None:
            max_packed_tokens = 4096 if model.device.type == "cuda" else 320
        self.max_packed_tokens = max_packed_tokens
        self._prompts: dict[str, tuple[str, list[int], list[int], list[int]]] = {}
        self._continuations: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        self._layouts: OrderedDict[tuple, _ScoreLayout] = OrderedDict()
        self._images: OrderedDict[str, _Encoded] = OrderedDict()
        self.stats = {"image_encodes": 0, "prefix_fills": 0, "forward_calls": 0}

    @property
    def device(self) -> torch.device:
        return self.model.device

    # --- caches ----------------------------------------------------------------------------------------

    def clear_caches(self) -> None:
        """Forget encoded images and prefix KV caches (e.g. after new weights were loaded in place)."""
        self._images.clear()
        self._prefixes.clear()

    @torch.inference_mode()
    def encode(self, image) -> _Encoded:
        key = image_hash(image)
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        pil = to_pil(image)
        pixels = preprocess(pil, self.model.cfg.vision).to(
            self.device, self.model.model.vision_tower.trunk.stem[0].weight.dtype
        )
        enc = _Encoded(key=key, features=self.model.encode_images(pixels[None])[0], size=pil.size)
        self.stats["image_encodes"] += 1
        self._images[key] = enc
        while len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return enc

    def _prefix(self, enc: _Encoded, prefix_ids: list[int]) -> PrefixState:
        key = (enc.key, tuple(prefix_ids))
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        embeds = self.model.splice(torch.tensor(prefix_ids), enc.features.tokens, None, None)
        state = run_prefix(self.model, embeds)
        self.stats["prefix_fills"] += 1
        self._prefixes[key] = state
        while len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)
        return state

    def _prompt(self, question: str) -> tuple[str, list[int], list[int], list[int]]:
        """Full prompt -> (text, ids, prefix ids before the first `<mask>`, suffix ids from it)."""
        if question not in self._prompts:
            if len(self._prompts) > 256:
                self._prompts.clear()
            self._prompts[question] = self._split_prompt(question)
        return self._prompts[question]

    def _option_ids(self, text: str, ids: list[int], option: str) -> list[int]:
        key = (text, option)
        if key not in self._continuations:
            self._continuations[key] = continuation_ids(self.tokenizer, ids, text, option)
            while len(self._continuations) > 4096:
                self._continuations.popitem(last=False)
        return self._continuations[key]

    def _split_prompt(self, question: str) -> tuple[str, list[int], list[int], list[int]]:
        text = conv.chat_prompt(question)
        ids = tokenizer_image_token(text, self.tokenizer)
        mask_id = self.model.cfg.mask_token_id
        if ids.count(mask_id) != 1:
            raise PromptError(f"a region prompt needs exactly one <mask><pos>, found {ids.count(mask_id)}")
        cut = ids.index(mask_id)
        return text, ids, ids[:cut], ids[cut:]

    def _region_tokens(self, enc: _Encoded, regions) -> tuple[torch.Tensor, torch.Tensor]:
        masks = torch.from_numpy(region_masks(regions, enc.size)).to(self.device)
        return self.model.region_embeddings(enc.features, masks)

    def _region_block(self, suffix_ids: list[int], mask_tok: torch.Tensor, pos_tok: torch.Tensor,
                      group: range) -> torch.Tensor:
        """(len(group)*S, hidden): each region's prompt suffix `<mask><pos> ...` with its two embeddings
        in the first two rows — what `splice` gives, with the shared text embedded once."""
        if suffix_ids[1] != self.model.cfg.pos_token_id:
            raise PromptError("every <mask> must be followed by <pos>")
        rest = self.model.embed_ids(torch.tensor(suffix_ids[2:], device=self.device))
        dtype = rest.dtype
        idx = torch.tensor(list(group), device=self.device)
        regions = torch.stack([mask_tok[idx].to(dtype), pos_tok[idx].to(dtype)], dim=1)  # (g, 2, H)
        block = torch.cat([regions, rest[None].expand(len(group), -1, -1)], dim=1)
        return block.reshape(-1, block.shape[-1])

    def _score_layout(self, prefix: PrefixState, s: int, options_ids: list[list[int]], g: int) -> _ScoreLayout:
        """Branch tree, positions, attention mask and gather indices for scoring `g` regions × all options;
        the same for every call with this prompt, label set and group size, so built once."""
        key = (prefix.length, s, tuple(map(tuple, options_ids)), g)
        if key in self._layouts:
            self._layouts.move_to_end(key)
            return self._layouts[key]
        p = prefix.length
        parent: dict[int, int | None] = {}
        branches: list[int] = []
        positions: list[int] = []
        for r in range(g):  # the region suffixes first: every label branch sees its region's suffix
            parent[r] = None
            branches += [r] * s
            positions += range(p, p + s)
        rows, targets, slots = [], [], []
        row = len(branches)
        for r in range(g):
            for j, o_ids in enumerate(options_ids):
                b = (r + 1) * 100_000 + j
                parent[b] = r
                n_in = len(o_ids) - 1
                branches += [b] * n_in
                positions += range(p + s, p + s + n_in)
                # log p(first token | suffix) from the suffix's last row, then each next token from its row
                rows += [(r + 1) * s - 1] + list(range(row, row + n_in))
                targets += o_ids
                slots += [r * len(options_ids) + j] * len(o_ids)
                row += n_in
        probe = PackedSequence(prefix=prefix, cache=None, parent=parent)
        layout = _ScoreLayout(
            parent=parent, branches=branches, positions=torch.tensor(positions, device=self.device),
            mask=probe.attention_mask(branches, self.model.model.embed_tokens.weight.dtype, self.device),
            rows=torch.tensor(rows), targets=torch.tensor(targets), slots=torch.tensor(slots),
        )
        self._layouts[key] = layout
        while len(self._layouts) > 8:
            self._layouts.popitem(last=False)
        return layout

    def _groups(self, n_regions: int, tokens_per_region: int) -> list[range]:
        per = max(1, self.max_packed_tokens // max(1, tokens_per_region))
        return [range(i, min(i + per, n_regions)) for i in range(0, n_regions, per)]

    # --- scoring ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def option_logliks(self, image, regions, question: str, options: list[str]) -> np.ndarray:
        """(Q, L) log-likelihood of each option (then `</s>`) as the answer to `question` about each region."""
        if not options:
            raise ValueError("at least one candidate label is needed")
        if len(regions) == 0:
            return np.zeros((0, len(options)))
        enc = self.encode(image)
        text, ids, prefix_ids, suffix_ids = self._prompt(question)
        options_ids = [self._option_ids(text, ids, o) for o in options]
        mask_tok, pos_tok = self._region_tokens(enc, regions)
        prefix = self._prefix(enc, prefix_ids)
        s = len(suffix_ids)
        out = np.zeros((mask_tok.shape[0], len(options)), dtype=np.float64)
        per_region = s + sum(len(o) - 1 for o in options_ids)
        inputs = [o[:-1] for o in options_ids]  # the final </s> is only predicted
        flat = [t for o in inputs for t in o]
        options_block = self.model.embed_ids(torch.tensor(flat, device=self.device, dtype=torch.long))
        for group in self._groups(mask_tok.shape[0], per_region):
            layout = self._score_layout(prefix, s, options_ids, len(group))
            packed = PackedSequence.start(self.model, prefix)
            packed.parent = dict(layout.parent)
            embeds = torch.cat([self._region_block(suffix_ids, mask_tok, pos_tok, group)]
                               + [options_block] * len(group))
            logits = packed.extend(self.model, embeds, layout.branches, layout.positions, mask=layout.mask)
            self.stats["forward_calls"] += 1
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp[layout.rows, layout.targets].double().cpu()
            totals = torch.zeros(len(group) * len(options), dtype=torch.float64).index_add_(0, layout.slots, picked)
            out[group.start : group.stop] = totals.reshape(len(group), len(options)).numpy()
        return out

    def option_token_counts(self, question: str, options: list[str]) -> list[int]:
        """Tokens each option is scored on (its answer tokens and `</s>`): the length normalisation."""
        text, ids, _, _ = self._prompt(question)
        return [len(self._option_ids(text, ids, o)) for o in options]

    def score_info(self) -> dict:
        """What a score means for this model, for /setup and the UI (see docs/scores-and-versions.md)."""
        cfg = self.model.cfg
        return {
            "method": "softmax over candidate "
            + ("mean per-token log-likelihoods" if cfg.score_length_normalized else "sequence log-likelihoods"),
            "temperature": float(cfg.score_temperature),
            "calibrated": bool(cfg.score_temperature_fitted),
            "length_normalized": bool(cfg.score_length_normalized),
            "calibration": cfg.score_calibration,
        }

    def _classifications(self, logliks: np.ndarray, options: list[str], counts: list[int]) -> list[Classification]:
        cfg = self.model.cfg
        probs = candidate_scores(logliks, counts, cfg.score_temperature, cfg.score_length_normalized)
        results = []
        for row, p in zip(logliks, probs, strict=True):
            best = int(np.argmax(p))
            results.append(
                Classification(
                    label=options[best],
                    score=float(p[best]),
                    scores={o: float(v) for o, v in zip(options, p, strict=True)},
                    logprobs={o: float(v) for o, v in zip(options, row, strict=True)},
                    token_counts=dict(zip(options, counts, strict=True)),
                )
            )
        return results

    def merge_classifications(self, parts: list[list[Classification]]) -> list[Classification]:
        """One classification per region over the union of label chunks scored separately (each part
        covers all regions for its own labels, e.g. from `classify` on a slice of a large label set):
        the same distribution as one call on every label, with memory bounded by the chunk size."""
        if not parts:
            return []
        options = [o for part in parts for o in part[0].logprobs] if parts[0] else []
        logliks = np.array([[v for part in parts for v in part[i].logprobs.values()] for i in range(len(parts[0]))])
        counts = [n for part in parts for n in part[0].token_counts.values()] if parts[0] else []
        return self._classifications(logliks.reshape(len(parts[0]), len(options)), options, counts)

    def classify(self, image, regions, labels: list[str]) -> list[Classification]:
        """Label-set constrained classification with the official category prompt."""
        labels = _unique(labels)
        question = conv.category_question()
        return self._classifications(
            self.option_logliks(image, regions, question, labels), labels, self.option_token_counts(question, labels)
        )

    def attributes(self, image, regions, attributes: dict[str, list[str]]) -> list[dict[str, Classification]]:
        """One constrained question per attribute ("What is the <attr> of <region>?")."""
        out: list[dict[str, Classification]] = [{} for _ in regions]
        for name, values in attributes.items():
            values = _unique(values)
            question = conv.attribute_question(name)
            res = self._classifications(
                self.option_logliks(image, regions, question, values), values,
                self.option_token_counts(question, values),
            )
            for i, c in enumerate(res):
                out[i][name] = c
        return out

    # --- generation -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, image, regions, question: str, max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to `question` (one `<mask><pos>`) for every region, decoded together."""
        cap = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if len(regions) == 0:
            return []
        enc = self.encode(image)
        _, _, prefix_ids, suffix_ids = self._prompt(question)
        mask_tok, pos_tok = self._region_tokens(enc, regions)
        prefix = self._prefix(enc, prefix_ids)
        s = len(suffix_ids)
        eos = self.tokenizer.eos_token_id
        answers: list[list[int]] = [[] for _ in range(mask_tok.shape[0])]
        for group in self._groups(mask_tok.shape[0], s + cap):
            packed = PackedSequence.start(self.model, prefix)
            branches, positions = [], []
            for r in group:
                packed.add_branch(r)
                branches += [r] * s
                positions += list(range(prefix.length, prefix.length + s))
            embeds = self._region_block(suffix_ids, mask_tok, pos_tok, group)
            logits = packed.extend(self.model, embeds, branches, positions)
            self.stats["forward_calls"] += 1
            last = {r: logits[(i + 1) * s - 1] for i, r in enumerate(group)}
            active = list(group)
            for step in range(cap):
                nxt = {r: int(last[r].argmax()) for r in active}
                for r in active:
                    if nxt[r] != eos:
                        answers[r].append(nxt[r])
                active = [r for r in active if nxt[r] != eos]
                if not active or step == cap - 1:
                    break
                ids = torch.tensor([nxt[r] for r in active], device=self.device)
                pos = [prefix.length + s + step] * len(active)
                logits = packed.extend(self.model, self.model.embed_ids(ids), active, pos)
                self.stats["forward_calls"] += 1
                last = {r: logits[i] for i, r in enumerate(active)}
        return [decode_answer(self.tokenizer, a) for a in answers]

    def describe(self, image, regions, detail: str = "short", max_new_tokens: int | None = None) -> list[str]:
        answers = self.generate(image, regions, conv.description_question(detail), max_new_tokens)
        return [conv.postprocess_answer(a) for a in answers]

    def ask(self, image, regions, question: str, max_new_tokens: int | None = None) -> list[str]:
        return self.generate(image, regions, conv.open_question(question), max_new_tokens)


def candidate_scores(logliks: np.ndarray, counts: list[int], temperature: float,
                     length_normalized: bool = False) -> np.ndarray:
    """(Q, L) log-likelihoods -> (Q, L) scores: softmax(loglik / T), or of the per-token mean loglik."""
    if not temperature > 0:
        raise ValueError(f"the score temperature must be positive, got {temperature!r}")
    z = np.asarray(logliks, dtype=np.float64).reshape(len(logliks), len(counts))
    if length_normalized:
        z = z / np.asarray(counts, dtype=np.float64)[None, :]
    z = z / temperature
    if not z.size:
        return z
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _unique(values: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"candidate labels must be non-empty strings, got {v!r}")
        seen.setdefault(v, None)
    return list(seen)
