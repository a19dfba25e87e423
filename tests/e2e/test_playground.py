"""The dashboard's playground (#/playground) in headless Chromium on a real stack: an
answer streams in from /v1/chat/completions and is its job's stored output, the next
message sends the whole conversation, Compare streams one message to two models at once,
Stop cancels the job, and a refusal shows in the pane."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_CHAT_MODEL, TINY_MODEL, install_tiny_chat_model
from tests.support.browser import PAGE_TIMEOUT_S, sign_in
from tests.support.harness import Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    # One backend is enough: the page reads the same API on both.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

SECOND_CHAT_MODEL = "tiny-gpt2-chat-b"
SCREENSHOT_COPY = Path("/tmp/modelyard-playground.png")
ANSWER_TIMEOUT_S = 120
FINISHED = ("done", "stopped", "error")

# Counts the redraws of each answer's text, to see it grow chunk by chunk.
COUNT_REDRAWS = """
window.__lengths = [];
new MutationObserver(() => {
  for (const node of document.querySelectorAll('#pane-0 .msg.assistant .msg-text')) {
    window.__lengths.push(node.textContent.length);
  }
}).observe(document.getElementById('playground'), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def chat_stack(stack: Stack, tiny_model_dir: Path) -> Stack:
    data = stack.workdir / "data"
    install_tiny_chat_model(tiny_model_dir, data)
    shutil.copytree(
        data / "models" / TINY_CHAT_MODEL, data / "models" / SECOND_CHAT_MODEL, dirs_exist_ok=True
    )
    return stack


def open_playground(browser: Any, stack: Stack) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sign_in(browser, stack)
    browser.get(f"{stack.base_url}/ui/#/playground")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#playground[data-loaded='true']")
    )


def settings(browser: Any, max_tokens: int, temperature: float) -> None:
    from selenium.webdriver.common.by import By

    for field, value in (("max-tokens", max_tokens), ("temperature", temperature)):
        box = browser.find_element(By.ID, f"playground-{field}")
        box.clear()
        box.send_keys(str(value))


def pick(browser: Any, pane: int, model: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.CSS_SELECTOR, f"#pane-{pane} select.model")).select_by_value(
        model
    )


def send(browser: Any, message: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "playground-input").send_keys(message)
    browser.find_element(By.ID, "playground-send").click()


def answers(browser: Any, pane: int) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, f"#pane-{pane} .msg.assistant"))


