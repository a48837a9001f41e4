"""The web UI in a real headless browser (Debian's chromium, driven by Selenium through Debian's
chromedriver) against the real stack: upload, ask, watch the answer stream in, keep the
conversation, see a task's boxes. A screenshot of each run is saved under build/test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import REPO_ROOT, encode, picture, require_tool
from tests.integration.conftest import KEY, free_ports
from vlm.v1 import vlm_pb2
from vlm_client.client import VLMClient

pytestmark = pytest.mark.integration
ARTIFACTS = REPO_ROOT / "build" / "test-artifacts"
# Installed before asking: the last answer bubble's text every time the page changes it, and the
# answer's facts once the page shows new ones (the stream's end; until then the facts panel shows
# the previous answer's facts or "Thinking…").
RECORD_ANSWERS = """
window.seen = []; window.facts = null;
const changes = {subtree: true, childList: true, characterData: true};
const factsNow = () => document.querySelector('#details .prose').innerText;
const before = factsNow();
new MutationObserver(() => {
  const answers = document.querySelectorAll('#chat .bot');
  if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
}).observe(document.querySelector('#chat'), changes);
new MutationObserver(() => {
  const facts = factsNow();
  if (facts.includes('finish') && facts !== before) window.facts = facts;
}).observe(document.querySelector('#details'), changes);
"""


def letters(text: str) -> str:
    """What survives Markdown rendering of any text: its letters and digits, in order (the page renders
    answers as Markdown, so `*`, `#`, backticks and spacing change; the words do not)."""
    return re.sub(r"[\W_]+", "", text)


@pytest.fixture(scope="module")
def webui(gateway, tmp_path_factory):
    port, = free_ports(1)
    log = tmp_path_factory.mktemp("webui") / "webui.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "vlm_client.webui", "--address", gateway.address,
                                    "--port", str(port)], env={**os.environ, "VLM_API_KEY": KEY},
                                   stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require_tool(bool(chromium and driver), "chromium and chromedriver not installed (Debian: chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.implicitly_wait(0)
    yield browser
    browser.quit()


def wait_for(condition, timeout=60.0, what="the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ask textarea"), what="the page to load")
    assert browser.title == "Vision-language models"


def ask(browser, text, image=None):
    """Type `text` (after adding `image`) into the question box and send it; waits for the answer's
    facts to be shown (the stream's end) and returns them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, "#ask textarea")
    if image is not None:
        browser.find_element(By.CSS_SELECTOR, "#ask input[type=file]").send_keys(str(image))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#ask img"), what="the upload's thumbnail")
    browser.execute_script(RECORD_ANSWERS)
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    return wait_for(lambda: browser.execute_script("return window.facts"), what="the answer to end")


def answers(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('#chat .bot')].map(b => b.textContent)")


def shows(browser, texts):
    """The chat's answers become `texts` (the last text can land a moment after the answer's facts)."""
    try:
        wait_for(lambda: [letters(text) for text in answers(browser)] == [letters(text) for text in texts], 10)
    except AssertionError:
        assert [letters(text) for text in answers(browser)] == [letters(text) for text in texts]
    assert all(letters(text) for text in texts)


def test_ask_about_an_uploaded_image_and_watch_the_answer_stream_in(webui, gateway, browser, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(encode(picture(160, 120, seed=11)))
    open_page(browser, webui)

    first = ask(browser, "What is in this picture?", image)

    # The same request over gRPC (greedy, so one answer): the page shows exactly that answer.
    options = dict(max_tokens=256, temperature=0.0, top_p=1.0)
    with VLMClient(gateway.address, api_key=KEY) as client:
        question = vlm_pb2.Message(role="user", parts=[vlm_pb2.Part(image=vlm_pb2.Image(data=image.read_bytes())),
                                                       vlm_pb2.Part(text="What is in this picture?")])
        expected = client.generate("auto", messages=[question], **options)
    shows(browser, [expected.text])
    assert f"Model {expected.model}" in first and "Route" in first and "confidence" in first
    # Streamed: the page showed the answer growing, each time a beginning of the final text.
    # ("Loading content" is Gradio's placeholder bubble before the first text.)
    seen = {letters(text) for text in browser.execute_script("return window.seen")} - {"", "Loadingcontent"}
    growing = sorted(seen, key=len)
    assert len(growing) >= 3, f"the answer appeared in {len(growing)} steps, not streamed"
    assert all(letters(expected.text).startswith(text) for text in growing), growing

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "webui.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second turn is asked with the whole conversation: the answer equals gRPC's with that history.
    ask(browser, "And what colours does it have?")
    history = [question, vlm_pb2.Message(role="assistant", parts=[vlm_pb2.Part(text=expected.text)])]
    with VLMClient(gateway.address, api_key=KEY) as client:
        follow_up = client.generate("auto", messages=[*history, vlm_pb2.Message(
            role="user", parts=[vlm_pb2.Part(text="And what colours does it have?")])], **options)
    shows(browser, [expected.text, follow_up.text])

    # The page holds no API key: not in its HTML, not in the configuration it loads.
    from selenium.webdriver.common.by import By

    assert KEY not in browser.page_source
    assert KEY not in urllib.request.urlopen(webui + "config", timeout=5).read().decode()
    browser.find_element(By.ID, "new").click()
    wait_for(lambda: not answers(browser), what="a new conversation")


def test_a_grounding_task_draws_its_boxes_on_the_image(webui, gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "street.png"
    image.write_bytes(encode(picture(200, 150, seed=0)))
    open_page(browser, webui)
    browser.find_element(By.CSS_SELECTOR, "#model input").click()
    browser.find_element(By.CSS_SELECTOR, '#model li[aria-label="qwen2.5-vl"]').click()
    browser.find_element(By.CSS_SELECTOR, "#task input").click()
    browser.find_element(By.CSS_SELECTOR, '#task li[aria-label="Find objects (grounding, with boxes)"]').click()

    ask(browser, "Find the cars.", image)

    with VLMClient(gateway.address, api_key=KEY) as client:
        expected = client.generate("qwen2.5-vl", "Find the cars.", [image], task="grounding", max_tokens=256,
                                   temperature=0.0, top_p=1.0)
    # The tiny Qwen2.5-VL answers this picture with boxes (greedy, so always the same ones); its
    # random weights put most or all of them outside the picture, which the page says.
    found, outside = len(expected.detections.detections), expected.detections.boxes_outside
    assert found + outside >= 1
    if found:
        panel = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#boxes img"), what="the boxes panel")
        assert panel[0].is_displayed()
        assert f"image 1: {found} box" in browser.find_element(By.ID, "boxes").text
    if outside:
        note = f"{outside} box{'es' if outside != 1 else ''} outside the image, not drawn"
        wait_for(lambda: note in browser.find_element(By.ID, "result").text, what="the note of the boxes outside")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "webui-grounding.png"))


def test_a_visitor_cannot_name_a_file_on_the_server(webui, tmp_path):
    # Gradio's own API takes file references; one that was not uploaded through the page is refused
    # before any handler reads it (the page's uploads are the only files a question can carry).
    import json

    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(picture(20, 20)))
    def ask_by_api(question, video=None):
        settings = ["pixtral", "none", 4, 0, 1, "default", video, 2, 32]
        call = urllib.request.Request(webui + "gradio_api/call/respond", method="POST",
                                      headers={"Content-Type": "application/json"},
                                      data=json.dumps({"data": [question, *settings]}).encode())
        event = json.loads(urllib.request.urlopen(call, timeout=10).read())["event_id"]
        return urllib.request.urlopen(f"{webui}gradio_api/call/respond/{event}", timeout=60).read().decode()

    assert "event: complete" in ask_by_api({"text": "hi", "files": []})  # the call itself is right
    reference = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    for answer in (ask_by_api({"text": "hi", "files": [reference]}), ask_by_api({"text": "hi", "files": []}, reference)):
        assert answer.startswith("event: error") and "complete" not in answer
