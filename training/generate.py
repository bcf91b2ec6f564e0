"""``python -m training.generate --run DIR --image FILE --prompt TEXT [--sample] [--max-new-tokens N]``

Loads the run's exported adapter onto a fresh base model and generates (greedy by default, or
sampled) with the KV cache; the MoLE layers route each new token as it is decoded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .data import VICUNA_SYSTEM, expand2square


def build_prompt(built, template: str, prompt: str, has_image: bool):
    tok = built.tokenizer
    q = ("<image>\n" + prompt) if has_image else prompt
    if template == "vicuna_v1":
        text = f"{VICUNA_SYSTEM} USER: {q} ASSISTANT:"
    else:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    ids = []
    probe = tok("a").input_ids
    if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id:
        ids.append(tok.bos_token_id)
    for k, piece in enumerate(text.split("<image>")):
        if k:
            ids += [built.model.config.image_token_id] * built.num_image_tokens
        ids += tok(piece, add_special_tokens=False).input_ids
    return torch.tensor([ids])


@torch.no_grad()
def generate(built, cfg, prompt: str, image=None, max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0) -> str:
    """Generate an answer; ``image`` is a PIL image or None."""
    model = built.model.eval()
    input_ids = build_prompt(built, cfg.data.template, prompt, image is not None).to(model.device)
    kw = {}
    if image is not None:
        bg = tuple(int(x * 255) for x in built.image_processor.image_mean)
        img = expand2square(image.convert("RGB"), bg)
        kw["pixel_values"] = built.image_processor(images=img, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        use_cache=True,
        eos_token_id=built.tokenizer.eos_token_id,
        pad_token_id=built.tokenizer.pad_token_id,
        **kw,
    )
    return built.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def find_adapter(run) -> Path:
    """The adapter of a train run (RUN/adapter), a demo run (RUN/stage2/adapter), or RUN itself."""
    run = Path(run)
    candidates = [run / "adapter", run / "stage2" / "adapter", run]
    from .checkpoint import adapter_meta_path

    return next((c for c in candidates if adapter_meta_path(c) is not None), run)


@torch.no_grad()
def generate_batch(built, cfg, prompts: list[str], images: list, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers for several prompts at once (left-padded; prompts with and without an image
    run as separate batches, since every image-bearing row needs its pixel values)."""
    model = built.model.eval()
    tok = built.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = [""] * len(prompts)
    for with_image in (True, False):
        rows = [i for i, im in enumerate(images) if (im is not None) == with_image]
        if not rows:
            continue
        ids = [build_prompt(built, cfg.data.template, prompts[i], with_image)[0] for i in rows]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding: every row's answer starts at column `width`
            input_ids[r, width - len(x):] = x
            mask[r, width - len(x):] = 1
        kw = {}
        if with_image:
            bg = tuple(int(v * 255) for v in built.image_processor.image_mean)
            sq = [expand2square(images[i].convert("RGB"), bg) for i in rows]
            kw["pixel_values"] = built.image_processor(images=sq, return_tensors="pt")["pixel_values"].to(
                model.device, model.dtype)
        out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad, **kw)
        for r, i in enumerate(rows):
            answers[i] = tok.decode(out[r, width:], skip_special_tokens=True)
    return answers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True,
                    help="run directory (its adapter/, or a demo's stage2/adapter/) or an adapter directory")
    ap.add_argument("--image", help="image file (omit for a text-only prompt)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from .trainer import load_run_model

    built, cfg = load_run_model(find_adapter(args.run))
    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image)
    print(generate(built, cfg, args.prompt, image, args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
