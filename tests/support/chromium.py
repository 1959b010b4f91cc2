"""Debian's headless Chromium as a peer, through selenium and chromium-driver (``make
peers``), with software WebGL (SwiftShader through ANGLE) for viewers that draw with
WebGL, and its console and network logs kept for the test to read."""

from __future__ import annotations

import logging
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
              "--no-first-run", "--disable-extensions")
# WebGL 2 in a headless Chromium without a GPU: ANGLE on SwiftShader, allowed explicitly.
_WEBGL = ("--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist")


def start_chromium(window: tuple[int, int] = (1400, 900), *, webgl: bool = False, logs: bool = False):
    """A selenium ``webdriver.Chrome``. ``webgl``: software WebGL 2 (else none at all);
    ``logs``: the console (``get_log("browser")``) and DevTools network events
    (``get_log("performance")``) are recorded."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: `make peers` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # selenium logs every answer of the driver at DEBUG (screenshots as base64, whose
    # random letters the suite's privacy scan would read as patient data): keep it quiet
    logging.getLogger("selenium").setLevel(logging.INFO)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (*_ARGUMENTS, *(_WEBGL if webgl else ("--disable-gpu",)), f"--window-size={window[0]},{window[1]}"):
        options.add_argument(argument)
    if logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
