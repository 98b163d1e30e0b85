"""Where things are in AudioScribe's page: the one module to update when the UI changes.

Each lookup prefers the element id the UI sets (``elem_id`` in app/ui.py) and otherwise falls back to what a user
sees: roles, visible text and labels. Nothing here depends on Gradio's DOM nesting beyond two of Gradio's own
``data-testid`` values, named below. Call these after the tab in question is open: Gradio renders a tab's content
only once it is selected.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: without playwright the tests skip (conftest.py) instead of failing to import
    from playwright.sync_api import Locator, Page

# elem_ids the UI sets (or is about to set); the fallbacks below apply while an id is absent.
CAPTION_AUDIO = "caption-audio"
DESCRIBE_BUTTON = "describe-button"
GENERATED_CAPTION = "generated-caption"
CLASSIFY_BUTTON = "classify-button"
CLASS_NAMES = "class-names"
TUNE_BUTTON = "tune-button"
STOP_BUTTON = "stop-button"
TUNE_PROGRESS = "tune-progress"
COMPARISON_PLOT = "comparison-plot"
TIMELINE_PLOT = "timeline-plot"
TUNE_REPORT = "tune-report"
TUNE_PRESET = "tune-preset"

# Gradio's own test ids (stable across Gradio 4-6): the Label component's headline class.
LABEL_HEADLINE_TESTID = "label-output-value"

PROFILE_TEXT = r"profile\W+{0}|{0}\W+profile"  # {0}: the profile name, see header_profile


def prefer(page: Page, css: str, fallback: Locator) -> Locator:
    """``css`` (an #id selector) when the page has it, else ``fallback``."""
    found = page.locator(css)
    return found.first if found.count() else fallback


# --- page and tabs -------------------------------------------------------------------------------------------------

def app_title(page: Page) -> Locator:
    return page.get_by_role("heading", name="AudioScribe").first


def header_profile(page: Page, profile: str) -> Locator:
    """The visible text that names the active profile (today: "Profile **offline**" in the header)."""
    pattern = re.compile(PROFILE_TEXT.format(re.escape(profile)), re.IGNORECASE)
    return page.get_by_text(pattern).filter(visible=True).first


def tabs(page: Page) -> Locator:
    return page.get_by_role("tab")


def tab(page: Page, name: str) -> Locator:
    return page.get_by_role("tab", name=name, exact=True)


def active_panel(page: Page) -> Locator:
    """The content of the selected tab."""
    return page.get_by_role("tabpanel").filter(visible=True).first


def open_tab(page: Page, name: str) -> Locator:
    tab(page, name).click()
    return active_panel(page)


# --- audio input (either tab) --------------------------------------------------------------------------------------

def audio_file_input(page: Page, elem_id: str | None = None) -> Locator:
    """The (hidden) file input of the audio upload in the open tab; set_input_files works on it."""
    fallback = active_panel(page).locator('input[type="file"][accept*="audio"]').first
    return prefer(page, f'#{elem_id} input[type="file"]', fallback) if elem_id else fallback


def loaded_audio(page: Page) -> Locator:
    """The <audio> element the audio component shows once a file is loaded."""
    return active_panel(page).locator("audio").first


# --- Caption tab ---------------------------------------------------------------------------------------------------

def describe_button(page: Page) -> Locator:
    return prefer(page, f"#{DESCRIBE_BUTTON}", page.get_by_role("button", name="Describe", exact=True))


def generated_caption(page: Page) -> Locator:
    """The generated caption's text field."""
    return prefer(page, f"#{GENERATED_CAPTION} :is(textarea, input)",
                  page.get_by_label(re.compile(r"^Generated caption")).first)


# --- Classify tab --------------------------------------------------------------------------------------------------

def classify_button(page: Page) -> Locator:
    return prefer(page, f"#{CLASSIFY_BUTTON}", page.get_by_role("button", name="Classify", exact=True))


def class_names(page: Page) -> Locator:
    return prefer(page, f"#{CLASS_NAMES} textarea", page.get_by_label("Class names", exact=True))


def top_class(page: Page) -> Locator:
    """The scores' headline: the best class, shown by the Label component after Classify."""
    return active_panel(page).get_by_test_id(LABEL_HEADLINE_TESTID).first


def comparison_plot(page: Page) -> Locator:
    """The box of the zero-shot vs tuned bar chart."""
    return prefer(page, f"#{COMPARISON_PLOT}", _block_labelled(page, "Zero-shot vs tuned prompts"))


def _block_labelled(page: Page, label: str) -> Locator:
    """The nearest Gradio block around a component's visible label (fallback for components without an id)."""
    return (active_panel(page).get_by_text(label, exact=True).first
            .locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' block ')][1]"))


