"""``python -m training.chat --run DIR [--image FILE] [--max-new-tokens N] [--sample] [--experts-layer L]``

A multi-turn chat in the terminal with a trained run (LLaVA's CLI chat): answers stream token by
token. The image (optional) belongs to the conversation's first question, as in LLaVA; commands:

    /image PATH   start a new conversation about this image
    /text         start a new conversation without an image
    /reset        forget the conversation (keep the image)
    /quit         leave (or Ctrl-D)

With ``--experts-layer L`` each answer is followed by its tokens tagged with the expert they were
routed to in MoLE layer L (``token[expert]``), and the per-layer expert load of the answer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def open_image(path: str):
    """A PIL image from a path, or ValueError naming the path."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {p}: {e}") from e


def _check_layer(layer: int, names: list[str]) -> int:
    if not names:
        raise ValueError("this run has no MoLE layers, so there is no routing to show")
    if not -len(names) <= layer < len(names):
        raise ValueError(f"--experts-layer must be in [0, {len(names) - 1}] (or negative from the end), got {layer}")
    return layer % len(names)


class Chat:
    """One conversation: the image and the (question, answer) turns so far."""

    def __init__(self, built, cfg, image=None, **gen):
        self.built, self.cfg, self.image, self.gen = built, cfg, image, gen
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str):
        """Yields the answer's text pieces, then the final event (see ``generate.stream_answer``);
        the turn joins the history once complete."""
        from .generate import stream_answer

        final = None
        for ev in stream_answer(self.built, self.cfg, question, self.image, self.history, **self.gen):
            if ev.get("done"):
                final = ev
            yield ev
        self.history.append((question, final["answer"]))


def _routing_lines(final: dict, layer: int) -> list[str]:
    tagged = " ".join(f"{t!r}[{row[layer]}]" for t, row in zip(final["tokens"], final["experts"]))
    name = final["layers"][layer]
    lines = [f"  experts in {name}: {tagged}"]
    for li, row in enumerate(final["load"]):
        lines.append(f"  load L{li:<3d} " + " ".join(f"e{k}={v:.2f}" for k, v in enumerate(row)))
    return lines


def main(argv=None, stdin=None, stdout=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (its adapter/, a demo's stage2/adapter/) or adapter")
    ap.add_argument("--image", help="image of the first conversation")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts-layer", type=int, default=None, help="show each token's expert in this MoLE layer")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    args = ap.parse_args(argv)
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        image = open_image(args.image) if args.image else None
    except ValueError as e:
        ap.error(str(e))
    from .generate import load_run

    built, cfg = load_run(args.run, device=args.device)
    layer = None
    if args.experts_layer is not None:
        try:
            layer = _check_layer(args.experts_layer, built.mole_layers)
        except ValueError as e:
            ap.error(str(e))
    gen = dict(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
               top_p=args.top_p, seed=args.seed)
    chat = Chat(built, cfg, image, **gen)
    print(f"[chat] {args.run}: {'image ' + args.image if image is not None else 'no image'}; "
          "/image PATH, /text, /reset, /quit", file=out, flush=True)
    while True:
        out.write("USER> ")
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return 0
        q = line.strip()
        if not q:
            continue
        if q in ("/quit", "/exit"):
            return 0
        if q == "/reset":
            chat = Chat(built, cfg, chat.image, **gen)
            print("[chat] conversation reset", file=out, flush=True)
            continue
        if q == "/text":
            chat = Chat(built, cfg, None, **gen)
            print("[chat] new conversation without an image", file=out, flush=True)
            continue
        if q.startswith("/image"):
            try:
                chat = Chat(built, cfg, open_image(q[len("/image"):].strip()), **gen)
                print(f"[chat] new conversation about {q[len('/image'):].strip()}", file=out, flush=True)
            except ValueError as e:
                print(f"[chat] {e}", file=out, flush=True)
            continue
        if q.startswith("/"):
            print(f"[chat] unknown command {q.split()[0]}; /image PATH, /text, /reset, /quit", file=out, flush=True)
            continue
        out.write("ASSISTANT> ")
        final = None
        for ev in chat.ask(q):
            if ev.get("done"):
                final = ev
            else:
                out.write(ev["text"])
                out.flush()
        out.write("\n")
        if layer is not None and final is not None:
            out.write("\n".join(_routing_lines(final, layer)) + "\n")
        out.flush()


if __name__ == "__main__":
    sys.exit(main())
