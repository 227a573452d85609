"""The chat page in a real headless Chromium: type a prompt, watch the answer stream in, coloured by expert."""

from __future__ import annotations

import os
import shutil

import pytest

from .server import live_server

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)


needs_chromium = pytest.mark.skipif(
    (CHROMIUM is None or DRIVER is None) and not os.environ.get("CI"),
    reason="Chromium is not installed (bash scripts/setup.sh --with-browser)",
)


def chromium(tmp_path):
    """A headless Chromium driven by selenium (its own profile under ``tmp_path``)."""
    assert CHROMIUM and DRIVER, "CI must run the browser test: bash scripts/setup.sh --with-browser installs Chromium"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


@needs_chromium
def test_chat_page_streams_coloured_tokens_with_legend_and_load_bars(model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with live_server(model, max_tokens_limit=64) as url:
        driver = chromium(tmp_path)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-moe")
            legend = driver.find_elements(By.CSS_SELECTOR, "#legend span")
            assert [e.text for e in legend] == [f"expert {i}" for i in range(4)]
            assert len(driver.find_elements(By.CSS_SELECTOR, "#layer option")) == 2
            driver.find_element(By.ID, "max").clear()
            driver.find_element(By.ID, "max").send_keys("40")
            driver.find_element(By.ID, "prompt").send_keys("Which experts answer?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-done='1']"))
            spans = driver.find_elements(By.CSS_SELECTOR, ".answer .tok")
            assert len(spans) > 3
            colours = {s.value_of_css_property("background-color") for s in spans}
            assert len(colours) >= 2 and "rgba(0, 0, 0, 0)" not in colours  # every token is coloured, not all alike
            bars = driver.find_elements(By.CSS_SELECTOR, ".bars .bar")
            assert len(bars) == 4 and sum(int(n.text) for n in driver.find_elements(
                By.CSS_SELECTOR, ".bars span:nth-child(3n)")) == len(spans)  # fmt: skip
            before = [s.value_of_css_property("background-color") for s in spans]
            driver.find_element(By.CSS_SELECTOR, "#layer option[value='1']").click()  # recolour by layer 1
            after = [s.value_of_css_property("background-color") for s in spans]
            assert before != after
            assert driver.save_screenshot(str(tmp_path / "chat.png"))
            assert (tmp_path / "chat.png").stat().st_size > 5000
        finally:
            driver.quit()


@needs_chromium
def test_with_an_api_key_the_browser_logs_in_with_it_and_the_page_chats(model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with live_server(model, max_tokens_limit=64, api_key="s3cret") as url:
        driver = chromium(tmp_path)
        try:
            driver.get(url + "/")  # no key: the server asks for one, the page is not served
            assert "tiny-moe" not in driver.page_source
            driver.get(url.replace("http://", "http://anyone:s3cret@") + "/")  # the key as the login's password
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-moe")  # its API calls pass too
            driver.find_element(By.ID, "max").clear()
            driver.find_element(By.ID, "max").send_keys("20")
            driver.find_element(By.ID, "prompt").send_keys("Who answers?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn[data-done='1']"))
            assert driver.find_elements(By.CSS_SELECTOR, ".answer .tok")
        finally:
            driver.quit()
