"""LLaVA-JSON data: several domains with sampling weights, pad-to-square images, Vicuna-v1, plain
or chat template prompts, answer-only labels, truncation, bad records skipped and counted by
reason (or raised), and per-epoch samplers with LLaVA's modality/length grouping (the demo's
generated data set: ``demo_data``)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
TEMPLATES = ("vicuna_v1", "plain", "chat")
# Why a record is skipped (data.on_bad_record=skip); the index is the code the collator reports.
SKIP_REASONS = ("bad_format", "missing_image", "corrupt_image", "image_tokens_do_not_fit", "answer_truncated")


class BadRecord(ValueError):
    """A record that cannot be used; the message names the file and the record id, ``reason`` is
    one of ``SKIP_REASONS``."""

    def __init__(self, message: str, reason: str = "bad_format"):
        super().__init__(message)
        self.reason = reason


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


def default_max_length(num_image_tokens: int) -> int:
    """``data.max_length`` when unset: 192 for the small demo towers, 2048 (LLaVA-1.5's
    ``model_max_length``) for a tower of 256 or more image tokens (CLIP-L/14-336: 576)."""
    return 2048 if num_image_tokens >= 256 else 192


def resolve_max_length(max_length: int | None, num_image_tokens: int) -> int:
    m = default_max_length(num_image_tokens) if max_length is None else max_length
    if not isinstance(m, int) or m <= num_image_tokens:
        raise ValueError(f"data.max_length={m} cannot hold the model's {num_image_tokens} image tokens plus any "
                         f"text: set data.max_length above {num_image_tokens} (LLaVA-1.5 uses 2048 for 576)")
    return m


def parse_records(spec: DatasetSpec, domain: int, on_bad: str, reasons: Counter | None = None) -> tuple[list[Record], int]:
    """Read one LLaVA JSON file: structure checks and image files present. Returns (records,
    number skipped); ``reasons`` (if given) counts the skipped ones by reason."""
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
            out.append(_parse_one(r, rid, path, root, domain))
        except BadRecord as e:
            if on_bad == "skip":
                skipped += 1
                if reasons is not None:
                    reasons[e.reason] += 1
                log.warning("skipping (%s): %s", e.reason, e)
            else:
                raise
    return out, skipped


def _parse_one(r, rid, path: Path, root: Path, domain: int) -> Record:
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
            raise BadRecord(f"{where}: image file {image} is missing", "missing_image")
        if n_tags == 0:  # LLaVA puts the image before the first question when the tag is absent
            turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
        elif n_tags > 1 or "<image>" not in turns[0][0]:
            raise BadRecord(f"{where}: expected one <image> tag, in the first question")
    elif n_tags:
        raise BadRecord(f"{where}: has an <image> tag but no 'image'")
    return Record(str(rid), domain, str(path), image, turns)


def decode_image(rec: Record):
    """The record's image fully decoded as RGB (a truncated file fails here, unlike PIL's
    ``verify``). Raises BadRecord(reason="corrupt_image")."""
    from PIL import Image

    try:
        with Image.open(rec.image) as im:
            return im.convert("RGB")  # convert loads every pixel
    except Exception as e:  # PIL raises many kinds for a bad file
        raise BadRecord(f"{rec.source}: record {rec.id}: cannot read image {rec.image}: {e}", "corrupt_image") from e


def _check_image(rec: Record) -> None:
    """Decode the whole file at reduced scale (JPEG draft mode reads every byte but skips most
    of the IDCT work): truncation and corruption surface, at a fraction of a full decode's cost."""
    from PIL import Image

    try:
        with Image.open(rec.image) as im:
            im.draft("RGB", (32, 32))
            im.load()
    except Exception as e:
        raise BadRecord(f"{rec.source}: record {rec.id}: cannot read image {rec.image}: {e}", "corrupt_image") from e


