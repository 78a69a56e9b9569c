"""The Dagster UI in a real browser: Debian's headless Chromium, driven by Playwright, against a
real `dagster dev` serving a graph that was materialised for real (two families on tiny
synthetic data), plus a second ingest of a broken file that fails the raw contract.

What a person opening the UI must see: every group and every family's chain in the asset
graph, a model's training curve, an ONNX export's parity table and lineage, the leaderboard's
table and chart, and the failed contract check marked as failed.

Screenshots go to a pytest tmp folder (printed at the end of the module) and, when
RECSYS_UI_SCREENSHOTS=<dir> is set, are copied there too (that is how docs/img/ is made).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from dagster_processes import MODULE, _exe, dagster_env, start_dagster_dev

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
FAMILIES = ("wals", "deepfm")
GROUPS = ("ingest", "staging", "intermediate", "marts", "train", "export", "evaluate", "registry")
SMALL = {"RECSYS_SYNTH_USERS": "200", "RECSYS_SYNTH_ITEMS": "300", "RECSYS_SYNTH_EVENTS": "8000"}
RAW = "raw_interactions,raw_users,raw_items"
TIMEOUT_MS = 60_000  # a deadline for each UI poll: the live data arrives after the page shell
VIEWPORT = {"width": 1600, "height": 1100}
GRAPH_VIEWPORT = {"width": 1700, "height": 1650}


def _materialise(env: dict[str, str], select: str, log: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [_exe("dagster"), "asset", "materialize", "-m", MODULE, "--select", select],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log.write_text(result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory):
    """A materialised graph (wals + deepfm), a failed raw contract on top, and `dagster dev`."""
    root = tmp_path_factory.mktemp("ui")
    home, dagster_home = root / "recsys_home", root / "dagster_home"
    env = dagster_env(home, dagster_home, {**SMALL, "RECSYS_FAMILIES": ",".join(FAMILIES)})
    for var in ("RECSYS_SOURCE", "RECSYS_DATA_PATH", "RECSYS_COLUMN_MAP", "RECSYS_SPLIT"):
        env.pop(var, None)

    good = _materialise(env, "*", root / "materialise_all.log")
    if good.returncode != 0:
        pytest.fail(f"`dagster asset materialize --select '*'` failed (log {root}/materialise_all.log):\n"
                    f"{(good.stdout + good.stderr)[-4000:]}")  # fmt: skip

    # Parses fine, but every rating is 1: the raw contract's rating distribution fails, for real.
    broken = root / "all_ratings_one.csv"
    rows = [f"{i % 40 + 1},{i % 50 + 1},1.0,{1_600_000_000 + 60 * i}" for i in range(400)]
    broken.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    bad = _materialise({**env, "RECSYS_SOURCE": "files", "RECSYS_DATA_PATH": str(broken)}, RAW,
                       root / "materialise_broken.log")  # fmt: skip
    output = bad.stdout + bad.stderr
    if bad.returncode == 0 or "Asset check 'contract' on 'raw_interactions' did not pass" not in output:
        pytest.fail(f"ingesting {broken} (every rating 1.0) should fail the raw_interactions contract; "
                    f"exit code {bad.returncode}, log {root}/materialise_broken.log:\n{output[-4000:]}")

    server = start_dagster_dev(home, dagster_home, env=env, log_path=root / "dagster_dev.log")
    try:
        yield {"url": server.url, "home": home, "dagster_home": dagster_home, "server": server}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("ui_screenshots")
    yield folder
    print(f"\nDagster UI screenshots: {folder}")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} does not exist: install Debian's Chromium "
                    "(apt-get install -y --no-install-recommends chromium); .ci/run does this")  # fmt: skip
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, ui):
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT)
    # the first visit opens a "Join the Dagster community" dialog over everything: mark it seen
    context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()


def _save(page, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path))
    target = os.environ.get("RECSYS_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


def _metadata_row(page, key: str):
    """The row of the asset page's metadata table whose key cell is exactly ``key``."""
    from playwright.sync_api import expect

    row = page.locator("tr").filter(has=page.get_by_role("cell", name=key, exact=True))
    expect(row.first).to_be_visible()
    return row.first


def _open_dialog(page, row, button: str):
    from playwright.sync_api import expect

    row.get_by_text(button, exact=True).click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    # it fades in: wait until it and every ancestor are fully opaque (for the screenshot)
    page.wait_for_function(
        """d => { for (let e = d; e; e = e.parentElement) {
                    if (parseFloat(getComputedStyle(e).opacity) < 1) return false; }
                  return true; }""",
        arg=dialog.element_handle(),
    )
    return dialog


def _latest_metadata(dagster_home: Path, asset: str) -> dict:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was never materialised in {dagster_home}"
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_asset_graph_shows_every_stage_and_family(ui, page, shots):
    from playwright.sync_api import expect

    page.goto(f"{ui['url']}/asset-groups")
    for group in GROUPS:
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
    assets = [f"{stage}_{f}" for f in FAMILIES for stage in ("model", "onnx", "eval", "registry")]
    assets += ["raw_interactions", "raw_users", "raw_items", "fct_ratings", "fct_ctr_samples",
               "training_snapshot", "baseline_metrics", "leaderboard"]  # fmt: skip
    # collapsed groups hide their assets: nothing of a family is drawn yet
    expect(page.get_by_text("model_wals", exact=True)).to_have_count(0)

    # The graph draws only the nodes inside the viewport and zooms out no further than ~0.3, so
    # the whole expanded graph needs a tall window. Hide the left navigation and the asset tree,
    # "Expand all groups" (its shortcut, ⌥E), then drag the canvas a little so the top shows.
    page.set_viewport_size(GRAPH_VIEWPORT)
    page.get_by_text("Hide navigation", exact=True).click()
    page.locator("button:has([aria-label='panel_show_right'])").click()
    page.keyboard.press("Alt+e")
    expect(page.get_by_text("training_snapshot", exact=True).first).to_be_visible()
    page.mouse.move(GRAPH_VIEWPORT["width"] - 300, 300)
    page.mouse.down()
    page.mouse.move(GRAPH_VIEWPORT["width"] - 310, 350, steps=8)
    page.mouse.up()
    for name in assets:
        expect(page.get_by_text(name, exact=True).first, f"asset {name} in the graph").to_be_visible()
    page.wait_for_load_state("networkidle")  # each node's status arrives after the layout
    _save(page, shots, "ui_asset_graph")


