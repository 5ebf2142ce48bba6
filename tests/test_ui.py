"""The web UI in a real headless Chromium (Playwright): the page loads with the model and the medical
disclaimer, an example question fills the box, a question gets an answer streamed into the page, the
side-by-side mode streams the base model's answer too, and a too-long question shows why it was refused.
A screenshot is left in test-artifacts/ui.png (git-ignored).

The browser is the Debian package `chromium` (README set-up), or $MEDTUNE_CHROMIUM, or Playwright's own
download. Without any, the test is skipped, except under CI (CI=true), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.conftest import REPO
from tests.helpers import QUESTION, expected_answer, start_server, stop_server

ARTIFACTS = REPO / "test-artifacts"
NEW_TOKENS = 48


def browser(p):
    exe = os.environ.get("MEDTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        return p.chromium.launch(executable_path=exe, args=["--no-sandbox"]) if exe else p.chromium.launch()
    except Exception as e:
        why = f"no usable Chromium ({type(e).__name__}: {str(e).splitlines()[0]}); install the Debian package `chromium`"
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)


def words(text: str) -> str:
    return " ".join(re.sub(r"[*_`#>]", " ", text).split())


@pytest.fixture(scope="module")
def ui(workdir, tiny_adapter, tmp_path_factory):
    d = tmp_path_factory.mktemp("ui")
    (d / "params.yaml").write_text((workdir / "params.yaml").read_text())
    examples = ["What are the symptoms of glaucoma ?", "Is cystic fibrosis inherited ?"]
    # answers long enough to see them grow; questions of at most 64 prompt tokens, so that a long one is refused
    limits = ["--max-new-tokens", str(NEW_TOKENS), "--max-new-tokens-cap", str(NEW_TOKENS), "--max-prompt-tokens", "64"]
    proc, url = start_server(["medtune.commands.ui", "--adapter", str(tiny_adapter), *limits,
                              *[x for q in examples for x in ("--example", q)]], d, "/", d / "ui.log")
    yield url, d, examples
    stop_server(proc)


RECORD = """sel => { window.__seen = []; const box = document.querySelector(sel);
  new MutationObserver(() => { const b = box.querySelectorAll('[data-testid="bot"]');
    if (b.length) window.__seen.push(b[b.length - 1].innerText); })
  .observe(box, {subtree: true, childList: true, characterData: true}); }"""

ANSWERED = """([sel, want]) => { const b = document.querySelectorAll(sel + ' [data-testid="bot"]');
  return b.length > 0 && b[b.length - 1].innerText.replace(/[*_`#>]/g, ' ').replace(/\\s+/g, ' ').includes(want); }"""


def test_ui_streams_answers_with_disclaimer_examples_and_side_by_side(ui, tiny_model, tiny_adapter, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    url, d, examples = ui
    monkeypatch.chdir(d)
    tuned_want = words(expected_answer(tiny_model, tiny_adapter, QUESTION, NEW_TOKENS))
    base_want = words(expected_answer(tiny_model, None, QUESTION, NEW_TOKENS))
    with sync_playwright() as p:
        b = browser(p)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator("#disclaimer")).to_contain_text("Not medical advice", timeout=30_000)
        expect(page.get_by_text(f"adapter {tiny_adapter} (workspace)")).to_be_visible()
        box = page.locator("#question textarea")
        page.get_by_text(examples[0], exact=True).click()
        expect(box).to_have_value(examples[0])

        box.fill(QUESTION)
        page.evaluate(RECORD, "#tuned")
        page.locator("#ask").click()
        bot = page.locator('#tuned [data-testid="bot"]').last
        page.wait_for_function(ANSWERED, arg=["#tuned", tuned_want], timeout=60_000)
        assert tuned_want in words(bot.inner_text())
        seen = [words(s) for s in page.evaluate("window.__seen")]
        partial = {s for s in seen if s and s != words(bot.inner_text())}
        assert len(partial) >= 2, f"the answer did not grow in steps: {seen}"  # streamed, not one block
        assert all(tuned_want.startswith(s) for s in partial if "stopped" not in s)
        expect(page.locator("#base")).to_be_hidden()

        page.locator("#side-by-side input[type=checkbox]").check()
        expect(page.locator("#base")).to_be_visible()
        box.fill(QUESTION)
        page.locator("#ask").click()
        base_bot = page.locator('#base [data-testid="bot"]').last
        page.wait_for_function(ANSWERED, arg=["#base", base_want], timeout=60_000)
        assert base_want in words(base_bot.inner_text()) and base_want != tuned_want
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

        answers = page.locator('#tuned [data-testid="bot"]').count()
        box.fill("word " * 80)  # a bad question shows its one-line reason, and nothing is generated
        page.locator("#ask").click()
        expect(page.get_by_text("over --max-prompt-tokens (64)").first).to_be_visible(timeout=30_000)
        assert page.locator('#tuned [data-testid="bot"]').count() == answers
        b.close()