def _is_main_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class LlavaData(Dataset):
    """All records of several LLaVA-JSON files; each file is a domain.

    ``__getitem__`` returns ``input_ids`` / ``labels`` (long, [T]), ``pixel_values`` ([3, H, W] or
    None for a text-only record) and ``domain`` (int); in skip mode a record that fails to load
    returns ``{"skip": (index, reason)}`` instead, which the ``Collator`` drops and reports.

    In skip mode every record is checked up front (its image fully decoded, its prompt encoded
    and truncated): records with a missing or corrupt image, image tokens that do not fit
    ``max_length`` or answers truncated away are dropped and counted in ``skip_reasons``.
    ``check_cache``: a JSON file where the check's result is kept (keyed by a fingerprint of the
    files and settings), so that it runs once per run directory and not once per rank.
    """

    def __init__(self, cfg: DataConfig, tokenizer, image_processor, num_image_tokens: int, specs=None,
                 check_cache: str | os.PathLike | None = None, progress: bool | None = None):
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
        if cfg.template not in TEMPLATES:
            raise ValueError(f"data.template must be one of {TEMPLATES}, got {cfg.template!r}")
        self.max_length = resolve_max_length(cfg.max_length, num_image_tokens)
        self.domains = [s.domain or Path(s.path).stem for s in specs]
        self.weights = [float(s.weight) for s in specs]
        mean = getattr(image_processor, "image_mean", [0.5, 0.5, 0.5])
        self.background = tuple(int(x * 255) for x in mean)
        bos = tokenizer.bos_token_id
        probe = tokenizer("a").input_ids
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.skip_reasons: Counter = Counter()
        records = []
        for d, s in enumerate(specs):
            recs, _ = parse_records(s, d, cfg.on_bad_record, self.skip_reasons)
            if not recs:
                raise BadRecord(f"{s.path}: no usable records")
            records += recs
        self.records: list[Record] = records
        self.lengths: list[int] | None = None  # token counts, when checked
        if cfg.on_bad_record == "skip":
            self._check(specs, check_cache, progress)
        for d, s in enumerate(specs):
            if not any(r.domain == d for r in self.records):
                raise BadRecord(f"{s.path}: no usable records (skipped: {dict(self.skip_reasons)})")
        self.by_domain = [[i for i, r in enumerate(self.records) if r.domain == d] for d in range(len(specs))]

    @property
    def skipped(self) -> int:
        """Records skipped up front (all reasons)."""
        return sum(self.skip_reasons.values())

    def __len__(self):
        return len(self.records)

    # -- the up-front check (skip mode) --------------------------------------------------------
    def _fingerprint(self, specs) -> str:
        files = []
        for s in specs:
            st = os.stat(s.path)
            files.append([str(Path(s.path).resolve()), st.st_size, st.st_mtime_ns, s.image_root])
        key = [files, self.cfg.template, self.max_length, self.n_img, len(self.tok),
               getattr(self.tok, "name_or_path", ""), len(self.records)]
        return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()

    def _check(self, specs, cache, progress) -> None:
        fp = self._fingerprint(specs)
        cache = Path(cache) if cache else None
        result = None
        if cache is not None and cache.is_file():
            try:
                saved = json.loads(cache.read_text())
                result = saved if saved.get("fingerprint") == fp else None
            except (OSError, json.JSONDecodeError):
                result = None
        if result is None:
            result = self._run_check(progress)
            result["fingerprint"] = fp
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(result))
                os.replace(tmp, cache)
        else:
            log.info("data check: reusing %s", cache)
        bad = {int(i): (reason, msg) for i, reason, msg in result["bad"]}
        for i, (reason, msg) in sorted(bad.items()):
            self.skip_reasons[reason] += 1
        keep = [i for i in range(len(self.records)) if i not in bad]
        self.records = [self.records[i] for i in keep]
        self.lengths = [result["lengths"][i] for i in keep]
        if bad:
            log.warning("data: skipped %d records up front: %s (listed in %s)", len(bad),
                        dict(Counter(r for r, _ in bad.values())), cache or "the log")

    def _run_check(self, progress) -> dict:
        from tqdm.auto import tqdm

        n = len(self.records)
        show = _is_main_process() if progress is None else progress
        log.info("data check: decoding the images and encoding the prompts of %d records", n)
        bad, lengths = [], [0] * n

        def check_image(i):
            rec = self.records[i]
            try:
                if rec.image:
                    _check_image(rec)
                return None
            except BadRecord as e:
                return e

        workers = min(8, os.cpu_count() or 1)
        # Images decode in threads (PIL releases the GIL); the tokenizer stays on this thread (a
        # fast tokenizer shared between threads can fail with "Already borrowed").
        with ThreadPoolExecutor(workers) as pool:
            errors = pool.map(check_image, range(n), chunksize=64)
            for i, err in tqdm(enumerate(errors), total=n, disable=not show, desc="checking records",
                               mininterval=2.0):
                if err is None:
                    try:
                        lengths[i] = len(self.encode(self.records[i])[0])
                    except BadRecord as e:
                        err = e
                if err is not None:
                    log.warning("skipping (%s): %s", err.reason, err)
                    bad.append([i, err.reason, str(err)])
        return {"bad": bad, "lengths": lengths}

    def length(self, i: int) -> int:
        """Token count of record i (exact when checked, else an estimate from the words)."""
        if self.lengths is not None:
            return self.lengths[i]
        rec = self.records[i]
        return (self.n_img if rec.image else 0) + sum(len(q.split()) + len(a.split()) for q, a in rec.turns)

    # -- loading ----------------------------------------------------------------------------
    def load_image(self, rec: Record) -> torch.Tensor:
        img = expand2square(decode_image(rec), self.background)
        return self.proc(images=img, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, i):
        rec = self.records[i]
        try:
            pixel_values = self.load_image(rec) if rec.image else None
            ids, labels = self.encode(rec)
        except BadRecord as e:
            if self.cfg.on_bad_record != "skip":
                raise
            log.warning("skipping at load (%s): %s", e.reason, e)
            return {"skip": (i, e.reason)}  # counted by the Collator, never replaced by another record
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
        if self.cfg.template == "plain":
            # LLaVA's --version plain (stage-1 captions): the image tokens, then the answer and "\n";
            # the question is dropped and only the answer is labelled.
            if rec.image is None or len(rec.turns) != 1:
                raise BadRecord(f"{rec.source}: record {rec.id}: the plain template takes single-turn "
                                "records with an image (LLaVA's stage-1 captions)")
            return [("<image>", False), (rec.turns[0][1] + "\n", True)]
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
        raise ValueError(f"data.template must be one of {TEMPLATES}, got {self.cfg.template!r}")

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
        m = self.max_length
        if len(ids) > m:
            if self.image_token_id in ids[m:]:
                raise BadRecord(
                    f"{rec.source}: record {rec.id}: data.max_length={m} cuts into the "
                    f"{self.n_img} image tokens; raise max_length", "image_tokens_do_not_fit"
                )
            had_answer = any(x != IGNORE for x in labels)
            ids, labels = ids[:m], labels[:m]
            if had_answer and all(x == IGNORE for x in labels):
                raise BadRecord(f"{rec.source}: record {rec.id}: data.max_length={m} truncates every answer "
                                "token away (nothing to train on); raise max_length", "answer_truncated")
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


