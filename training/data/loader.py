"""LLaVA-JSON data: several domains with sampling weights, pad-to-square images, Vicuna-v1 or chat
template prompts, answer-only labels and truncation (the demo's generated data set: ``demo_data``)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from ..config import DataConfig, DatasetSpec
from .demo_data import make_builtin

log = logging.getLogger(__name__)

IGNORE = -100
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file and the record id."""


@dataclass
class Record:
    id: str
    domain: int
    source: str  # the JSON file
    image: str | None  # resolved path
    turns: list[tuple[str, str]]  # (question, answer) pairs


def expand2square(img, background):
    """LLaVA-1.5's pad-to-square with the processor's mean colour."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def parse_records(spec: DatasetSpec, domain: int, on_bad: str) -> tuple[list[Record], int]:
    """Read one LLaVA JSON file. Returns (records, number skipped)."""
    path = Path(spec.path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadRecord(f"{path}: cannot read the data file: {e}") from e
    if not isinstance(raw, list):
        raise BadRecord(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    root = Path(spec.image_root) if spec.image_root else path.parent
    out, skipped = [], 0
    for i, r in enumerate(raw):
        rid = r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}"
        try:
            out.append(_parse_one(r, rid, path, root, domain, check_image=on_bad == "skip"))
        except BadRecord as e:
            if on_bad == "skip":
                skipped += 1
                log.warning("skipping: %s", e)
            else:
                raise
    return out, skipped


def _parse_one(r, rid, path: Path, root: Path, domain: int, check_image: bool = False) -> Record:
    where = f"{path}: record {rid}"
    if not isinstance(r, dict):
        raise BadRecord(f"{where}: a record must be an object")
    conv = r.get("conversations")
    if not isinstance(conv, list) or not conv or len(conv) % 2:
        raise BadRecord(f"{where}: 'conversations' must be a non-empty list of human/gpt pairs")
    turns = []
    for j in range(0, len(conv), 2):
        q, a = conv[j], conv[j + 1]
        if not (isinstance(q, dict) and isinstance(a, dict)) or q.get("from") != "human" or a.get("from") != "gpt":
            raise BadRecord(f"{where}: turn {j // 2} must be from 'human' then 'gpt'")
        if not isinstance(q.get("value"), str) or not isinstance(a.get("value"), str):
            raise BadRecord(f"{where}: turn {j // 2} has a non-string 'value'")
        turns.append((q["value"], a["value"]))
    n_tags = sum(q.count("<image>") for q, _ in turns) + sum(a.count("<image>") for _, a in turns)
    image = r.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise BadRecord(f"{where}: 'image' must be a path string")
        image = str(root / image)
        if not os.path.isfile(image):
            raise BadRecord(f"{where}: image file {image} is missing")
        if check_image:  # skip mode: find unreadable images up front, so every skip is counted here
            from PIL import Image

            try:
                with Image.open(image) as im:
                    im.verify()
            except Exception as e:  # PIL raises many kinds for a bad file
                raise BadRecord(f"{where}: cannot read image {image}: {e}") from e
        if n_tags == 0:  # LLaVA puts the image before the first question when the tag is absent
            turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
        elif n_tags > 1 or "<image>" not in turns[0][0]:
            raise BadRecord(f"{where}: expected one <image> tag, in the first question")
    elif n_tags:
        raise BadRecord(f"{where}: has an <image> tag but no 'image'")
    return Record(str(rid), domain, str(path), image, turns)


class LlavaData(Dataset):
    """All records of several LLaVA-JSON files; each file is a domain.

    ``__getitem__`` returns ``input_ids`` / ``labels`` (long, [T]), ``pixel_values`` ([3, H, W] or
    None for a text-only record) and ``domain`` (int).
    """

    def __init__(self, cfg: DataConfig, tokenizer, image_processor, num_image_tokens: int, specs=None):
        self.cfg = cfg
        self.tok = tokenizer
        self.proc = image_processor
        self.n_img = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        specs = specs if specs is not None else cfg.datasets
        if not specs:
            raise ValueError("no data: set data.datasets or data.builtin")
        if cfg.on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {cfg.on_bad_record!r}")
        self.domains = [s.domain or Path(s.path).stem for s in specs]
        self.weights = [float(s.weight) for s in specs]
        self.records: list[Record] = []
        self.skipped = 0
        for d, s in enumerate(specs):
            recs, sk = parse_records(s, d, cfg.on_bad_record)
            if not recs:
                raise BadRecord(f"{s.path}: no usable records")
            self.records += recs
            self.skipped += sk
        self.by_domain = [[i for i, r in enumerate(self.records) if r.domain == d] for d in range(len(specs))]
        mean = getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])
        self.background = tuple(int(x * 255) for x in mean)
        bos = tokenizer.bos_token_id
        probe = tokenizer("a").input_ids
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    def __len__(self):
        return len(self.records)

    def load_image(self, rec: Record) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(rec.image) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises many kinds for a bad file
            raise BadRecord(f"{rec.source}: record {rec.id}: cannot read image {rec.image}: {e}") from e
        img = expand2square(img, self.background)
        return self.proc(images=img, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i):
        rec = self.records[i]
        try:
            pixel_values = self.load_image(rec) if rec.image else None
        except BadRecord as e:
            if self.cfg.on_bad_record != "skip":
                raise
            self.skipped += 1
            log.warning("skipping: %s", e)
            others = [j for j in self.by_domain[rec.domain] if j != i]
            if not others:
                raise
            return self[others[i % len(others)]]
        ids, labels = self.encode(rec)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "domain": rec.domain}

    # -- prompts -----------------------------------------------------------------------------
    def segments(self, rec: Record) -> list[tuple[str, bool]]:
        """The prompt as (text, is_answer) pieces; answers (with the end-of-turn token) are labelled."""
        eos = self.tok.eos_token or ""
        if self.cfg.template == "vicuna_v1":
            segs = []
            for j, (q, a) in enumerate(rec.turns):
                head = (VICUNA_SYSTEM + " ") if j == 0 else ""
                segs.append((f"{head}USER: {q} ASSISTANT:", False))
                segs.append((f" {a}{eos}", True))
            return segs
        if self.cfg.template == "chat":
            msgs, segs, done = [], [], ""
            for q, a in rec.turns:
                msgs.append({"role": "user", "content": q})
                prefix = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
                msgs.append({"role": "assistant", "content": a})
                full = self.tok.apply_chat_template(msgs, tokenize=False)
                if not (prefix.startswith(done) and full.startswith(prefix)):
                    raise BadRecord(f"{rec.source}: record {rec.id}: the chat template does not render turns incrementally")
                segs.append((prefix[len(done):], False))
                segs.append((full[len(prefix):], True))
                done = full
            return segs
        raise ValueError(f"data.template must be 'vicuna_v1' or 'chat', got {self.cfg.template!r}")

    def encode(self, rec: Record) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = list(self.bos), [IGNORE] * len(self.bos)
        for text, is_answer in self.segments(rec):
            pieces = text.split("<image>")
            for k, piece in enumerate(pieces):
                if k:
                    ids += [self.image_token_id] * self.n_img
                    labels += [IGNORE] * self.n_img
                t = self.tok(piece, add_special_tokens=False).input_ids if piece else []
                ids += t
                labels += t if is_answer else [IGNORE] * len(t)
        m = self.cfg.max_length
        if len(ids) > m:
            if self.image_token_id in ids[m:]:
                raise BadRecord(
                    f"{rec.source}: record {rec.id}: data.max_length={m} cuts into the "
                    f"{self.n_img} image tokens; raise max_length"
                )
            ids, labels = ids[:m], labels[:m]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class Collator:
    """Right-pads a batch; stacks images of the records that have one."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, items):
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for b, it in enumerate(items):
            t = len(it["input_ids"])
            ids[b, :t] = it["input_ids"]
            labels[b, :t] = it["labels"]
            mask[b, :t] = 1
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        out = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "domain": torch.tensor([it["domain"] for it in items], dtype=torch.long),
        }
        if pix:
            out["pixel_values"] = torch.stack(pix)
        return out


class MixtureSampler(Sampler):
    """Draws ``num_samples`` indices per epoch: a domain by weight, then the next record of that
    domain's shuffled cycle. Deterministic in (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, by_domain: list[list[int]], weights: list[float], num_samples: int, seed: int = 0):
        if len(by_domain) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"domain weights must be non-negative with a positive sum, got {weights}")
        self.by_domain = by_domain
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        doms = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        perms = [torch.randperm(len(ix), generator=g).tolist() for ix in self.by_domain]
        pos = [0] * len(self.by_domain)
        for d in doms:
            ix = self.by_domain[d]
            yield ix[perms[d][pos[d] % len(ix)]]
            pos[d] += 1


def resolve_specs(cfg: DataConfig, seed: int = 0, image_size: int = 64) -> list[DatasetSpec]:
    """The configured datasets, or the built-in ones (``data.builtin``) when none are given."""
    if cfg.datasets:
        return list(cfg.datasets)
    if cfg.builtin not in ("caption", "instruct"):
        raise ValueError("no data: set data.datasets, or data.builtin to 'caption' or 'instruct'")
    return make_builtin(cfg.builtin_dir, cfg.builtin_per_domain, seed, image_size)[cfg.builtin]
