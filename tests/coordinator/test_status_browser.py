"""The status page in a real browser: headless Chromium loads it from a running coordinator, the charts
render with data (every canvas drawn, with points and ink), and a screenshot is saved."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest

from . import status_scenario
from .headless_chromium import chromium_args, devtools_port, find_chromium, load, open_page

CHROMIUM = find_chromium()
WIDTH, HEIGHT = 1400, 1000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it where it can)",
)

# Every canvas on the page: drawn by Chart.js (data-rendered), its points, and how many pixels it inked.
CANVASES = """
[...document.querySelectorAll('canvas')].map(c => {
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 3; i < px.length; i += 4) if (px[i]) ink++;
  return {id: c.id, rendered: c.dataset.rendered === '1', points: Number(c.dataset.points || 0), ink,
          width: c.width, height: c.height};
})
"""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_model):
    s = status_scenario.build(tmp_path_factory.mktemp("status-browser"), tiny_model)
    yield s
    s.running.stop(grace=0)


def test_the_page_renders_its_charts_in_chromium(scenario, processes, tmp_path):
    profile = tmp_path / "profile"
    profile.mkdir()
    proc = processes.start(
        chromium_args(CHROMIUM, profile, WIDTH, HEIGHT), stderr=open(tmp_path / "chromium.log", "wb")
    )
    port = devtools_port(profile, proc)
    canvases, admin_rows, exceptions = asyncio.run(_drive(port, scenario, tmp_path))

    ids = {c["id"] for c in canvases}
    expected = {
        "curve-loss",
        "curve-samples_per_s",
        "curve-peers",
        "lineage-mod_loss",
        "lineage-exact_match",
        "lineage-token_loss",
        "lineage-more",
    }
    assert expected <= ids, ids
    for c in canvases:
        assert c["rendered"], f"{c['id']} was not drawn"
        assert c["points"] > 0 and c["ink"] > 500 and c["width"] > 200, c
    by_id = {c["id"]: c for c in canvases}
    assert by_id["curve-loss"]["points"] >= 16  # 8 DHT readings + at least 8 heartbeat points
    assert by_id["lineage-mod_loss"]["points"] == 5  # every version
    assert admin_rows == 2
    assert exceptions == [], exceptions
    shot = tmp_path / "status-page.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")
    shutil.rmtree(profile, ignore_errors=True)


async def _drive(port: int, scenario, tmp_path):
    async with aiohttp.ClientSession() as session:
        page = await open_page(session, port, WIDTH, HEIGHT)
        await load(page, scenario.url)
        await page.wait_for(
            "document.querySelectorAll('canvas').length > 0 && "
            "[...document.querySelectorAll('canvas')].every(c => c.dataset.rendered === '1')",
            60,
            "every chart drawn",
        )
        canvases = await page.evaluate(CANVASES)
        await page.screenshot(tmp_path / "status-page.png", WIDTH)
        # The admin's view: the same page with the bearer header a script would send.
        await page.send("Network.enable")
        await page.send(
            "Network.setExtraHTTPHeaders", headers={"Authorization": f"Bearer {scenario.admin_token}"}
        )
        await load(page, scenario.url)
        admin_rows = await page.wait_for("document.querySelectorAll('.worker-row').length", 30, "worker rows")
        await page.screenshot(tmp_path / "status-page-admin.png", WIDTH)
        await page.ws.close()
        return canvases, admin_rows, page.exceptions
