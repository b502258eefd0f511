"""The playground in a real browser: `latentformer ui` on a loopback port, driven by headless Chromium.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); Selenium
is pointed at them, so nothing is downloaded. LATENTFORMER_UI_SCREENSHOT=PATH also writes the
screenshot there (how docs/ui.png is made); LATENTFORMER_UI_CHECKPOINT=PATH (with
LATENTFORMER_UI_PROMPT, and LATENTFORMER_UI_STOP_AFTER characters, default 40) runs the page on
that checkpoint instead of a tiny random model.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import latentformer as lf
from latentformer.checkpoint import save_checkpoint
from latentformer.data.tokenizer import load_tokenizer

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MAX_NEW_TOKENS = 4000  # ~5 s on a 2-core CPU with the model below: Stop lands mid-stream

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver)"),
]
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("streamlit")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"latentformer ui exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"the app did not come up at {url} in {timeout:.0f} s")


def endless_checkpoint(path: Path) -> Path:
    """A random 2-layer MLA model with the byte tokenizer that can never emit end-of-text.

    Residual dimension 0 is 1 in every embedding and no block writes to it, so after the final
    RMSNorm it is positive at every position; the head's end-of-text row reads only that dimension,
    with weight -1000. A reply therefore always runs to max_new_tokens, and only Stop ends it early.
    """
    torch.manual_seed(0)
    cfg = lf.ModelConfig(vocab_size=260, n_layers=2, d_model=64, n_heads=4, max_seq_len=4096, d_ff=96,
                         kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, init_std=0.2)
    model, tokenizer = lf.Transformer(cfg).eval(), load_tokenizer("byte")
    with torch.no_grad():
        model.embed.weight[:, 0] = 1.0
        for layer in model.layers:
            layer.attn.o_proj.weight[0] = 0.0
            layer.ffn.down_proj.weight[0] = 0.0
        model.lm_head.weight[tokenizer.eot_id] = 0.0
        model.lm_head.weight[tokenizer.eot_id, 0] = -1000.0
    return save_checkpoint(path, model, tokenizer)


def test_endless_checkpoint_never_ends_on_its_own(tmp_path):
    model, tokenizer = lf.load(endless_checkpoint(tmp_path / "model"), device="cpu")
    ids = torch.tensor([tokenizer.encode("The state of the union")])
    for _ in range(3):  # eot stays >= 100 logits below the best token (p < e^-50 at the top temperature, 2)
        with torch.no_grad():
            logits = model(ids)[0]
        assert (logits[:, tokenizer.eot_id] < logits.max(dim=-1).values - 100).all()
        ids = torch.cat([ids, torch.randint(0, tokenizer.eot_id, (1, 200))], dim=1)


@pytest.fixture
def app_url(tmp_path):
    ckpt = os.environ.get("LATENTFORMER_UI_CHECKPOINT") or str(endless_checkpoint(tmp_path / "model"))
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "latentformer", "ui", ckpt, "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()  # the verb passes SIGTERM on to its streamlit child
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the verb and its child
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,1250", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def output_text(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, ".st-key-output").text


def set_input(driver, selector: str, value: str, commit: str) -> None:
    """Type into a Streamlit input and commit it (Enter for a number, Ctrl+Enter for a text area)."""
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(value)
    field.send_keys(Keys.CONTROL, Keys.ENTER) if commit == "ctrl+enter" else field.send_keys(Keys.ENTER)
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.CSS_SELECTOR, selector).get_attribute("value") == value)
    time.sleep(0.5)  # let the rerun that the commit starts finish


def test_generate_stream_and_stop_in_chromium(app_url, browser, tmp_path):
    prompt = os.environ.get("LATENTFORMER_UI_PROMPT", "The state of the union")
    browser.get(app_url)
    wait = WebDriverWait(browser, 120)  # a real checkpoint (LATENTFORMER_UI_CHECKPOINT) loads in the first run
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-generate button"))
    set_input(browser, "input[aria-label='Max new tokens']", str(MAX_NEW_TOKENS), "enter")
    set_input(browser, "textarea[aria-label='Prompt']", prompt, "ctrl+enter")
    browser.find_element(By.CSS_SELECTOR, ".st-key-generate button").click()

    # tokens stream in: the output grows past the prompt while Stop is enabled
    stop_after = int(os.environ.get("LATENTFORMER_UI_STOP_AFTER", "40"))
    wait.until(lambda d: len(output_text(d)) > len(prompt) + stop_after)
    stop = browser.find_element(By.CSS_SELECTOR, ".st-key-stop button")
    assert stop.is_enabled()
    stop.click()
    wait.until(lambda d: "stopped after" in output_text(d))
    kept = output_text(browser)
    time.sleep(1.5)
    assert output_text(browser) == kept  # generation ended, the text so far stays on the page
    assert kept.startswith(prompt)
    caption = next(line for line in kept.splitlines() if line.startswith("stopped after"))
    n_chars = int(caption.split()[2].replace(",", ""))
    assert stop_after < n_chars < MAX_NEW_TOKENS  # "stopped" only when Stop ended the stream before its last token
    assert browser.find_element(By.CSS_SELECTOR, ".st-key-generate button").is_enabled()

    body = browser.find_element(By.TAG_NAME, "body").text
    for text in ("latentformer playground", "Model card", "MHA equivalent", "KV cache bytes/token",
                 "largest batch at C in M", "less cache per token"):
        assert text in body, text
    shot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("LATENTFORMER_UI_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LATENTFORMER_UI_SCREENSHOT"])


def test_buttons_show_their_whole_labels_at_1400_px(app_url, browser):
    """The primary button read "Gener…" in a 1400-px window: no label is cut."""
    browser.set_window_size(1400, 1000)
    browser.get(app_url)
    WebDriverWait(browser, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".st-key-generate button"))
    for key, label in (("generate", "Generate"), ("stop", "Stop"), ("clear", "Clear")):
        button = browser.find_element(By.CSS_SELECTOR, f".st-key-{key} button")
        cut = browser.execute_script(
            "return [arguments[0], ...arguments[0].querySelectorAll('*')].some(e => e.scrollWidth > e.clientWidth)", button)
        assert button.text == label and not cut, key