# --- layout measurements -------------------------------------------------------------------------------------------

def horizontal_overflow(page: Page) -> dict:
    """How wide the document is against the window: overflow means a horizontal scrollbar on the page."""
    return page.evaluate("""() => ({
        window: window.innerWidth,
        document: document.documentElement.scrollWidth,
        body: document.body.scrollWidth,
    })""")


def clipped_tables(page: Page) -> list[dict]:
    """Visible tables wider than the scrolling box that holds them (their right part is cut off)."""
    return page.evaluate("""() => [...document.querySelectorAll('table')]
        .filter(t => t.offsetParent !== null)
        .map(t => {
            let box = t.parentElement;
            const scrolls = e => ['auto', 'scroll', 'hidden'].includes(getComputedStyle(e).overflowX);
            while (box && !scrolls(box)) box = box.parentElement;
            const headers = [...t.querySelectorAll('th')].map(th => th.innerText.trim().replace(/\\s+/g, ''));
            return {table: Math.round(t.getBoundingClientRect().width),
                    box: box ? Math.round(box.getBoundingClientRect().width) : null, headers};
        })
        .filter(r => r.box !== null && r.table > r.box + 1)""")


def drawn_size(box: Locator) -> dict:
    """How much of a plot's box its drawing (the largest canvas or svg inside) takes, in px."""
    return box.evaluate("""box => {
        const r = box.getBoundingClientRect();
        const drawn = [...box.querySelectorAll('canvas, svg')].map(e => e.getBoundingClientRect())
            .reduce((a, e) => e.width * e.height > a.width * a.height ? e : a, {width: 0, height: 0});
        return {box_width: Math.round(r.width), width: Math.round(drawn.width), height: Math.round(drawn.height)};
    }""")


# --- Annotate and Export tabs ---------------------------------------------------------------------------------------

ANNOTATE_QUEUE = "annotate-queue"
ANNOTATE_PATH = "annotate-path"
ANNOTATE_ANNOTATOR = "annotate-annotator"
ANNOTATE_OPEN = "annotate-open"
ANNOTATE_CLIP = "annotate-clip"            # "**name** · clip 2 of 4 · your last decision: ..."
ANNOTATE_SUGGESTIONS = "annotate-suggestions"
ANNOTATE_CAPTION = "annotate-caption"
ANNOTATE_LABELS = "annotate-labels"
ANNOTATE_PROGRESS = "annotate-progress"    # "3 of 4 decided by **x** · 2 accepted · 1 edited · ..."
ANNOTATE_SAVED = "annotate-saved"
EXPORT_QUEUE = "export-queue"
EXPORT_REFRESH = "export-refresh"
EXPORT_BUTTON = "export-button"
EXPORT_FILES = "export-files"
EXPORT_SUMMARY = "export-summary"


def text_field(page: Page, elem_id: str) -> Locator:
    """The typing field (textarea or input) of a Textbox or Dropdown by its elem_id."""
    return page.locator(f"#{elem_id} :is(textarea, input)").first


def by_id(page: Page, elem_id: str) -> Locator:
    return page.locator(f"#{elem_id}").first


def annotate_labels(page: Page) -> Locator:
    return page.locator(f"#{ANNOTATE_LABELS} input[type=checkbox]")


def export_links(page: Page) -> Locator:
    """The download links of the exported files (gr.File: <a href=".../gradio_api/file=...">)."""
    return page.locator(f"#{EXPORT_FILES} a[href*='file=']")


# --- Adapt tab ------------------------------------------------------------------------------------------------------

ADAPT_FILES = "adapt-files"
ADAPT_NAME = "adapt-name"
ADAPT_BUILD = "adapt-build"
ADAPT_STATUS = "adapt-status"
ADAPT_AUDIO = "adapt-audio"
ADAPT_COMPARE = "adapt-compare"
ADAPT_TABLE = "adapt-compare-table"


def file_input(page: Page, elem_id: str) -> Locator:
    return page.locator(f'#{elem_id} input[type="file"]').first


def table_rows(page: Page, elem_id: str) -> list[list[str]]:
    """A gr.Dataframe's body rows, as the text of their cells (by ARIA role: Gradio's grid, not its DOM nesting)."""
    rows = []
    for row in page.locator(f"#{elem_id}").first.get_by_role("row").all():
        cells = [c.strip() for c in row.get_by_role("gridcell").all_inner_texts()]
        if cells and any(cells):
            rows.append(cells)
    return rows