class Collator:
    """Right-pads a batch; stacks images of the records that have one. Items that failed to load
    (skip mode) are dropped; with ``report_skips`` the batch carries them as ``skipped``
    ([n, 2] long: dataset index, ``SKIP_REASONS`` code) for the trainer to count, also from
    DataLoader worker processes."""

    def __init__(self, pad_token_id: int, report_skips: bool = False):
        self.pad = pad_token_id
        self.report_skips = report_skips

    def __call__(self, items):
        skips = [it["skip"] for it in items if "skip" in it]
        items = [it for it in items if "skip" not in it]
        if not items:
            raise BadRecord(f"every record of a batch failed to load: {skips}", "corrupt_image")
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
        if self.report_skips:
            out["skipped"] = torch.tensor([[i, SKIP_REASONS.index(r)] for i, r in skips], dtype=torch.long).view(-1, 2)
        return out


def modality_length_grouped(order: list[int], lengths, has_image, batch_size: int, megabatch_size: int,
                            generator: torch.Generator) -> list[int]:
    """LLaVA's ``group_by_modality_length`` applied to an epoch's order: image and text-only
    records are split, each cut into megabatches (the global batch: per-device batch x ranks x
    accumulation) sorted by length, those into per-device batches; the batches are shuffled.
    Every per-device batch is one modality of similar lengths, except the last, mixed batch of
    leftovers. The same indices come out, each as often as it went in."""
    batches, rest = [], []
    for part in ([i for i in order if has_image[i]], [i for i in order if not has_image[i]]):
        for s in range(0, len(part), megabatch_size):
            mb = sorted(part[s:s + megabatch_size], key=lambda i: -lengths[i])
            full = len(mb) // batch_size * batch_size
            batches += [mb[j:j + batch_size] for j in range(0, full, batch_size)]
            rest += mb[full:]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [i for p in perm for i in batches[p]] + rest


