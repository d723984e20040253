"""First run end to end: `python main.py --cpu` on an empty base directory writes the demo models and the
demo workflow, and the official frontend in headless chromium opens that workflow from its Workflows
sidebar, runs it with the real Run button and shows the saved image.

Both tests share one server (module fixture): starting it, with the demo models written, is most of
the cost on a small CPU machine.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse

import pytest
from PIL import Image

from tests import browser_helpers as bh

DEMO_MODELS = {
    "diffusion_models": ["taco-demo-flux1-dev.safetensors", "taco-demo-flux1-schnell.safetensors"],
    "text_encoders": ["taco-demo-clip_l.safetensors", "taco-demo-t5xxl.safetensors"],
    "vae": ["taco-demo-flux-ae.safetensors"],
}


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """main.py on a base directory that holds nothing at all."""
    base = str(tmp_path_factory.mktemp("first-run"))
    port = bh.free_port()
    proc = bh.start_main(base, port)
    try:
        bh.wait_ready(port, proc, base)
        yield base, port
    finally:
        bh.stop(proc)


def test_empty_base_directory_starts_and_offers_the_demo(demo_server):
    base, port = demo_server
    for kind, names in DEMO_MODELS.items():
        for name in names:
            assert os.path.getsize(os.path.join(base, "models", kind, name)) > 0, (kind, name)
        # the loaders' dropdowns offer them (the frontend builds its combos from object_info)
    info = bh.http_json(port, "/api/object_info/UNETLoader")
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == DEMO_MODELS["diffusion_models"]
    assert "taco-demo-flux.json" in bh.http_json(port, "/api/userdata?dir=workflows")
    served = bh.http_json(port, "/api/userdata/" + urllib.parse.quote("workflows/taco-demo-flux.json", safe=""))
    with open(os.path.join(bh.ROOT, "demo", "flux_demo_workflow.json")) as f:
        assert served == json.load(f)
    log = bh.log_tail(base, n=20000)
    assert "--no-demo-models" in log and "taco-demo-flux1-dev.safetensors" in log


def _api_prompt_matches_demo(queued: dict) -> None:
    """The prompt the frontend built from the UI workflow is demo/flux_demo_api.json (titles aside)."""
    with open(os.path.join(bh.ROOT, "demo", "flux_demo_api.json")) as f:
        expected = json.load(f)
    assert sorted(queued) == sorted(expected)
    for node_id, node in expected.items():
        assert queued[node_id]["class_type"] == node["class_type"], node_id
        assert queued[node_id]["inputs"] == node["inputs"], node_id


@pytest.mark.browser
def test_demo_workflow_runs_from_the_ui(demo_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if bh.chromium_path() is None:
        if os.environ.get("CI") == "true":  # CI runs bash test.sh, which installs it: never skip silently there
            pytest.fail("Debian's chromium is missing: bash test.sh (as root) installs it with apt-get")
        pytest.skip("Debian's chromium is not installed (bash test.sh installs it as root)")
    base, port = demo_server
    # Outside pytest's basetemp, which other pytest runs on the machine rotate away.
    shot = os.path.join(tempfile.mkdtemp(prefix="taco-browser-e2e-"), "failure.png")
    with sync_api.sync_playwright() as p:
        browser = bh.launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page_errors: list[str] = []
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        try:
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            # A fresh user (no comfy.settings.json) always gets the templates browser once the app has
            # loaded; while it is open the rest of the page is aria-hidden, so close it first, as a person
            # would.
            page.get_by_role("button", name="Close dialog").click(timeout=60_000)
            page.get_by_role("button", name="Workflows (w)").click(timeout=30_000)
            page.get_by_text("taco-demo-flux", exact=True).first.click(timeout=30_000)
            # Nodes are drawn on a canvas, not in the DOM: read (never drive) the graph to know the demo
            # workflow replaced the default one before pressing Run.
            page.wait_for_function("() => window.app?.graph?.nodes?.some(n => n.type === 'UNETLoader')",
                                   timeout=30_000)
            page.get_by_role("button", name="Run", exact=True).click()
            # The finished job's thumbnail in the queue notification banner is an <img> in the DOM.
            img = page.locator("img[src*='/api/view'][src*='taco-demo-flux_00001_.png']").first
            img.wait_for(state="visible", timeout=90_000)
            src = img.get_attribute("src")
            # The Save Image node's own preview is painted on the canvas; read the node's image list.
            page.wait_for_function("() => (window.app.graph.getNodeById(9)?.imgs || [])"
                                   ".some(i => i.src.includes('/api/view') && i.src.includes('taco-demo-flux_00001_.png'))",
                                   timeout=30_000)
        except Exception as e:
            page.screenshot(path=shot, full_page=True)
            raise AssertionError(f"UI run failed: {type(e).__name__}: {e}\nscreenshot: {shot}\n"
                                 f"page errors: {page_errors[-5:]}\nserver log:\n{bh.log_tail(base)}") from None
        finally:
            browser.close()

    # the official frontend ran without an uncaught exception against our server
    assert not page_errors, page_errors
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(src).query)
    assert query["type"] == ["output"] and query["filename"] == ["taco-demo-flux_00001_.png"]
    path = os.path.join(base, "output", query.get("subfolder", [""])[0], query["filename"][0])
    with Image.open(path) as im:
        assert im.size == (256, 256)
        # the frontend put the UI workflow into extra_pnginfo; SaveImage embedded it
        assert any(n["type"] == "KSampler" for n in json.loads(im.text["workflow"])["nodes"])
        _api_prompt_matches_demo(json.loads(im.text["prompt"]))
    history = bh.http_json(port, "/api/history")
    (item,) = history.values()
    assert item["status"]["status_str"] == "success"
    assert item["outputs"]["9"]["images"][0]["filename"] == "taco-demo-flux_00001_.png"
