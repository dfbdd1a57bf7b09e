"""Smoke test of the screenshot script (backend/screenshots.py): Playwright drives Debian's chromium (the
system executable, never `playwright install`) and writes a PNG of a page; without chromium the script
says so and exits 2. The full run over Label Studio is `make screenshots` (minutes, Label Studio needed).
"""

from __future__ import annotations

import http.server
import threading

import pytest

from backend import screenshots
from backend.settings import Settings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_without_chromium_the_script_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(screenshots, "chromium_path", lambda: None)
    assert screenshots.take_screenshots(Settings(model_dir=tmp_path), str(tmp_path / "shots")) == 2
    assert "apt-get install chromium" in capsys.readouterr().err
    assert not (tmp_path / "shots").exists()


@pytest.mark.skipif(screenshots.chromium_path() is None,
                    reason="chromium is not installed (apt-get install chromium, or `make browser`)")
def test_playwright_drives_the_system_chromium_to_a_png(tmp_path):
    from playwright.sync_api import sync_playwright

    (tmp_path / "index.html").write_text("<html><body style='background:#3cb44b'><h1>osprey</h1></body></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "page.png"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=screenshots.chromium_path(), args=["--no-sandbox"])
            page = browser.new_page(viewport=screenshots.VIEWPORT)
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
            assert page.locator("h1").inner_text() == "osprey"
            page.screenshot(path=str(out))
            browser.close()
    finally:
        server.shutdown()
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (screenshots.VIEWPORT["width"], screenshots.VIEWPORT["height"])
        assert im.convert("RGB").getpixel((5, im.size[1] - 5)) == (0x3C, 0xB4, 0x4B)  # the page, not a blank
