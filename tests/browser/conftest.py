"""Browser tests: the real app (`python app.py --profile offline`) in a subprocess, driven by Playwright in Debian's
Chromium (installed by scripts/install_browser.sh; `playwright install` is not used).

Without Chromium or the playwright package these tests skip, saying why; with AUDIOSCRIBE_REQUIRE_BROWSER=1 (set by
.ci/run) they fail instead. Screenshots go to $AUDIOSCRIBE_ARTIFACTS or tests/browser/artifacts/ (gitignored),
one per ``screenshot()`` call and one per failed test (``<test>-FAILED.png``), beside the app's log (app.log).
Deselect them with ``-m "not browser"``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "offline"
VIEWPORT = {"width": 1400, "height": 900}
REQUIRE_ENV = "AUDIOSCRIBE_REQUIRE_BROWSER"
CHROMIUM_ENV = "AUDIOSCRIBE_CHROMIUM"  # a Chromium binary other than `chromium` on PATH
ARTIFACTS_ENV = "AUDIOSCRIBE_ARTIFACTS"
DEFAULT_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
STARTUP_TIMEOUT_S = 180  # the offline profile loads in ~15 s here; CI's first start may be slower
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

_REPORTS = pytest.StashKey[dict]()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "browser: drives the app in a real browser (tests/browser)")


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test, so fixtures can tell in teardown whether it failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, but {REQUIRE_ENV}=1 requires the browser tests to run "
                    "(install with: bash scripts/install_browser.sh)", pytrace=False)
    pytest.skip(f"{reason} (install with: bash scripts/install_browser.sh)")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


# --- artifacts -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    configured = os.environ.get(ARTIFACTS_ENV)
    directory = Path(configured).expanduser().resolve() if configured else DEFAULT_ARTIFACTS
    directory.mkdir(parents=True, exist_ok=True)
    if not configured:  # our own folder: no stale screenshots from an earlier run
        for old in directory.glob("*"):
            if old.is_file() and old.suffix in (".png", ".log", ".txt"):
                old.unlink()
    return directory


# --- the browser ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium_path() -> str:
    if importlib.util.find_spec("playwright") is None:
        _unavailable("the playwright package is not installed")
    configured = os.environ.get(CHROMIUM_ENV)
    path = configured or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not os.access(path, os.X_OK):
        _unavailable(f"no Chromium found ({CHROMIUM_ENV}={configured!r}, `chromium` not on PATH)")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path, tmp_path_factory) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        except Exception as error:  # a broken install: report it the same way as a missing one
            _unavailable(f"Chromium at {chromium_path} did not start: {error}")
        yield browser
        browser.close()


# --- the app -------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_env(cache: Path, uploads: Path) -> dict[str, str]:
    """The test process' environment without AudioScribe settings (the profile alone decides), offline, with its
    own model cache and upload folder."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("AUDIOSCRIBE_") and ("__" in k or k == "AUDIOSCRIBE_PROFILE"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               AUDIOSCRIBE_CACHE=str(cache), GRADIO_TEMP_DIR=str(uploads), PYTHONUNBUFFERED="1")
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def app_url(chromium_path, tmp_path_factory, artifacts_dir) -> Iterator[str]:
    """`python app.py --profile offline` on a free port; the URL once it answers. Its log: artifacts/app.log."""
    root = tmp_path_factory.mktemp("browser-app")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = artifacts_dir / "app.log"
    command = [sys.executable, "app.py", "--profile", PROFILE, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=_app_env(root / "cache", root / "uploads"),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with status {process.returncode} before serving:\n{_tail(log_path)}",
                            pytrace=False)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer at {url} within {STARTUP_TIMEOUT_S} s:\n{_tail(log_path)}",
                            pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# --- one page per test ---------------------------------------------------------------------------------------------

class PageErrors(list):
    """Uncaught JavaScript errors and console errors of one page, as text."""


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
def page(browser, app_url, request, artifacts_dir, page_errors) -> Iterator:
    """A fresh browser context at 1400x900 with the app loaded (its tabs shown). On failure: a full-page screenshot
    and the page's errors beside it."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("pageerror", lambda error: page_errors.append(f"pageerror: {error}"))
    page.on("console", lambda message: message.type == "error" and page_errors.append(f"console: {message.text}"))
    try:
        page.goto(app_url)
        expect(page.get_by_role("tab").first).to_be_visible(timeout=60_000)
        yield page
    finally:
        reports = request.node.stash.get(_REPORTS, {})
        if any(r.failed for r in reports.values()):
            name = _safe_name(request.node.name)
            try:
                page.screenshot(path=artifacts_dir / f"{name}-FAILED.png", full_page=True)
            except Exception:  # the page may be gone; the test's own error says more
                pass
            if page_errors:
                (artifacts_dir / f"{name}-FAILED.txt").write_text("\n".join(page_errors) + "\n")
        context.close()


@pytest.fixture
def screenshot(page, request, artifacts_dir) -> Callable[[str], Path]:
    """``screenshot("after-describe")`` saves a full-page PNG as artifacts/<test>-<what>.png and returns its path."""
    def save(what: str = "") -> Path:
        name = _safe_name(request.node.name + (f"-{what}" if what else ""))
        path = artifacts_dir / f"{name}.png"
        page.screenshot(path=path, full_page=True)
        return path
    return save


# --- the README's screenshots --------------------------------------------------------------------------------------

SCREENSHOTS_DIR = ROOT / "assets" / "screenshots"
UPDATE_SCREENSHOTS_ENV = "AUDIOSCRIBE_UPDATE_SCREENSHOTS"  # 1: also write assets/screenshots/<tab>.png


@pytest.fixture
def tab_screenshot(page, artifacts_dir) -> Callable[[str], Path]:
    """``tab_screenshot("annotate")``: a full-page PNG of the page at 1400x900 as artifacts/tab-annotate.png, and,
    with AUDIOSCRIBE_UPDATE_SCREENSHOTS=1, as assets/screenshots/annotate.png (the README's; committed)."""
    def save(tab: str) -> Path:
        page.wait_for_timeout(300)  # let plots and tables finish drawing
        path = artifacts_dir / f"tab-{_safe_name(tab)}.png"
        page.screenshot(path=path, full_page=True)
        if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
            SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS_DIR / f"{_safe_name(tab)}.png")
        return path
    return save