def finished_answer(browser: Any, pane: int, count: int) -> dict[str, str]:
    """The pane's `count`th answer once it ended: its state, job id, text and link."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ended(d: Any) -> Any:
        shown = answers(d, pane)
        if len(shown) >= count and shown[count - 1].get_attribute("data-state") in FINISHED:
            return shown[count - 1]
        return None

    node = WebDriverWait(browser, ANSWER_TIMEOUT_S).until(ended)
    links = node.find_elements(By.CSS_SELECTOR, "a.job-link")
    errors = node.find_elements(By.CSS_SELECTOR, ".msg-error")
    return {
        "state": node.get_attribute("data-state"),
        "job_id": node.get_attribute("data-job-id"),
        "text": node.find_element(By.CSS_SELECTOR, ".msg-text").get_property("textContent"),
        "href": links[0].get_attribute("href") if links else "",
        "error": errors[0].text if errors else "",
    }


def test_playground_streams_an_answer_that_is_its_jobs_output(
    chat_stack: Stack, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = chat_stack
    open_playground(browser, stack)
    options = [
        o.get_attribute("value")
        for o in browser.find_elements(By.CSS_SELECTOR, "#pane-0 select.model option")
    ]
    assert TINY_CHAT_MODEL in options and SECOND_CHAT_MODEL in options
    assert TINY_MODEL not in options  # no chat template
    browser.execute_script(COUNT_REDRAWS)
    pick(browser, 0, TINY_CHAT_MODEL)
    settings(browser, max_tokens=32, temperature=0)
    send(browser, "Where is my parcel?")

    first = finished_answer(browser, 0, 1)
    assert first["state"] == "done", first
    assert first["job_id"] and first["href"].endswith(f"#/jobs/{first['job_id']}")
    [stored] = stack.outputs(first["job_id"])
    assert first["text"] == stored["text"] and stored["text"]
    grew = {n for n in browser.execute_script("return window.__lengths") if n}
    assert len(grew) > 1, grew  # drawn chunk by chunk, not once at the end
    job = stack.job(first["job_id"])
    assert job["spec"]["model"] == TINY_CHAT_MODEL
    assert job["spec"]["max_new_tokens"] == 32 and job["spec"]["temperature"] == 0

    send(browser, "And when will it come?")
    second = finished_answer(browser, 0, 2)
    assert second["state"] == "done", second
    assert second["job_id"] != first["job_id"]
    [conversation] = stack.job(second["job_id"])["spec"]["messages"]
    assert conversation == [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": stored["text"]},
        {"role": "user", "content": "And when will it come?"},
    ]
    [stored_second] = stack.outputs(second["job_id"])
    assert second["text"] == stored_second["text"]
    assert browser.find_element(By.ID, "banner").get_attribute("hidden") is not None

    browser.find_element(By.CSS_SELECTOR, "#pane-0 a.job-link").click()
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-page[data-loaded='complete']")
    )
    assert browser.find_element(By.ID, "job-page").get_attribute("data-job") == first["job_id"]
    browser.back()  # the conversation is still there
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#playground[data-loaded='true']")
    )
    assert len(answers(browser, 0)) == 2
    assert finished_answer(browser, 0, 1)["text"] == first["text"]


def test_compare_streams_one_message_to_two_models(
    chat_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    stack = chat_stack
    open_playground(browser, stack)
    assert not browser.find_element(By.ID, "pane-1").is_displayed()
    browser.find_element(By.ID, "playground-compare").click()
    assert browser.find_element(By.ID, "pane-1").is_displayed()
    pick(browser, 0, TINY_CHAT_MODEL)
    pick(browser, 1, SECOND_CHAT_MODEL)
    settings(browser, max_tokens=48, temperature=0.8)
    send(browser, "Compare these two")

    left, right = finished_answer(browser, 0, 1), finished_answer(browser, 1, 1)
    assert left["state"] == right["state"] == "done", (left, right)
    assert left["job_id"] and right["job_id"] and left["job_id"] != right["job_id"]
    for shown, model in ((left, TINY_CHAT_MODEL), (right, SECOND_CHAT_MODEL)):
        assert stack.job(shown["job_id"])["spec"]["model"] == model
        [stored] = stack.outputs(shown["job_id"])
        assert shown["text"] == stored["text"]
        assert shown["href"].endswith(f"#/jobs/{shown['job_id']}")
    # Both requests were sent at once (one worker may still decode the two models in turn).
    created = [stack.job(s["job_id"])["created_at"] for s in (left, right)]
    finished = [stack.job(s["job_id"])["finished_at"] for s in (left, right)]
    assert max(created) < min(finished)

    screenshot = tmp_path / "modelyard-playground.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"playground screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")  # noqa: T201


def test_stop_aborts_the_stream_and_the_job_is_cancelled(chat_stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = chat_stack
    open_playground(browser, stack)
    pick(browser, 0, TINY_CHAT_MODEL)
    settings(browser, max_tokens=4000, temperature=1)
    send(browser, "Tell me everything")
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda d: (
            answers(d, 0)
            and answers(d, 0)[0]
            .find_element(By.CSS_SELECTOR, ".msg-text")
            .get_property("textContent")
        )
    )
    assert browser.find_element(By.ID, "playground-send").get_attribute("disabled") is not None
    # The worker is held while Stop is clicked: the tiny model writes 4000 tokens in a few
    # seconds, and a busy machine could otherwise deliver the whole answer first.
    for worker in stack.workers:
        os.kill(worker.pid, signal.SIGSTOP)
    try:
        browser.find_element(By.ID, "playground-stop").click()
        stopped = finished_answer(browser, 0, 1)
    finally:
        for worker in stack.workers:
            os.kill(worker.pid, signal.SIGCONT)
    assert stopped["state"] == "stopped", stopped
    assert stopped["text"]
    assert browser.find_element(By.ID, "playground-stop").get_attribute("disabled") is not None
    job = stack.wait_status(stopped["job_id"], ("cancelled", "succeeded", "failed"))
    assert job["status"] == "cancelled", job


def test_a_refused_request_shows_its_error_in_the_pane(chat_stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    stack = chat_stack
    open_playground(browser, stack)
    # a model the page does not offer (no chat template), chosen as a stale page would
    browser.execute_script(
        """
        const select = document.querySelector('#pane-0 select.model');
        select.append(new Option(arguments[0], arguments[0]));
        select.value = arguments[0];
        select.dispatchEvent(new Event('change'));
        """,
        TINY_MODEL,
    )
    send(browser, "Hello?")
    refused = finished_answer(browser, 0, 1)
    assert refused["state"] == "error", refused
    assert refused["error"].startswith("invalid_request_error:"), refused
    assert not refused["job_id"]
    assert browser.find_element(By.ID, "banner").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "playground-send").get_attribute("disabled") is None
