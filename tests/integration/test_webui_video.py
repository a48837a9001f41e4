"""The web UI's video upload in a real headless browser against the real stack (issue 27, item 4):
the page shows the frames the service samples at the chosen max frames, sends the clip with that
sampling, and shows the answer the gRPC API gives for the same clip."""

from __future__ import annotations

import pytest
from vlm.v1 import vlm_pb2

from tests.integration.conftest import KEY
from tests.integration.test_cli_video import moving_square
from tests.integration.test_webui import (ARTIFACTS, ask, browser, open_page, shows,  # noqa: F401 (fixtures)
                                          wait_for, webui)
from tests.unit.test_video import encode as encode_clip
from vlm_client.client import VLMClient
from vlm_serving.preprocessing.video import decode_video

pytestmark = pytest.mark.integration


def frames_shown(browser) -> int:
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, "#frames img"))


def test_a_clip_is_previewed_as_sampled_sent_with_that_sampling_and_answered(webui, gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    clip = tmp_path / "square.mp4"
    clip.write_bytes(encode_clip("h264", frames=32, rate=8, size=(96, 72), paint=moving_square))
    open_page(browser, webui)

    browser.find_element(By.CSS_SELECTOR, "#video input[type=file]").send_keys(str(clip))
    at_defaults = len(decode_video(clip.read_bytes(), fps=2, max_frames=32).frames)
    wait_for(lambda: frames_shown(browser) == at_defaults, 30, f"{at_defaults} sampled frames")
    max_frames = browser.find_element(By.CSS_SELECTOR, "#max-frames input[type=number]")
    max_frames.send_keys(Keys.CONTROL, "a")
    max_frames.send_keys("4", Keys.TAB)
    wait_for(lambda: frames_shown(browser) == 4, 30, "4 sampled frames")
    assert "4 frames" in browser.find_element(By.ID, "frames-note").text

    facts = ask(browser, "What moves?")

    with VLMClient(gateway.address, api_key=KEY) as client:
        expected = client.generate("auto", messages=[vlm_pb2.Message(role="user", parts=[
            vlm_pb2.Part(video=vlm_pb2.Video(data=clip.read_bytes(), fps=2, max_frames=4)),
            vlm_pb2.Part(text="What moves?")])], max_tokens=256, temperature=0.0, top_p=1.0)
    assert expected.model == "qwen2.5-vl" and f"Model {expected.model}" in facts and "Route video" in facts
    shows(browser, [expected.text])
    assert browser.find_elements(By.CSS_SELECTOR, "#chat video"), "the clip is shown in the question's bubble"
    assert frames_shown(browser) == 4, "the frames sent stay shown"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "webui_video.png"))
