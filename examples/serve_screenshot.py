"""The screenshot of the inspection page in docs/: the default model in references mode (8 normal hazelnuts,
thresholds calibrated on them), the example images uploaded through the page in headless Chromium.

    python examples/serve_screenshot.py [--data ../shared/data] [--out docs/images/serve-page.png]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serving import running  # noqa: E402

from visualad import AnomalyDetector  # noqa: E402
from visualad.data.datasets import load_dataset  # noqa: E402
from visualad.serve.app import create_app  # noqa: E402
from visualad.tasks.references import draw_references  # noqa: E402


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "serve-page.png")
    args = ap.parse_args()
    refs = draw_references(load_dataset(args.data / "mvtec_ad_reduced", split="train"), "hazelnut", 8, seed=42)
    det = AnomalyDetector.from_pretrained(device="cpu", dtype="fp32")
    det.set_references(refs)
    det.calibrate(refs, mode="references")
    images = [REPO / "examples" / "images" / n for n in ("hazelnut_crack.png", "hazelnut_good.png")]
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,760"):
        options.add_argument(arg)
    with running(create_app(det, model_name="dinov2-s-imgfocus")) as url:
        browser = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            browser.get(url + "/")
            WebDriverWait(browser, 30).until(lambda b: "threshold" in b.find_element(By.ID, "model").text)
            browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
            WebDriverWait(browser, 120).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .score")) == 2)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
            print(args.out, browser.find_element(By.ID, "results").text.replace("\n", " | "))
        finally:
            browser.quit()


if __name__ == "__main__":
    main()
