"""The chat page of `elm serve` in a real headless chromium (driven by selenium and Debian's
chromedriver), against the real server on a loopback port."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from support.chat import running_server, with_template
from support.lora import write_jsonl

openai = pytest.importorskip("openai")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

KEY = "page-key"
# What the "helper" model is fine-tuned to say, so that the page shows a readable answer.
ANSWERS = {"How do I serve a model?": "Run elm serve with your model directory, then open this page.",
           "What can you do?": "I answer questions about elm, in a few words.",
           "How do I stop an answer?": "Press Stop. The server cancels the rest of the work."}
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# Records the length of the last answer on the page each time it changes.
WATCH_ANSWER = """
window.answerLengths = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.message.assistant .content');
  if (answers.length) window.answerLengths.push(answers[answers.length - 1].textContent.length);
}).observe(document.getElementById('messages'),
           {childList: true, subtree: true, characterData: true});
"""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="needs chromium and chromedriver (scripts/setup.sh installs them on Debian as root)")]


@pytest.fixture(scope="module")
def models(make_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A random base model with room for long answers, and "helper": the base fully fine-tuned
    to give the ANSWERS."""
    from elm_mlx.lora.config import build_config
    from elm_mlx.lora.train import finetune
    from elm_spec import ModelSpec
    from elm_spec.chat_template import shipped_chat_template

    root = tmp_path_factory.mktemp("page")
    spec = dataclasses.replace(ModelSpec.from_preset("elm-tiny"), max_context_length=1024)
    base = with_template(make_model_dir(spec, seed=5), root / "base", shipped_chat_template())
    turns = [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
             for question, answer in ANSWERS.items()]
    rows = [{"messages": first + second} for first in turns for second in turns if first != second]
    write_jsonl(root / "data" / "train.jsonl", rows * 4)
    write_jsonl(root / "data" / "valid.jsonl", rows)
    finetune(build_config(None, dict(
        model=str(base), data=str(root / "data"), adapter_path=str(root / "helper"),
        fine_tune_type="full", iters=150, batch_size=4, learning_rate=3e-3, warmup=10,
        steps_per_eval=150, steps_per_report=150, val_batches=-1)))
    return base, root / "helper"


@pytest.fixture(scope="module")
def server(models):
    base, helper = models
    with running_server("--model", str(base), "--adapter-path", str(helper), "--api-key", KEY,
                        "--max-tokens", "900") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1100,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    # Not the OpenBLAS that scripts/test.sh preloads for MLX: chromium's renderers crash with it.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    driver = webdriver.Chrome(options=options, service=Service(DRIVER, env=env))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser, server):
    """The page, loaded and given the API key; returns the browser."""
    browser.get(server)
    wait(browser, lambda d: not d.find_element(By.ID, "models-error").get_attribute("hidden"))
    assert "API key" in browser.find_element(By.ID, "models-error").text
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
    wait(browser, lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    return browser


def wait(driver, condition, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def field(driver, name: str, text: str) -> None:
    element = driver.find_element(By.ID, name)
    element.clear()
    element.send_keys(text)


def ask(driver, text: str) -> None:
    """Types TEXT and presses Enter; returns once the answer has its place on the page."""
    driver.execute_script(WATCH_ANSWER)
    count = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > count)


def idle(driver) -> bool:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "false"


def last_answer(driver) -> str:
    return driver.execute_script(
        "const a = document.querySelectorAll('.message.assistant .content');"
        "return a.length ? a[a.length - 1].textContent : null;")


def in_flight(server: str) -> int:
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        return json.load(response)["in_flight"]


def test_the_page_loads_nothing_from_elsewhere(server, page):
    with urllib.request.urlopen(server, timeout=10) as response:
        html = response.read().decode()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    local = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert local and all(link.startswith(("/static/", "data:")) for link in local)
    for link in local:
        if link.startswith("/"):
            with urllib.request.urlopen(server + link, timeout=10) as response:
                assert response.status == 200
    resources = page.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(server) for name in resources)


def test_the_picker_lists_the_model_and_its_adapter(page):
    options = Select(page.find_element(By.ID, "model")).options
    assert [o.get_attribute("value") for o in options] == ["helper", "base"]
    assert options[0].text == "helper (adapter on base)"


def test_an_answer_streams_in_and_is_the_servers_greedy_answer(page, client):
    Select(page.find_element(By.ID, "model")).select_by_value("base")
    field(page, "system", "Answer in Python.")
    field(page, "max-tokens", "120")
    ask(page, "hi")
    wait(page, idle)
    lengths = page.execute_script("return window.answerLengths")
    expected = client.chat.completions.create(
        model="base", max_tokens=120, temperature=0,
        messages=[{"role": "system", "content": "Answer in Python."},
                  {"role": "user", "content": "hi"}]).choices[0].message.content
    assert last_answer(page) == expected
    grown = [n for n in lengths if n]
    assert grown == sorted(grown) and len(set(grown)) >= 5, lengths  # in steps, not at once
    assert page.find_element(By.ID, "status").text == "Stopped at the token limit."


def test_stop_ends_the_answer_and_the_page_stays_usable(page, client, server):
    page.find_element(By.ID, "new-chat").click()
    field(page, "system", "")
    field(page, "max-tokens", "900")
    ask(page, "count")
    wait(page, lambda d: len(last_answer(d)) > 20)
    page.find_element(By.ID, "stop").click()
    wait(page, idle, timeout=5)
    stopped = last_answer(page)
    deadline = time.monotonic() + 3
    while in_flight(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(server) == 0  # the server cancelled the rest of the work
    time.sleep(0.5)
    assert last_answer(page) == stopped
    assert page.find_element(By.ID, "status").text == "Stopped."
    assert page.find_element(By.ID, "send").is_enabled()
    whole = client.chat.completions.create(model="base", temperature=0, max_tokens=900,
                                           messages=[{"role": "user", "content": "count"}])
    assert whole.choices[0].message.content.startswith(stopped)
    assert len(stopped) < len(whole.choices[0].message.content)

    page.find_element(By.ID, "new-chat").click()
    Select(page.find_element(By.ID, "model")).select_by_value("helper")
    for question in ("How do I serve a model?", "How do I stop an answer?"):
        ask(page, question)
        wait(page, idle)
    assert last_answer(page) == client.chat.completions.create(
        model="helper", temperature=0, messages=[
            {"role": "user", "content": "How do I serve a model?"},
            {"role": "assistant", "content": ANSWERS["How do I serve a model?"]},
            {"role": "user", "content": "How do I stop an answer?"}]).choices[0].message.content
    texts = [e.text for e in page.find_elements(By.CSS_SELECTOR, ".message .content")]
    assert texts == [text for question in ("How do I serve a model?", "How do I stop an answer?")
                     for text in (question, ANSWERS[question])]
    if os.environ.get("ELM_CHAT_SCREENSHOT"):  # how docs/img/chat.png is made
        page.save_screenshot(os.environ["ELM_CHAT_SCREENSHOT"])
