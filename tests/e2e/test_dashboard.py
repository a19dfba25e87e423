"""The dashboard at /ui in headless Chromium (Selenium + Debian's chromium-driver): a
short fine-tune runs to success on a real stack, its page shows the loss chart with
one vertex per train_loss point the metrics API returns, the eval report and
confusion matrix, checkpoints and events; a screenshot is saved. A DPO job's page charts
TRL's per-step rewards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_MODEL
from tests.e2e.test_finetune import CLS_MODEL, submit, upload
from tests.support.browser import PAGE_TIMEOUT_S, sign_in
from tests.support.datasets import write_sentiment_csv
from tests.support.harness import Stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    # One backend is enough: the page reads the same API on both.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

SCREENSHOT_COPY = Path("/tmp/modelyard-ui.png")


@pytest.fixture(scope="module")
def cls_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    from tests.support.tiny_encoder import build_tiny_bert_classifier

    path = build_tiny_bert_classifier(tmp_path_factory.mktemp("encoders") / CLS_MODEL, ["a", "b"])
    shutil.copytree(path, stack.workdir / "data" / "models" / CLS_MODEL, dirs_exist_ok=True)
    return stack


def api_metrics(stack: Stack, job_id: str, name: str) -> list[dict[str, Any]]:
    with stack.client() as c:
        body = c.get(f"/v1/jobs/{job_id}/metrics", params={"name": name, "limit": 5000}).json()
    assert not body["has_more"]
    rows: list[dict[str, Any]] = body["data"]
    return rows


def test_dashboard_shows_a_finished_finetune(
    cls_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = cls_stack
    dataset = upload(stack, write_sentiment_csv(tmp_path / "sentiment.csv"))
    job = submit(
        stack,
        "finetune",
        {
            "base_model": CLS_MODEL,
            "task": "sequence_classification",
            "training_dataset": dataset,
            "hyperparameters": {
                "max_steps": 40,
                "batch_size": 8,
                "eval_steps": 10,
                "learning_rate": 5e-3,
                "seed": 3,
            },
        },
    )
    done = stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"
    losses = api_metrics(stack, job["id"], "train_loss")
    rates = api_metrics(stack, job["id"], "learning_rate")
    assert len(losses) >= 4

    sign_in(browser, stack)
    browser.get(f"{stack.base_url}/ui/#/jobs/{job['id']}")
    page = WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-page[data-loaded='complete']")
    )
    assert page.get_attribute("data-status") == "succeeded"

    chart = browser.find_element(By.CSS_SELECTOR, "svg[data-chart='loss']")
    line = chart.find_element(By.CSS_SELECTOR, "polyline[data-series='train_loss']")
    vertices = line.get_attribute("points").split()
    assert len(vertices) == len(losses)
    markers = chart.find_elements(By.CSS_SELECTOR, "g[data-series='train_loss'] circle")
    assert len(markers) == len(losses)
    lr_line = chart.find_element(By.CSS_SELECTOR, "polyline[data-series='learning_rate']")
    assert len(lr_line.get_attribute("points").split()) == len(rates)
    assert browser.find_elements(By.CSS_SELECTOR, "svg[data-chart='eval'] polyline")

    report = browser.find_element(By.ID, "eval-report").text
    for label in ("neg", "pos", "macro avg", "weighted avg"):
        assert label in report
    matrix = browser.find_elements(By.CSS_SELECTOR, "#confusion-matrix tbody tr")
    assert len(matrix) == 2
    checkpoint_rows = browser.find_elements(By.CSS_SELECTOR, "#checkpoints-table tbody tr")
    with stack.client() as c:
        assert len(checkpoint_rows) == len(
            c.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        )
    event_rows = browser.find_elements(By.CSS_SELECTOR, "#events-table tbody tr")
    assert len(event_rows) == len(stack.events(job["id"]))
    assert browser.find_element(By.ID, "banner").get_attribute("hidden") is not None

    screenshot = tmp_path / "modelyard-ui.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"dashboard screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")  # noqa: T201

    browser.get(f"{stack.base_url}/ui/#/?kind=finetune&status=succeeded")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#jobs-table tr[data-job='{job['id']}']")
    )


def test_dashboard_charts_a_dpo_jobs_rewards(
    cls_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = cls_stack
    pairs = tmp_path / "pairs.jsonl"
    pair = {"prompt": "Fresh bread", "chosen": " every morning", "rejected": " never"}
    pairs.write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "prompt": "Rye"}) + "\n")
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "objective": "dpo",
        "training_dataset": upload(stack, pairs),
        "hyperparameters": {"max_steps": 3, "batch_size": 2, "learning_rate": 5e-3},
    }
    job = submit(stack, "finetune", spec)
    done = stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"

    sign_in(browser, stack)
    browser.get(f"{stack.base_url}/ui/#/jobs/{job['id']}")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-page[data-loaded='complete']")
    )
    chart = browser.find_element(By.CSS_SELECTOR, "svg[data-chart='rewards']")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        line = chart.find_element(By.CSS_SELECTOR, f"polyline[data-series='{name}']")
        assert len(line.get_attribute("points").split()) == len(api_metrics(stack, job["id"], name))


MARKUP = '<img src="x" onerror="window.__pwned = 1"><script>window.__pwned = 2</script>'
MARKUP_KEY = "note"  # keys are restricted to [A-Za-z0-9_.-]


def test_dashboard_shows_markup_in_job_data_as_text(cls_stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    job = cls_stack.submit({"duration_s": 0}, kind="noop", metadata={MARKUP_KEY: MARKUP})
    cls_stack.wait_status(job["id"], ("succeeded",))
    sign_in(browser, cls_stack)
    browser.get(f"{cls_stack.base_url}/ui/#/jobs/{job['id']}")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-page[data-loaded='complete']")
    )
    cells = browser.find_elements(By.CSS_SELECTOR, "#job-metadata th, #job-metadata td")
    assert [c.text for c in cells] == [MARKUP_KEY, MARKUP]
    assert not browser.find_elements(By.CSS_SELECTOR, "#view img, #view script")
    assert browser.execute_script("return window.__pwned === undefined")


def sent_headers(browser: Any, path_part: str) -> list[dict[str, str]]:
    """Headers of the requests the page sent to URLs containing `path_part`."""
    found = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        request = message["params"]["request"]
        if path_part in request["url"]:
            found.append({k.lower(): v for k, v in request["headers"].items()})
    return found


def test_dashboard_sends_the_api_key_it_was_given(
    cls_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    job = cls_stack.submit({"duration_s": 0}, kind="noop")
    browser.get(f"{cls_stack.base_url}/ui/")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: sent_headers(d, "/v1/jobs"))
    assert all("authorization" not in h for h in sent_headers(browser, "/v1/jobs"))
    assert not browser.find_elements(By.CSS_SELECTOR, f"#jobs-table tr[data-job='{job['id']}']")
    browser.save_screenshot(str(tmp_path / "jobs.png"))
    key = cls_stack.api_key
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.ID, "key-state").text == "key set for this tab"
    )
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: any(
            h.get("authorization") == f"Bearer {key}" for h in sent_headers(d, "/v1/jobs")
        )
    )
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#jobs-table tr[data-job='{job['id']}']")
    )
    assert browser.execute_script("return sessionStorage.getItem('modelyard.apiKey')") == key
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""


def test_dashboard_plots_a_monitors_negative_share(cls_stack: Stack, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = cls_stack
    with stack.client() as c:
        resp = c.post(
            "/v1/monitors",
            json={
                "name": "ui-monitor",
                "model": CLS_MODEL,
                "negative_label": "a",
                "window": {"items": 4},
                "rule": {"share_above": 0.5, "min_items": 4},
            },
        )
        assert resp.status_code == 201, resp.text
        mon = resp.json()
        for batch in (["good news"] * 4, ["bad news"] * 4, ["more news"] * 4):
            posted = c.post(f"/v1/monitors/{mon['id']}/items", json={"texts": batch})
            assert posted.status_code == 202, posted.text
            stack.wait_status(posted.json()["job_id"], ("succeeded",))
        history = c.get(f"/v1/monitors/{mon['id']}").json()["history"]
    assert len(history) == 3

    sign_in(browser, stack)
    browser.get(f"{stack.base_url}/ui/#/monitors/{mon['id']}")
    page = WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#monitor-page[data-loaded='true']")
    )
    assert page.get_attribute("data-evaluations") == "3"
    chart = browser.find_element(By.CSS_SELECTOR, "svg[data-chart='monitor-share']")
    line = chart.find_element(By.CSS_SELECTOR, "polyline[data-series='negative_share']")
    assert len(line.get_attribute("points").split()) == len(history)
    assert chart.find_elements(By.CSS_SELECTOR, "polyline[data-series='threshold']")
    shares = browser.find_elements(By.CSS_SELECTOR, "#monitor-shares tbody tr")
    assert len(shares) == len(mon["labels"])


def test_dashboard_charts_a_reinforcement_jobs_grader_score(
    cls_stack: Stack, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    stack = cls_stack
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}], "answer": a}
        for q, a in (("Fresh bread?", "every morning"), ("Rye?", "on Fridays"))
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    grader = {
        "type": "text_similarity",
        "name": "close",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match",
    }
    spec = {
        "base_model": TINY_MODEL,
        "task": "causal_lm",
        "objective": "reinforcement",
        "reinforcement": {"grader": grader, "generations": 2, "max_completion_tokens": 3},
        "training_dataset": upload(stack, prompts),
        "hyperparameters": {"max_steps": 2, "batch_size": 2, "learning_rate": 5e-3},
    }
    job = submit(stack, "finetune", spec)
    done = stack.wait_status(job["id"], ("succeeded", "failed", "cancelled"), timeout=180)
    assert done["status"] == "succeeded", f"{done}\n{stack.logs()}"

    sign_in(browser, stack)
    browser.get(f"{stack.base_url}/ui/#/jobs/{job['id']}")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#job-page[data-loaded='complete']")
    )
    chart = browser.find_element(By.CSS_SELECTOR, "svg[data-chart='grader']")
    for name in ("rewards/grader/mean", "rewards/grader/std", "completions/mean_length"):
        line = chart.find_element(By.CSS_SELECTOR, f"polyline[data-series='{name}']")
        points = len(api_metrics(stack, job["id"], name))
        assert points == 2 and len(line.get_attribute("points").split()) == points
    assert not browser.find_elements(By.CSS_SELECTOR, "svg[data-chart='rewards']")