class _GroupedMixin:
    group = None  # (lengths, has_image, batch_size, megabatch_size)

    def _maybe_group(self, order, g):
        if self.group is None:
            return order
        lengths, has_image, bs, mb = self.group
        return modality_length_grouped(order, lengths, has_image, bs, mb, g)

    def set_epoch(self, epoch: int):
        self.epoch = epoch


class MixtureSampler(_GroupedMixin, Sampler):
    """Draws ``num_samples`` indices per epoch: a domain by weight, then the next record of that
    domain's shuffled cycle. Deterministic in (seed, epoch), so a resumed run sees the same order.
    ``group``: (lengths, has_image, batch_size, megabatch_size) for LLaVA's modality/length
    grouping of each epoch's draw."""

    def __init__(self, by_domain: list[list[int]], weights: list[float], num_samples: int, seed: int = 0,
                 group=None):
        if len(by_domain) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"domain weights must be non-negative with a positive sum, got {weights}")
        self.by_domain = by_domain
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.group = group

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        doms = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist()
        perms = [torch.randperm(len(ix), generator=g).tolist() for ix in self.by_domain]
        pos = [0] * len(self.by_domain)
        order = []
        for d in doms:
            ix = self.by_domain[d]
            order.append(ix[perms[d][pos[d] % len(ix)]])
            pos[d] += 1
        yield from self._maybe_group(order, g)


class EpochSampler(_GroupedMixin, Sampler):
    """Every record exactly once per epoch, shuffled (deterministic in (seed, epoch)); ``group``
    as in ``MixtureSampler``."""

    def __init__(self, num_records: int, seed: int = 0, group=None):
        if num_records <= 0:
            raise ValueError(f"EpochSampler needs at least one record, got {num_records}")
        self.n = num_records
        self.seed = seed
        self.epoch = 0
        self.group = group

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        yield from self._maybe_group(torch.randperm(self.n, generator=g).tolist(), g)


def resolve_specs(cfg: DataConfig, seed: int = 0, image_size: int = 64) -> list[DatasetSpec]:
    """The configured datasets, or the built-in ones (``data.builtin``) when none are given."""
    if cfg.datasets:
        return list(cfg.datasets)
    if cfg.builtin not in ("caption", "instruct"):
        raise ValueError("no data: set data.datasets, or data.builtin to 'caption' or 'instruct'")
    return make_builtin(cfg.builtin_dir, cfg.builtin_per_domain, seed, image_size)[cfg.builtin]
