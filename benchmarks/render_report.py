"""Render a report.html to a full-page PNG in headless Chromium, as a person would see it.

    .venv/bin/python benchmarks/render_report.py REPORT_HTML OUT_PNG [--width 1300]

Uses the system Chromium (/usr/bin/chromium) through Playwright; nothing is downloaded and the
page has no external references to fetch. Prints how many images loaded and the sections found,
and fails when an image did not load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from cxrlabel.fileio import atomic_write_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def render(report_html: Path, out_png: Path, width: int = 1300) -> dict[str, object]:
    """Screenshot the whole page; return what the browser saw (images loaded, headings)."""
    if not report_html.is_file():
        raise FileNotFoundError(f"{report_html}: no such report")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.goto(report_html.resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => e.complete && e.naturalWidth > 0)"
            )
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.innerText)")
            tables = len(page.query_selector_all("table"))
            png = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    atomic_write_bytes(out_png, png)
    return {"images": images, "headings": headings, "tables": tables, "bytes": len(png)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report_html", type=Path)
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--width", type=int, default=1300)
    args = parser.parse_args()
    seen = render(args.report_html, args.out_png, args.width)
    images = seen["images"]
    assert isinstance(images, list)
    print(f"{args.out_png}: {seen['bytes']} bytes")
    print(f"images loaded: {sum(images)} of {len(images)}; tables: {seen['tables']}")
    print("sections:", " | ".join(map(str, seen["headings"])))  # type: ignore[arg-type]
    return 0 if all(images) else 1


if __name__ == "__main__":
    sys.exit(main())
