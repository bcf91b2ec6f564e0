"""``python -m training.serve --run DIR [--host 127.0.0.1] [--port 7860]``

A small web demo of a trained run on a local HTTP server (Python's ``http.server``, no web
framework): upload an image, ask a question, watch the answer stream in; under it every generated
token is coloured by the expert it was routed to in a chosen MoLE layer, and a heatmap shows the
answer's expert load in every layer. The page is ``training/static/index.html``.

It binds to 127.0.0.1 unless ``--host`` says otherwise, serves one generation at a time, and
answers bad requests with a message while it keeps serving: a request body over
``--max-upload-mb``, an image over ``--max-pixels``, a file that is not an image, an empty
question or one over ``--max-prompt-chars``.

API: ``GET /api/info`` (MoLE layers, experts, limits); ``POST /api/answer`` (multipart form:
``prompt``, optional ``image`` file) streams NDJSON lines ``{"text": piece}`` and a last
``{"done": true, "answer", "tokens", "experts", "layers", "load"}``; errors are
``{"error": message}`` with a 4xx status.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import io
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
FORM_SLACK = 64 * 1024  # multipart headers and the prompt field, on top of the image


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Limits:
    def __init__(self, max_upload_bytes: int = 8 << 20, max_pixels: int = 4096 * 4096, max_prompt_chars: int = 1000,
                 max_new_tokens: int = 64):
        for name, v in (("max_upload_bytes", max_upload_bytes), ("max_pixels", max_pixels),
                        ("max_prompt_chars", max_prompt_chars), ("max_new_tokens", max_new_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.max_prompt_chars, self.max_new_tokens = max_prompt_chars, max_new_tokens

    def to_dict(self) -> dict:
        return dict(vars(self))


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.2f} MB" if n >= (1 << 20) // 10 else f"{n / 1024:.0f} KB"


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[bytes, str | None]]:
    """A multipart/form-data body as {field: (bytes, filename or None)} (standard library email parser)."""
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(400, f"expected a multipart/form-data upload, got {content_type or 'no content type'}")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise BadRequest(400, "the form data could not be parsed")
    fields = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_payload(decode=True) or b"", part.get_filename())
    return fields


def read_image(data: bytes, filename: str | None, limits: Limits):
    """A PIL RGB image from uploaded bytes, or BadRequest with a message for the page."""
    from PIL import Image, UnidentifiedImageError

    what = f"'{filename}'" if filename else "the upload"
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size  # from the header: checked before decoding the pixels
        if w * h > limits.max_pixels:
            raise BadRequest(413, f"{what} is {w}×{h} pixels; the limit is {limits.max_pixels:,} pixels. "
                                  "Please upload a smaller image.")
        im.load()
        return im.convert("RGB")
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(400, f"{what} is not an image that can be read (PNG, JPEG, GIF, BMP, WebP...): {e}") from e


class App:
    """The model, its config, the limits and the lock that serialises generation."""

    def __init__(self, built, cfg, limits: Limits | None = None):
        self.built, self.cfg = built, cfg
        self.limits = limits or Limits()
        self.lock = threading.Lock()

    def info(self) -> dict:
        moles = self.built.mole_layers
        from .model import mole_modules

        k = mole_modules(self.built.model)[0][1].num_experts if moles else 0
        return {"layers": moles, "num_experts": k, "limits": self.limits.to_dict()}


class Handler(BaseHTTPRequestHandler):
    server_version = "mole-serve"
    app: App  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # through logging, not stderr
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, self.app.info())
        else:
            self._json(404, {"error": f"no page {path}"})

    def _drain(self, n: int) -> None:
        """Read (and drop) a refused body, so the client sees our answer instead of a reset."""
        left = min(n, 64 << 20)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        if n > 64 << 20:
            self.close_connection = True

    def do_POST(self):
        if self.path.split("?", 1)[0] != "/api/answer":
            self._json(404, {"error": f"no endpoint {self.path}"})
            return
        lim = self.app.limits
        try:
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(411, "the request has no Content-Length") from None
            if n > lim.max_upload_bytes + FORM_SLACK:
                self._drain(n)
                raise BadRequest(413, f"the upload is {_mb(n)}; the limit is {_mb(lim.max_upload_bytes)}. "
                                      "Please upload a smaller image.")
            fields = parse_form(self.headers.get("Content-Type", ""), self.rfile.read(n))
            prompt = fields.get("prompt", (b"", None))[0].decode("utf-8", "replace").strip()
            if not prompt:
                raise BadRequest(400, "Please type a question.")
            if len(prompt) > lim.max_prompt_chars:
                raise BadRequest(400, f"the question has {len(prompt)} characters; the limit is {lim.max_prompt_chars}.")
            data, filename = fields.get("image", (b"", None))
            if len(data) > lim.max_upload_bytes:
                raise BadRequest(413, f"the image is {_mb(len(data))}; the limit is {_mb(lim.max_upload_bytes)}. "
                                      "Please upload a smaller image.")
            image = read_image(data, filename, lim) if data else None
        except BadRequest as e:
            self._json(e.status, {"error": str(e)})
            return
        self._stream(prompt, image)

    def _stream(self, prompt: str, image) -> None:
        from .generate import stream_answer

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        with self.app.lock:
            try:
                for ev in stream_answer(self.app.built, self.app.cfg, prompt, image,
                                        max_new_tokens=self.app.limits.max_new_tokens):
                    self.wfile.write(json.dumps(ev).encode() + b"\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                log.info("client left during generation")
            except Exception as e:  # the model failed: tell the page, keep serving
                log.exception("generation failed")
                try:
                    self.wfile.write(json.dumps({"error": f"generation failed: {e}"}).encode() + b"\n")
                except OSError:
                    pass


def make_server(built, cfg, host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None) -> ThreadingHTTPServer:
    """The HTTP server (not started: call ``serve_forever``); ``port=0`` picks a free port."""
    app = App(built, cfg, limits)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (its adapter/, a demo's stage2/adapter/) or adapter")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    ap.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted image file")
    ap.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest accepted image (width × height)")
    ap.add_argument("--max-prompt-chars", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        ap.error(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    try:
        limits = Limits(int(args.max_upload_mb * (1 << 20)), args.max_pixels, args.max_prompt_chars, args.max_new_tokens)
    except ValueError as e:
        ap.error(str(e).replace("max_", "--max-").replace("_", "-"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .generate import load_run

    built, cfg = load_run(args.run, device=args.device)
    server = make_server(built, cfg, args.host, args.port, limits)
    host, port = server.server_address[:2]
    print(f"[serve] {args.run} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
