"""The demo as a person uses it: demo.py in a subprocess, headless Debian chromium driven by
Playwright: type a prompt, Generate, watch the story stream in, Stop, screenshot."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from trained_checkpoint import REPO, quiet_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
PROMPT = "Once upon a time, a little dog named Max"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason="Debian's chromium is not installed at /usr/bin/chromium: run `apt-get install -y chromium` "
        "(.ci/run installs it)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# demo.py as `uv run demo.py` runs it, with the model paced to PACE_S a token and told not
# to stop at end-of-text: a model trained for a few steps writes hundreds of tokens a second
# and often ends its story at once, and a person (like this test) needs a story still
# streaming to press Stop. Page, server, streaming and Stop are all the real ones.
PACE_S = 0.02
LAUNCH = f"""
import dataclasses, runpy, sys, time
from tsfast.batching import BatchDecoder
real_add, real_step = BatchDecoder.add, BatchDecoder.step
def add(self, request, key=None):
    return real_add(self, dataclasses.replace(request, eos_id=None), key)
def paced(self):
    time.sleep({PACE_S})
    return real_step(self)
BatchDecoder.add, BatchDecoder.step = add, paced
sys.argv = ["demo.py", *sys.argv[1:]]
runpy.run_path("demo.py", run_name="__main__")
"""


@pytest.fixture
def demo_server(trained_ckpt, tmp_path):
    port = free_port()
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--ckpt", str(trained_ckpt), "--device", "cpu", "--port", str(port)],
        cwd=REPO, env=quiet_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.py exited with {proc.returncode}:\n{(tmp_path / 'demo.log').read_text()[-3000:]}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "demo.py did not serve within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_type_generate_stream_stop_screenshot(demo_server, trained_ckpt, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    seed = random.randint(0, 10**6)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(demo_server, wait_until="networkidle")
            expect(page.locator("#model-info")).to_contain_text("tiny", timeout=60_000)
            page.locator("#prompt textarea").fill(PROMPT)
            slider_box = page.locator("#max-new-tokens input[type=number]")
            slider_box.fill("500")
            slider_box.press("Tab")
            seed_box = page.locator("#seed input")
            seed_box.fill(str(seed))
            seed_box.press("Tab")

            story = page.locator("#story textarea")
            page.locator("#generate").click()
            lengths = []
            deadline = time.monotonic() + 60
            while len(lengths) < 3 and time.monotonic() < deadline:
                value = story.input_value()
                if value.startswith(PROMPT) and len(value) > (lengths[-1] if lengths else len(PROMPT)):
                    lengths.append(len(value))
            # The story grew over at least two observations after the prompt appeared.
            assert len(lengths) == 3 and lengths == sorted(set(lengths)), lengths
            time.sleep(1.0)  # let some story stream in before Stop
            page.locator("#stop").click()
            expect(page.locator("#status")).to_contain_text("· stopped ·", timeout=20_000)
            time.sleep(1.0)
            settled = story.input_value()
            time.sleep(1.0)
            assert story.input_value() == settled  # nothing streams in after Stop
            status = page.locator("#status").inner_text()
            final = re.match(r"(\d+) tokens in [\d.]+ s · ([\d.]+) tokens/s · stopped · model tiny · [\d.]+M parameters · "
                             r"val loss [\d.]+ \(step \d+\) · cpu", status.strip())
            assert final, status
            assert 3 <= int(final.group(1)) < 500 and float(final.group(2)) > 0
            assert settled.startswith(PROMPT) and len(settled) > len(PROMPT)

            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            browser.close()
