"""Browser end-to-end: Debian's Chromium (driven by Playwright) uploads an image on ``/``."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from test_serve import running_server  # noqa: E402


def test_page_upload_shows_label(trained_run, browser):
    import visiontune

    run, data = trained_run
    image = sorted(data.rglob("*.png"))[0]
    expected = visiontune.load(run.run_dir).predict([str(image)])[0]["label"]
    with running_server(str(run.run_dir)) as url:
        page = browser.new_page()
        try:
            outside: list[str] = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((url, "blob:", "data:"))
                    else None)
            page.goto(url + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=30_000)
            assert page.text_content("#label") == expected
            assert page.locator("#bars li").count() == 3
            assert page.get_attribute("#preview", "src").startswith("blob:")
            assert not outside, f"page fetched non-local assets: {outside}"
        finally:
            page.close()


def test_page_shows_a_multi_label_models_label_set(ml_run, ml_data, browser):
    import visiontune

    image = sorted((ml_data.parent / "img").glob("*.png"))[0]
    expected = visiontune.load(ml_run.run_dir).predict([str(image)])[0]["labels"]
    with running_server(str(ml_run.run_dir)) as url:
        page = browser.new_page()
        try:
            page.goto(url + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=30_000)
            assert page.text_content("#label") == (", ".join(expected) if expected else "(no label)")
            assert page.locator("#bars li").count() == 3  # every label's score
            assert page.locator("#bars li.chosen").count() == len(expected)
        finally:
            page.close()