def test_model_page_shows_training_curve(ui, page, shots):
    from playwright.sync_api import expect

    meta = _latest_metadata(ui["dagster_home"], "model_wals")
    page.goto(f"{ui['url']}/assets/model_wals")
    expect(page.get_by_text("trained on the mart snapshot", exact=False).first).to_be_visible()
    curve = _metadata_row(page, "training_curve")
    for column in ("epoch", "train_loss", "valid_metric"):
        expect(curve.get_by_text(column, exact=True).first).to_be_visible()
    # one table row per epoch the model trained, plus the header
    expect(curve.locator("table tr")).to_have_count(meta["epochs"] + 1)
    # what it was trained on: the snapshot folder; who owns it, what it is, which group
    expect(_metadata_row(page, "snapshot")).to_contain_text(meta["snapshot"])
    expect(_metadata_row(page, "config")).to_contain_text('"lam"')
    # where the checkpoint lives (not the IO manager's pickle, which owns the key "path")
    expect(_metadata_row(page, "checkpoint_dir")).to_contain_text("/artifacts/wals/")
    for text in ("recsys-ml", "PyTorch", "train"):
        expect(page.get_by_text(text, exact=True).first).to_be_visible()
    curve.scroll_into_view_if_needed()
    _save(page, shots, "ui_model_wals")


def test_onnx_page_shows_parity_and_lineage(ui, page, shots):
    from playwright.sync_api import expect

    page.goto(f"{ui['url']}/assets/onnx_wals")
    parity = _metadata_row(page, "parity")
    for case in ("batch_1", "batch_257", "unknown_ids"):
        expect(parity.get_by_text(case, exact=True).first).to_be_visible()
    expect(parity.get_by_text("no", exact=True)).to_have_count(0)
    # asset-level lineage: the model it was exported from, the snapshot it was checked on
    for upstream in ("model_wals", "training_snapshot"):
        expect(page.locator(f"a[href$='/assets/{upstream}']").first).to_be_visible()
    _save(page, shots, "ui_onnx_wals")

    # the lineage JSON in the UI is the lineage.json written beside model.onnx
    written = sorted(ui["home"].glob("artifacts/wals/*/onnx/lineage.json"))
    assert written, f"no lineage.json under {ui['home']}/artifacts/wals"
    lineage = json.loads(written[-1].read_text())
    dialog = _open_dialog(page, _metadata_row(page, "lineage"), "[Show JSON]")
    for key in ("snapshot_fingerprint", "data_fingerprint", "code_version"):
        expect(dialog).to_contain_text(f'"{key}": "{lineage[key]}"')
    _save(page, shots, "ui_onnx_wals_lineage")
    page.keyboard.press("Escape")

    page.goto(f"{ui['url']}/assets/onnx_wals?view=checks")
    expect(page.get_by_text("parity", exact=True).first).to_be_visible()
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()


def test_leaderboard_shows_table_and_chart(ui, page, shots):
    from playwright.sync_api import expect

    page.goto(f"{ui['url']}/assets/leaderboard")
    best = _metadata_row(page, "best")
    for family in FAMILIES:
        expect(best.get_by_text(family, exact=True)).to_be_visible()

    table = _open_dialog(page, _metadata_row(page, "leaderboard"), "[Show Markdown]")
    for model in (*FAMILIES, "baseline:popularity", "baseline:random"):
        expect(table.locator("td").filter(has_text=model).first).to_be_visible()
    expect(table.get_by_text("ndcg@10", exact=True).first).to_be_visible()
    _save(page, shots, "ui_leaderboard_table")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)

    chart = _open_dialog(page, _metadata_row(page, "chart"), "[Show Markdown]")
    image = chart.locator("img")
    expect(image).to_be_visible()
    # decoded by the browser (a broken image has no natural width) ...
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    # ... and byte for byte the PNG the asset wrote
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:60]
    png = ui["home"] / "reports" / "leaderboard.png"
    assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes(), f"UI chart differs from {png}"
    _save(page, shots, "ui_leaderboard_chart")


def test_failed_contract_check_is_visible_as_failed(ui, page, shots):
    from playwright.sync_api import expect

    page.goto(f"{ui['url']}/assets/raw_interactions?view=checks")
    expect(page.get_by_text("This is a blocking asset check", exact=False)).to_be_visible()
    expect(page.get_by_text("contract", exact=True).first).to_be_visible()
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible()
    expect(page.get_by_text("Passed", exact=True)).to_have_count(0)
    _save(page, shots, "ui_contract_failed")

    # the check's report names the failing column
    report = page.locator("tr").filter(has=page.get_by_text("report", exact=True))
    dialog = _open_dialog(page, report.first, "[Show Markdown]")
    expect(dialog).to_contain_text("rating")
    _save(page, shots, "ui_contract_failed_report")
