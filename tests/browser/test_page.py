"""The web page in a real browser: Debian's chromium, headless, driven by Selenium through Debian's chromedriver,
against `paraplan serve` (uvicorn on 127.0.0.1, a real SQLite database, real training ranks).

The browser resolves no host but 127.0.0.1 (`--host-resolver-rules`), as on an air-gapped cluster: a page or docs
that reached for a CDN would come up blank and fail here. `.ci/browser-up` installs the browser; where it could
not (not root, no apt-get) these tests skip, except under CI (CI=true), where they fail.

`PARAPLAN_UPDATE_SCREENSHOT=1` writes the page's screenshot to docs/images/page.png (the README's); otherwise it
goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_server import TINY, TOKEN, Server, kill_processes_in

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "page.png"
WAIT_S = 60
# A search whose best plans are pipelined (tp 4 x pp 4), so the timeline has several stages: Llama 3 70B on 4 x 8
# H100 run by Megatron-LM. (Run by paraplan's executor, ZeRO-3 without a pipeline wins there: its pipelines keep
# whole fp32 gradients and add every micro-batch's into them, where Megatron-LM fuses the addition.)
SEARCH_FORM = {"gpu": "h100-sxm", "num-nodes": "4", "gpus-per-node": "8", "seq-len": "4096", "global-batch": "128",
               "framework": "megatron", "top-k": "5"}  # fmt: skip
SEARCH_MODEL = "llama3-70b"
# A Hugging Face config.json as published (the fields the reader takes): TinyLlama 1.1B.
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
             "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 2048}  # fmt: skip


def browser_paths() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why the browser tests cannot run here."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: pip install -e '.[dev]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return "chromium and chromedriver are not installed (run .ci/browser-up as root)"
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    paths = browser_paths()
    if isinstance(paths, str):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {paths}")
        pytest.skip(paths)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("page")
    started = Server(folder / "data", folder / "server.log")
    started.wait_ready()
    yield started
    started.stop()
    kill_processes_in(folder / "data")


# ================================================================================================ helpers


def wait_until(browser: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    def check(driver: Any) -> Any:
        for error in driver.find_elements("id", "error"):  # the page's (the docs have none)
            assert not error.is_displayed(), f"the page shows an error while waiting for {what}: {error.text}"
        return condition(driver)

    return WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(check, f"{what} (after {WAIT_S} s)")


def count(browser: Any, selector: str) -> int:
    return len(browser.find_elements("css selector", selector))


def fill(browser: Any, fields: dict[str, str]) -> None:
    from selenium.webdriver.support.ui import Select

    for field_id, value in fields.items():
        element = browser.find_element("id", field_id)
        if element.tag_name == "select":
            Select(element).select_by_value(value)
        else:
            element.clear()
            element.send_keys(value)


def open_page(browser: Any, server: Server) -> None:
    browser.get(server.url + "/")
    wait_until(browser, lambda b: count(b, "#model-preset option") and count(b, "#gpu option"), "the catalog")


def attributes(browser: Any, selector: str, attribute: str) -> list[str]:
    """`attribute` of every element `selector` finds, read in one script (a timeline has thousands of marks: one
    WebDriver round trip each would take seconds)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))"
    return browser.execute_script(script, selector, attribute)


def data_numbers(browser: Any, selector: str, attribute: str) -> list[float]:
    return [float(value) for value in attributes(browser, selector, attribute)]


def assert_no_error(browser: Any) -> None:
    error = browser.find_element("id", "error")
    assert not error.is_displayed(), error.text


# ================================================================================================== tests


