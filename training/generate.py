"""``python -m training.generate --run DIR --image FILE --prompt TEXT [--sample] [--max-new-tokens N]``

Loads the run's exported adapter onto a fresh base model and generates (greedy by default, or
sampled) with the KV cache; the MoLE layers route each new token as it is decoded.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .data import VICUNA_SYSTEM, expand2square


def build_prompt(built, template: str, prompt: str, has_image: bool, history=()):
    """Token ids [1, T] of a conversation ready for the answer: earlier ``history`` turns
    ((question, answer) pairs), then ``prompt``. The image (if any) belongs to the first question,
    as in LLaVA; the pieces are tokenised one by one exactly as ``LlavaData`` does in training."""
    tok = built.tokenizer
    turns = [(q, a) for q, a in history] + [(prompt, None)]
    if has_image:
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
    if template == "vicuna_v1":
        eos = tok.eos_token or ""
        pieces = []
        for j, (q, a) in enumerate(turns):
            pieces.append(f"{VICUNA_SYSTEM + ' ' if j == 0 else ''}USER: {q} ASSISTANT:")
            if a is not None:
                pieces.append(f" {a}{eos}")
    else:
        msgs = []
        for q, a in turns:
            msgs.append({"role": "user", "content": q})
            if a is not None:
                msgs.append({"role": "assistant", "content": a})
        pieces = [tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)]
    ids = []
    probe = tok("a").input_ids
    if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id:
        ids.append(tok.bos_token_id)
    for text in pieces:
        for k, piece in enumerate(text.split("<image>")):
            if k:
                ids += [built.model.config.image_token_id] * built.num_image_tokens
            if piece:
                ids += tok(piece, add_special_tokens=False).input_ids
    return torch.tensor([ids])


def pixel_values(built, images: list):
    """The processor's tensor for PIL images, padded to square with its mean colour (LLaVA-1.5)."""
    model = built.model
    bg = tuple(int(v * 255) for v in built.image_processor.image_mean)
    sq = [expand2square(im.convert("RGB"), bg) for im in images]
    return built.image_processor(images=sq, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)


def load_run(run, device: str | None = None):
    """(Built, RunConfig) of a run directory or adapter directory (see ``find_adapter``)."""
    from .export import find_adapter, load_run_model  # the one place the run loader is imported

    return load_run_model(find_adapter(run), device=device)


class RoutingRecorder:
    """Records ``MoLEFFN.last_routing.expert`` after every forward of every MoLE layer while
    active (a context manager), for one sequence being generated: ``steps[l]`` is the list of
    per-forward expert tensors of layer ``l`` (the prompt's prefill first, then one per token)."""

    def __init__(self, model):
        from .model import mole_modules

        self.moles = mole_modules(model)
        self.names = [n for n, _ in self.moles]
        self.steps: list[list[torch.Tensor]] = [[] for _ in self.moles]
        self._hooks = []

    def __enter__(self):
        for li, (_, m) in enumerate(self.moles):
            self._hooks.append(m.register_forward_hook(self._hook(li)))
        return self

    def _hook(self, li):
        def fn(module, args, out):
            if module.last_routing is not None:
                self.steps[li].append(module.last_routing.expert.detach().reshape(-1).cpu())
        return fn

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def token_experts(self, n_tokens: int) -> list[list[int]]:
        """Expert of each of the first ``n_tokens`` generated tokens, per MoLE layer: [token][layer].
        Generated token i is the input of decode step i + 1 (step 0 is the prompt's prefill)."""
        out = [[0] * len(self.moles) for _ in range(n_tokens)]
        for li, steps in enumerate(self.steps):
            if len(steps) < n_tokens + 1:
                raise RuntimeError(f"routing of {len(steps) - 1} decode steps recorded for {n_tokens} tokens")
            for i in range(n_tokens):
                out[i][li] = int(steps[i + 1][-1])
        return out


@torch.no_grad()
def generate(built, cfg, prompt: str, image=None, max_new_tokens: int = 32, sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, history=()) -> str:
    """Generate an answer; ``image`` is a PIL image or None; ``history`` earlier (question, answer) turns."""
    model = built.model.eval()
    input_ids = build_prompt(built, cfg.data.template, prompt, image is not None, history).to(model.device)
    kw = {}
    if image is not None:
        kw["pixel_values"] = pixel_values(built, [image])
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


def stream_answer(built, cfg, prompt: str, image=None, history=(), max_new_tokens: int = 64, sample: bool = False,
                  temperature: float = 0.7, top_p: float = 0.9, seed: int = 0):
    """Generate one answer, streaming: yields ``{"text": piece}`` as tokens are decoded
    (transformers' ``TextIteratorStreamer``, generation in a worker thread), then one
    ``{"done": True, "answer", "ids", "tokens", "experts", "layers", "load"}``: the answer's token
    ids and tokens (each decoded alone), the expert each token was routed to in every MoLE layer (``experts[token][layer]``,
    read from ``MoLEFFN.last_routing`` while the token is decoded), the MoLE layer names, and per
    layer the fraction of the answer's tokens each expert received (``load[layer][expert]``)."""
    import threading

    from transformers import TextIteratorStreamer

    model = built.model.eval()
    tok = built.tokenizer
    input_ids = build_prompt(built, cfg.data.template, prompt, image is not None, history).to(model.device)
    kw = {"pixel_values": pixel_values(built, [image])} if image is not None else {}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def work():
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                result["out"] = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                    do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                    use_cache=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    return_dict_in_generate=True, streamer=streamer, **kw)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
            streamer.end()

    with RoutingRecorder(model) as rec:
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield {"text": piece}
        worker.join()
        if "error" in result:
            raise result["error"]
        out = result["out"]
        new = out.sequences[0, input_ids.shape[1]:].tolist()
        ended = bool(new) and new[-1] == tok.eos_token_id
        shown = new[:-1] if ended else new
        if shown and not ended:  # the last token was never fed back: route it with one cached step
            with torch.no_grad():
                last = torch.tensor([[new[-1]]], device=model.device)
                model(input_ids=last, past_key_values=out.past_key_values, use_cache=True,
                      attention_mask=torch.ones((1, input_ids.shape[1] + len(new)), dtype=torch.long,
                                                device=model.device))
        experts = rec.token_experts(len(shown)) if rec.moles else [[] for _ in shown]
    K = rec.moles[0][1].num_experts if rec.moles else 0
    load = [[0.0] * K for _ in rec.names]
    for row in experts:
        for li, e in enumerate(row):
            load[li][e] += 1
    load = [[round(c / max(1, len(experts)), 4) for c in row] for row in load]
    yield {"done": True, "answer": tok.decode(shown, skip_special_tokens=True).strip(),
           "ids": shown, "tokens": [tok.decode([t]) for t in shown], "experts": experts, "layers": rec.names,
           "num_experts": K, "load": load}


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
        kw = {"pixel_values": pixel_values(built, [images[i] for i in rows])} if with_image else {}
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
    built, cfg = load_run(args.run)
    image = None
    if args.image:
        from PIL import Image

        image = Image.open(args.image)
    print(generate(built, cfg, args.prompt, image, args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
