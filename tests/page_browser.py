"""Drives the service's page in headless Chromium, in a process of its own (run by
test_service.py): Playwright's sync API runs greenlets and an event loop in the process that
calls it, and the test process stays free of both. Prints one JSON line of what the page showed.

  python tests/page_browser.py URL CHROMIUM FIRST_IMAGE SECOND_IMAGE [SCREENSHOT]
"""
import json
import sys

from playwright.sync_api import sync_playwright

from fiseclip_jax.deploy import load


def main(url, browser_path, first_image, second_image, screenshot=None):
  seen = {}
  with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url)
    page.wait_for_selector("#state:has-text('live')", timeout=30000)
    with open(first_image, "rb") as f:
      seen["status"], seen["part"] = load.post(url.rstrip("/") + "/v1/score", f.read(),
                                               "image/jpeg")
    card = page.locator(f"article.part[data-id='{seen['part']['id']}']")
    card.wait_for(timeout=30000)
    seen["text"] = card.inner_text()
    seen["class"] = card.get_attribute("class")
    page.wait_for_function(                                    # its pictures have loaded
        f"[...document.querySelectorAll(\"article[data-id='{seen['part']['id']}'] img\")]"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=30000)
    with open(second_image, "rb") as f:                        # the page updates by itself
      seen["status2"], seen["part2"] = load.post(url.rstrip("/") + "/v1/score", f.read(),
                                                 "image/jpeg")
    page.locator(f"article.part[data-id='{seen['part2']['id']}']").wait_for(timeout=30000)
    seen["first"] = page.locator("article.part").first.get_attribute("data-id")
    if screenshot:
      page.screenshot(path=screenshot, full_page=False)
    browser.close()
  print(json.dumps(seen))


if __name__ == "__main__":
  main(*sys.argv[1:])
