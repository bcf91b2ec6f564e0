"""The web demo (training.serve): its HTTP API with a real client, and its page in a real headless
browser (Debian's chromium driven by Playwright): upload, question, streamed answer, per-token
expert colours, the load heatmap, and bad uploads answered on the page while the server keeps
serving. The model is a tiny random run (tests/tiny_run.py)."""
from __future__ import annotations

import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid

import pytest

from tiny_run import tiny_run

from training.generate import load_run  # noqa: E402
from training.serve import Limits, make_server  # noqa: E402

LIMITS = dict(max_upload_bytes=48 * 1024, max_pixels=256 * 256, max_prompt_chars=200, max_new_tokens=6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run, images = tiny_run(tmp_path_factory)
    built, cfg = load_run(run, device="cpu")
    srv = make_server(built, cfg, port=0, limits=Limits(**LIMITS))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    host, port = srv.server_address[:2]
    yield {"url": f"http://{host}:{port}", "images": images, "built": built, "server": srv}
    srv.shutdown()
    srv.server_close()


def _png(size=(64, 64), colour=(200, 30, 30), noise=False) -> bytes:
    from PIL import Image

    if noise:
        im = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        im = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _post(url, prompt, image: bytes | None = None, filename="x.png"):
    """POST /api/answer as multipart/form-data; (status, body lines as JSON)."""
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'.encode() + prompt.encode() + b"\r\n"]
    if image is not None:
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    body = b"".join(parts) + f"--{b}--\r\n".encode()
    req = urllib.request.Request(url + "/api/answer", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, [json.loads(x) for x in r.read().decode().splitlines() if x.strip()]
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read().decode())]


def test_binds_localhost_by_default(server):
    from training.serve import main

    import inspect

    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    assert server["server"].server_address[0] == "127.0.0.1"
    with pytest.raises(SystemExit):  # a bad limit is refused before the model loads
        main(["--run", "nowhere", "--max-upload-mb", "0"])


def test_api_streams_answer_with_routing(server):
    img = (server["images"] / "images" / "shape_0001.png").read_bytes()
    status, lines = _post(server["url"], "What colour is the shape?", img)
    assert status == 200, lines
    final = lines[-1]
    assert final["done"] and all("text" in x for x in lines[:-1])
    assert "".join(x["text"] for x in lines[:-1]).strip() == final["answer"]
    n_layers = len(server["built"].mole_layers)
    assert final["tokens"] and len(final["experts"]) == len(final["tokens"])
    assert all(len(row) == n_layers and all(0 <= e < final["num_experts"] for e in row) for row in final["experts"])
    assert len(final["load"]) == n_layers and all(abs(sum(r) - 1) < 1e-3 for r in final["load"])
    info = json.loads(urllib.request.urlopen(server["url"] + "/api/info", timeout=30).read())
    assert info["layers"] == final["layers"] and info["limits"]["max_prompt_chars"] == 200


@pytest.mark.parametrize("case", ["empty", "blank", "long", "corrupt", "text", "big_file", "big_pixels"])
def test_api_refuses_bad_requests_and_keeps_serving(server, case):
    url = server["url"]
    good = (server["images"] / "images" / "shape_0002.png").read_bytes()
    prompt, image, fname, want = {
        "empty": ("", good, "a.png", (400, "type a question")),
        "blank": ("   \n ", None, None, (400, "type a question")),
        "long": ("why " * 100, good, "a.png", (400, "limit is 200")),
        "corrupt": ("What is it?", good[: len(good) // 2], "half.png", (400, "not an image")),
        "text": ("What is it?", b"hello, I am not a picture", "notes.txt", (400, "not an image")),
        "big_file": ("What is it?", _png((200, 200), noise=True), "noise.png", (413, "limit is 48 KB")),
        "big_pixels": ("What is it?", _png((400, 400)), "wide.png", (413, "pixels")),
    }[case]
    status, lines = _post(url, prompt, image, fname or "x.png")
    assert status == want[0] and want[1] in lines[0]["error"], (status, lines)
    status, lines = _post(url, "What colour is the shape?", good)
    assert status == 200 and lines[-1]["done"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # `make install` installs it (Debian's chromium); fail loudly rather than skip
        raise RuntimeError("the browser test needs Debian's chromium (apt-get install chromium); `make install` does it")
    return exe


def test_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url = server["url"]
    shape = str(server["images"] / "images" / "shape_0003.png")
    n_layers = len(server["built"].mole_layers)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#layer option", state="attached")

        def ask(prompt, file=None, expect_error=None):
            page.fill("#prompt", prompt)
            page.set_input_files("#image", file if file is not None else [])
            page.click("#ask")
            if expect_error:
                page.wait_for_function("document.querySelector('#error').textContent.length > 0", timeout=60_000)
                assert expect_error in page.inner_text("#error")
            else:
                page.wait_for_selector("#tokens .tok", timeout=120_000)
                assert page.inner_text("#error") == ""
            page.wait_for_function("!document.querySelector('#ask').disabled", timeout=60_000)

        ask("What colour is the shape?", shape)
        toks = page.eval_on_selector_all(
            "#tokens .tok", "els => els.map(e => [e.dataset.expert, getComputedStyle(e).backgroundColor, e.textContent])")
        assert toks and all(bg not in ("", "rgba(0, 0, 0, 0)") for _, bg, _ in toks)
        colours = {}
        for e, bg, _ in toks:  # one colour per expert
            assert colours.setdefault(e, bg) == bg
        assert page.inner_text("#answer").strip() == "".join(t for *_, t in toks).strip()
        assert page.locator("table.load tr[data-layer]").count() == n_layers
        assert page.locator("table.load td.cell").count() == n_layers * len(page.locator("#legend span").all())
        page.select_option("#layer", "0")  # recolour by another layer: same tokens
        assert page.locator("#tokens .tok").count() == len(toks)
        page.screenshot(path=str(tmp_path / "answer.png"), full_page=True)
        if os.environ.get("MOLE_SERVE_SCREENSHOT"):
            page.screenshot(path=os.environ["MOLE_SERVE_SCREENSHOT"], full_page=True)

        ask("What is it?", {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n garbage"},
            expect_error="not an image")
        assert page.locator("#tokens .tok").count() == 0
        ask("What is it?", {"name": "noise.png", "mimeType": "image/png", "buffer": _png((200, 200), noise=True)},
            expect_error="limit is 48 KB")
        ask("   ", shape, expect_error="Please type a question")
        ask("What colour is the shape?", shape)  # still serving
        browser.close()