def test_a_search_draws_its_plans_memory_timeline_breakdown_and_gpu_sweep(browser: Any, server: Server,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    open_page(browser, server)
    fill(browser, {"model-preset": SEARCH_MODEL, **SEARCH_FORM})
    browser.find_element("id", "search-button").click()
    wait_until(browser, lambda b: count(b, "#timeline-chart rect.task"), "the plans and the timeline")

    # The table is the stored search's ranking, row for row.
    status = browser.find_element("id", "search-status").text
    search = server.http.get(f"/v1/plans/{status.rsplit(' ', 1)[-1]}").json()
    plans = search["result"]["plans"]
    assert len(plans) == 5 and count(browser, "#plans tbody tr") == 5, search
    best = plans[0]
    first_row = browser.find_element("css selector", "#plans tbody tr").text
    assert f"dp{best['plan']['dp']} tp{best['plan']['tp']} pp{best['plan']['pp']}" in first_row, first_row

    # Memory: one stacked bar of five parts per pipeline stage, adding up to the stage's bytes; the limit drawn.
    stages = best["estimate"]["memory"]["by_stage"]
    assert best["plan"]["pp"] > 1 and len(stages) == best["plan"]["pp"], best["plan"]
    drawn = data_numbers(browser, "#memory-chart rect.segment", "data-bytes")
    assert len(drawn) == 5 * len(stages)
    for stage, parts in zip(stages, [drawn[i : i + 5] for i in range(0, len(drawn), 5)], strict=True):
        assert sum(parts) == pytest.approx(stage["total_bytes"], rel=1e-9), stage
    limits = data_numbers(browser, "#memory-chart line.limit", "data-bytes")
    assert search["result"]["memory_limit_bytes"] in limits

    # The step's breakdown: its terms add up to the terms the estimate gives.
    terms = data_numbers(browser, "#breakdown-chart rect.term", "data-seconds")
    assert sum(terms) == pytest.approx(sum(best["estimate"]["breakdown"].values()), rel=1e-9)

    # The timeline: forward and backward tasks on every stage, idle time (the bubble) behind them.
    kinds = set(attributes(browser, "#timeline-chart rect.task", "data-kind"))
    devices = set(attributes(browser, "#timeline-chart rect.task", "data-device"))
    assert {"forward", "backward"} <= kinds and len(devices) == best["plan"]["pp"], (kinds, devices)
    assert count(browser, "#timeline-chart rect.bubble") == best["plan"]["pp"]
    assert max(data_numbers(browser, "#timeline-chart rect.bubble", "data-idle-s")) > 0  # pipelines have a bubble

    # Exports link to the stored search's export route, for the chosen rank.
    links = dict(zip(attributes(browser, "#exports a", "data-target"), attributes(browser, "#exports a", "href"),
                     strict=True))  # fmt: skip
    assert set(links) == {"megatron", "deepspeed", "torchtitan", "accelerate", "request"}
    assert links["megatron"] == f"/v1/plans/{search['id']}/export?to=megatron&rank=1&raw=true"

    # A click fetches the export first: saved where the server has the export route, else the server's refusal.
    browser.find_element("css selector", "#exports a[data-target='request']").click()
    said = wait_until(browser, lambda b: b.find_element("id", "export-status").text, "the export's outcome")
    has_export = any(path.endswith("/export") for path in server.http.get("/openapi.json").json()["paths"])
    expected = "saved as request.json" if has_export else "Not Found"
    assert said.startswith("the contract request: ") and expected in said, said

    # The GPU-count sweep: a point per node count where a plan fits; the Pareto front marked.
    wait_until(browser, lambda b: count(b, "#scaling-time-chart circle.point"), "the GPU-count sweep")
    request = json.loads(json.dumps(search["request"]))
    points = server.http.post("/v1/scaling", json=request).json()["points"]
    fitting = [p for p in points if p["best"]]
    assert count(browser, "#scaling-time-chart circle.point") == len(fitting) >= 2, points
    assert count(browser, "#scaling-cost-chart circle.point") == len(fitting)
    drawn_gpus = data_numbers(browser, "#scaling-time-chart circle.point", "data-gpus")
    assert drawn_gpus == [p["num_gpus"] for p in fitting]
    pareto = attributes(browser, "#scaling-time-chart circle", "data-pareto")
    assert pareto == [str(p["pareto"]).lower() for p in fitting] and "true" in pareto

    # Choosing another plan redraws the detail for it.
    browser.find_element("css selector", "#plans tbody tr[data-rank='2']").click()
    wait_until(browser, lambda b: "Plan 2:" in b.find_element("id", "plan-title").text, "plan 2's detail")
    second = attributes(browser, "#exports a", "href")[0]
    assert second.endswith("rank=2&raw=true"), second

    browser.find_element("css selector", "#plans tbody tr[data-rank='1']").click()
    wait_until(browser, lambda b: "Plan 1:" in b.find_element("id", "plan-title").text, "plan 1's detail")
    screenshot = SCREENSHOT if os.environ.get("PARAPLAN_UPDATE_SCREENSHOT") else tmp_path / "page.png"
    browser.set_window_size(1400, browser.execute_script("return document.documentElement.scrollHeight") + 200)
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    browser.set_window_size(1400, 1000)


def test_a_pasted_hugging_face_config_is_searched_and_a_bad_one_named(browser: Any, server: Server) -> None:
    open_page(browser, server)
    fill(browser, {"gpu": "h100-sxm", "num-nodes": "1", "gpus-per-node": "8", "seq-len": "2048",
                   "global-batch": "64"})  # fmt: skip
    browser.find_element("id", "model-json").send_keys(json.dumps({**HF_CONFIG, "num_hidden_layers": "many"}))
    browser.find_element("id", "search-button").click()
    from selenium.webdriver.support.ui import WebDriverWait

    error = WebDriverWait(browser, WAIT_S).until(lambda b: b.find_element("id", "error").text or None)
    assert "num_layers" in error or "num_hidden_layers" in error, error

    browser.find_element("id", "model-json").clear()
    browser.find_element("id", "model-json").send_keys(json.dumps(HF_CONFIG))
    browser.find_element("id", "search-button").click()
    pasted = "hidden 2048"
    wait_until(browser, lambda b: count(b, "#plans tbody tr") and pasted in b.find_element("id", "model-info").text,
               "the pasted model's plans")  # fmt: skip
    info = browser.find_element("id", "model-info").text
    assert "22 layers" in info and "1.1" in info, info
    assert count(browser, "#memory-chart rect.segment") >= 5


def test_a_plan_is_trained_from_the_page_with_the_token_and_its_loss_drawn(browser: Any, server: Server) -> None:
    open_page(browser, server)
    training = TINY["training"]
    fill(browser, {"gpu": "cpu", "num-nodes": "1", "gpus-per-node": "2", "precision": "fp32", "top-k": "3",
                   "seq-len": str(training["seq_len"]),
                   "global-batch": str(training["global_batch_size"])})  # fmt: skip
    browser.find_element("id", "model-json").send_keys(json.dumps(TINY["model"]))
    browser.find_element("id", "search-button").click()
    wait_until(browser, lambda b: count(b, "#plans tbody tr"), "the tiny model's plans")
    fill(browser, {"job-steps": "6"})

    # Without the token the service refuses to start processes, and the page says so.
    browser.find_element("id", "run-job").click()
    refused = wait_until(browser, lambda b: "Authorization" in b.find_element("id", "run-status").text and
                         b.find_element("id", "run-status").text, "the refusal")  # fmt: skip
    assert server.http.get("/v1/jobs").json()["jobs"] == [], refused

    fill(browser, {"token": TOKEN})
    browser.find_element("id", "job-steps").click()  # the token field's change event stores it
    browser.find_element("id", "run-job").click()
    wait_until(browser, lambda b: "[SUCCEEDED]" in b.find_element("id", "job-log").text, "the job's end in its log")
    # The curve drawn while the job ran may hold fewer steps; the page redraws it when the job's log ends.
    wait_until(browser, lambda b: [c.get_attribute("data-points") for c in
                                   b.find_elements("css selector", "#loss-chart polyline.curve")] == ["6"],
               "the loss curve of all six steps")  # fmt: skip
    jobs = server.http.get("/v1/jobs").json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["state"] == "SUCCEEDED" and jobs[0]["steps_done"] == 6, jobs
    assert "paraplan.step" in browser.find_element("id", "job-log").text
    wait_until(browser, lambda b: jobs[0]["id"] in b.find_element("id", "job-table").text, "the job in the table")


def test_the_api_docs_load_from_the_server_alone(browser: Any, server: Server) -> None:
    browser.get(server.url + "/docs")
    wait_until(browser, lambda b: count(b, ".opblock") >= 10, "Swagger UI's operations")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(name.startswith(server.url) for name in resources), resources
    assert server.http.get("/redoc").status_code == 404
