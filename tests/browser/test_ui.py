"""The app in Chromium at 1400x900 on the offline profile (the trained demo bundle), as a user sees it.

Selectors live in tests/browser/pages.py. Every test leaves screenshots in the artifacts folder (see conftest.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the fixtures (conftest.py) skip these tests, or fail them in CI, saying why
    expect = None

from tests.browser import pages
from tests.browser.conftest import PROFILE, VIEWPORT

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
SIREN = EXAMPLES / "siren-test_008666.flac"  # a held-out clip the demo bundle classifies and captions correctly
RESULT_TIMEOUT_MS = 90_000  # a Describe takes ~2 s here; generous for a cold, busy CI machine


def upload(page, path: Path, elem_id: str | None = None) -> None:
    """Load a clip into the open tab's audio input, as a user's file choice does, and wait until it is shown."""
    pages.audio_file_input(page, elem_id).set_input_files(str(path))
    expect(pages.loaded_audio(page)).to_be_attached(timeout=30_000)


def assert_no_horizontal_overflow(page, where: str) -> None:
    sizes = pages.horizontal_overflow(page)
    assert sizes["window"] == VIEWPORT["width"]
    assert sizes["document"] <= sizes["window"] and sizes["body"] <= sizes["window"], (
        f"{where}: the page scrolls sideways at {sizes['window']} px: {sizes}")


def test_page_loads_with_profile_and_no_horizontal_overflow(page, page_errors, screenshot):
    expect(pages.app_title(page)).to_be_visible()
    expect(pages.header_profile(page, PROFILE)).to_be_visible()
    names = pages.tabs(page).all_inner_texts()
    assert {"Caption", "Classify"} <= {n.strip() for n in names}, names
    for name in names:
        pages.open_tab(page, name.strip())
        expect(pages.active_panel(page)).to_be_visible()
        assert_no_horizontal_overflow(page, f"tab {name.strip()!r}")
        screenshot(f"tab-{name.strip()}")
    assert not [e for e in page_errors if e.startswith("pageerror")], page_errors


def test_caption_an_example_clip(page, screenshot, tab_screenshot):
    pages.open_tab(page, "Caption")
    upload(page, SIREN, pages.CAPTION_AUDIO)
    pages.describe_button(page).click()
    caption = pages.generated_caption(page)
    expect(caption).to_have_value(re.compile(r"\w{3,}"), timeout=RESULT_TIMEOUT_MS)
    text = caption.input_value()
    screenshot("described")
    expect(page.locator(f"#{pages.TIMELINE_PLOT} :is(canvas, svg)").first).to_be_visible(timeout=30_000)
    tab_screenshot("caption")
    assert "siren" in text.lower(), f"the demo bundle should hear a siren in {SIREN.name}, captioned {text!r}"
    expect(pages.active_panel(page).get_by_text(SIREN.name).first).to_be_visible()  # the info line names the clip
    assert_no_horizontal_overflow(page, "Caption tab with results")


def test_classify_an_example_clip(page, screenshot):
    pages.open_tab(page, "Classify")
    names = {n.strip() for n in re.split(r"[\n,]", pages.class_names(page).input_value()) if n.strip()}
    assert "siren" in names, names
    upload(page, SIREN)
    pages.classify_button(page).click()
    headline = pages.top_class(page)
    expect(headline).to_have_text(re.compile(r"\S"), timeout=RESULT_TIMEOUT_MS)
    screenshot("classified")
    best = headline.inner_text().strip()
    assert best in names, f"the scores' headline {best!r} is not one of the class names"
    assert best == "siren", f"the demo bundle should classify {SIREN.name} as siren, not {best!r}"
    assert_no_horizontal_overflow(page, "Classify tab with results")


def test_comparison_plot_fills_its_box(page, screenshot):
    pages.open_tab(page, "Classify")
    upload(page, SIREN)
    pages.classify_button(page).click()
    expect(pages.top_class(page)).to_have_text(re.compile(r"\S"), timeout=RESULT_TIMEOUT_MS)
    plot = pages.comparison_plot(page)
    expect(plot).to_be_visible()
    plot.scroll_into_view_if_needed()
    page.wait_for_timeout(1_000)  # Vega draws after the value arrives
    size = pages.drawn_size(plot)
    if size["width"] < size["box_width"] / 2:
        screenshot("narrow-plot")
    assert size["width"] >= size["box_width"] / 2 and size["height"] >= 100, f"the bar chart is not drawn: {size}"


def test_result_tables_fit_their_column(page, screenshot):
    """Issue 9 found the per-window table 1,346 px wide in a 598-px column, headers wrapped letter by letter."""
    pages.open_tab(page, "Caption")
    upload(page, SIREN, pages.CAPTION_AUDIO)
    pages.describe_button(page).click()
    expect(pages.generated_caption(page)).to_have_value(re.compile(r"\w{3,}"), timeout=RESULT_TIMEOUT_MS)
    page.wait_for_timeout(500)  # the tables render just after the caption
    clipped = pages.clipped_tables(page)
    if clipped:
        screenshot("clipped-tables")
    assert not clipped, f"tables wider than their column (px): {clipped}"


# --- Classify: tune, stop, zero-shot vs tuned ----------------------------------------------------------------------

TUNE_CLASSES = ["siren", "piano", "rain"]  # three classes the demo bundle's captions mention
TUNE_TIMEOUT_MS = 180_000  # ~10-60 s for three classes here


def colour_groups(png: bytes, min_pixels: int = 200) -> dict[int, int]:
    """The saturated colours of a screenshot by hue (30-degree buckets) -> pixel count, for buckets with at least
    ``min_pixels``: a bar chart's series, whatever palette the theme gives them."""
    import io

    import numpy as np
    from PIL import Image

    hsv = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").convert("HSV")).reshape(-1, 3).astype(int)
    saturated = hsv[(hsv[:, 1] > 100) & (hsv[:, 2] > 80)]
    buckets, counts = np.unique(saturated[:, 0] * 360 // 256 // 30, return_counts=True)
    return {int(b) * 30: int(c) for b, c in zip(buckets, counts) if c >= min_pixels}


def test_tune_stop_then_tune_and_compare(page, screenshot, tab_screenshot):
    """Stop a tuning run (the status says after how many steps), then tune to the end and see both bar groups."""
    pages.open_tab(page, "Classify")
    pages.class_names(page).fill("\n".join(TUNE_CLASSES))
    tune, stop = pages.by_id(page, pages.TUNE_BUTTON), pages.by_id(page, pages.STOP_BUTTON)
    progress = pages.by_id(page, pages.TUNE_PROGRESS)
    expect(stop).to_be_disabled()

    # A run stopped by the user.
    tune.click()
    expect(tune).to_be_disabled(timeout=10_000)
    expect(stop).to_be_enabled(timeout=10_000)
    expect(progress).to_contain_text(re.compile(r"processing|\d+\s*/\s*\d+|%|step", re.IGNORECASE), timeout=30_000)
    screenshot("tuning")
    stop.click()
    expect(progress).to_contain_text(re.compile(r"Stopped after \d+ steps"), timeout=60_000)
    expect(tune).to_be_enabled(timeout=10_000)
    expect(stop).to_be_disabled()
    screenshot("stopped")

    # A run to the end, with the preset chosen on the page.
    pages.by_id(page, pages.TUNE_PRESET).get_by_text("Quick", exact=True).click()
    tune.click()
    expect(tune).to_be_disabled(timeout=10_000)
    expect(tune).to_be_enabled(timeout=TUNE_TIMEOUT_MS)
    expect(progress).to_contain_text(re.compile(r"Tuned 3 classes"), timeout=10_000)
    expect(progress).to_contain_text(re.compile(r"preset\s+quick"))
    screenshot("tuned-quick")
    expect(pages.by_id(page, pages.TUNE_REPORT)).to_contain_text("Tuning report")

    upload(page, SIREN)
    pages.classify_button(page).click()
    expect(pages.top_class(page)).to_have_text("siren", timeout=RESULT_TIMEOUT_MS)
    plot = pages.comparison_plot(page)
    expect(plot.locator("canvas, svg").first).to_be_visible(timeout=30_000)
    plot.scroll_into_view_if_needed()
    page.wait_for_timeout(1_000)  # Vega draws after the value arrives
    # The chart is a canvas (its legend text is not in the DOM): two series are two colours of bars. Both scores
    # exist as numbers in the table under the chart.
    groups = colour_groups(plot.screenshot())
    assert len(groups) >= 2, f"both bar groups should be drawn in two colours; saturated hues (deg: px): {groups}"
    pages.active_panel(page).get_by_text("Scores as a table", exact=True).click()
    expect(pages.by_id(page, "comparison-table").get_by_role("row", name=re.compile(r"^siren tuned prompts"))
           ).to_be_visible(timeout=10_000)
    methods = {row[1] for row in pages.table_rows(page, "comparison-table")}
    assert methods == {"zero-shot", "tuned prompts"}, methods
    tab_screenshot("classify")
    texts = plot.locator("svg text").all_text_contents()
    if texts:  # an SVG renderer: the legend can be read
        assert "zero-shot" in texts and "tuned prompts" in texts, texts


# --- Adapt: a domain of another caption style ----------------------------------------------------------------------

DOMAIN_CAPTIONS = [f"FIELD LOG {i:02d}: {what} recorded at the harbour station, reel {i}" for i, what in enumerate(
    ["siren wail", "foghorn blast", "piano practice", "rainfall on the tin roof", "dog barking twice",
     "church bell toll", "seagull cries", "engine idling", "footsteps on gravel", "knocking on the hatch",
     "trumpet call", "radio static hiss", "wind gusts", "thunder rumble", "helicopter pass overhead",
     "water dripping in the hold", "crowd murmur at the quay", "clock ticking in the office",
     "woman speaking on the phone", "alarm clock ringing"])]


def build_domain_and_compare(page, tmp_path, name: str) -> list[list[str]]:
    """Upload DOMAIN_CAPTIONS as a .txt, build the domain ``name``, caption SIREN before and after: the rows."""
    captions = tmp_path / "harbour_log.txt"
    captions.write_text("\n".join(DOMAIN_CAPTIONS) + "\n")
    pages.open_tab(page, "Adapt")
    pages.file_input(page, pages.ADAPT_FILES).set_input_files(str(captions))
    expect(pages.by_id(page, pages.ADAPT_FILES).get_by_role("cell", name="harbour_log.txt")).to_be_visible(
        timeout=30_000)
    pages.text_field(page, pages.ADAPT_NAME).fill(name)
    pages.by_id(page, pages.ADAPT_BUILD).click()
    status = pages.by_id(page, pages.ADAPT_STATUS)
    expect(status).to_contain_text(f"Active domain: {name}, {len(DOMAIN_CAPTIONS)} captions", timeout=RESULT_TIMEOUT_MS)
    expect(status.locator("strong", has_text=name)).to_be_visible()

    pages.file_input(page, pages.ADAPT_AUDIO).set_input_files(str(SIREN))
    expect(pages.by_id(page, pages.ADAPT_AUDIO).locator("audio").first).to_be_attached(timeout=30_000)
    pages.by_id(page, pages.ADAPT_COMPARE).click()
    table = pages.by_id(page, pages.ADAPT_TABLE)
    expect(table.get_by_role("row", name=re.compile(rf"^domain {name}"))).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    return pages.table_rows(page, pages.ADAPT_TABLE)


def test_switch_domain_changes_the_caption(page, tmp_path, tab_screenshot):
    name = "harbour-log"
    rows = build_domain_and_compare(page, tmp_path, name)
    tab_screenshot("adapt")
    assert len(rows) == 2, rows
    (_, default_generated, default_found), (_, domain_generated, domain_found) = rows
    assert domain_found in DOMAIN_CAPTIONS, f"the domain's retrieved caption {domain_found!r} is not one of its own"
    assert (default_generated, default_found) != (domain_generated, domain_found), rows
    assert default_found != domain_found, rows


def test_adapt_compare_table_fits_its_column(page, tmp_path, screenshot):
    build_domain_and_compare(page, tmp_path, "harbour-fit")
    page.wait_for_timeout(500)
    clipped = pages.clipped_tables(page)
    if clipped:
        screenshot("clipped-compare-table")
    assert not clipped, f"tables wider than their column (px): {clipped}"
