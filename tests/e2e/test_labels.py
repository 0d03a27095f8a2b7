"""Every control on the Generate tab has a name a person (and a screen reader) can read: a label, an
aria-label or its own text; buttons say what they do."""
from __future__ import annotations

import pytest

from test_browser import pick, wait_text

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

UNNAMED_JS = """
() => {
  const bad = [];
  const ctrls = document.querySelectorAll('#generate-tab input, #generate-tab textarea, #generate-tab button, #generate-tab select');
  let checked = 0;
  for (const el of ctrls) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || el.type === 'hidden' || el.type === 'file') continue;
    checked++;
    let name = el.getAttribute('aria-label') || '';
    const lb = el.getAttribute('aria-labelledby');
    if (!name && lb) name = lb.split(' ').map(id => (document.getElementById(id) || {}).innerText || '').join(' ');
    if (!name && el.labels && el.labels.length) name = Array.from(el.labels).map(l => l.innerText).join(' ');
    if (!name && el.tagName === 'BUTTON') name = el.innerText || '';
    if (!name) name = el.title || '';
    if (!name.trim()) bad.push(el.outerHTML.slice(0, 160));
  }
  return {checked, bad};
}
"""


def test_every_visible_control_has_a_name(page):
    pick(page, "model-picker", "demo-wan2.2-t2v-a14b")
    wait_text(page, "#model-note", "2 experts")
    page.click("#add-lora")
    page.locator("#lora-row-0").wait_for(state="visible")
    page.click("#preset-more")
    page.wait_for_timeout(500)
    found = page.evaluate(UNNAMED_JS)
    assert found["checked"] >= 30 and found["bad"] == [], found
    for elem_id in ("lora-up-0", "lora-down-0", "lora-remove-0", "preset-rename"):
        text = page.inner_text(f"#{elem_id}")
        assert len(text) >= 2 and text not in ("↑", "↓", "✕"), (elem_id, text)  # words, not tiny glyphs
    assert "Rename to name" not in page.inner_text("#preset-more")
