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
import re
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
# Every wait below is for a state (a node drawn, a dialog open, a status loaded), never for a
# fixed time: a state that is already there costs nothing, so the deadlines are generous for a
# busy machine, and each failure says which state never came.
TIMEOUT_MS = 120_000
MATERIALISE_S = 900
DEV_READY_S = 300
VIEWPORT = {"width": 1600, "height": 1100}
GRAPH_VIEWPORT = {"width": 1700, "height": 1650}
# The asset graph draws every node (group or asset) as a foreignObject inside one SVG, which
# sits in the div the viewport pans and zooms by its CSS transform.
GRAPH_NODE = "svg foreignObject"
GRAPH_CANVAS = "svg[class*=svgContainer]"
LOADING_BACKGROUND = "var(--color-background-light)"  # a node whose live status has not arrived


def _materialise(env: dict[str, str], select: str, log: Path) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(
            [_exe("dagster"), "asset", "materialize", "-m", MODULE, "--select", select],
            env=env, capture_output=True, text=True, timeout=MATERIALISE_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"{exc.stdout or ''}{exc.stderr or ''}")
        pytest.fail(f"waited {MATERIALISE_S} s for `dagster asset materialize --select {select!r}` to "
                    f"finish (log {log})")  # fmt: skip
    log.write_text(result.stdout + result.stderr)
    return result


def _visible(locator, what: str) -> None:
    from playwright.sync_api import expect

    expect(locator, f"waited {TIMEOUT_MS // 1000} s for {what}").to_be_visible(timeout=TIMEOUT_MS)


def _click(locator, what: str) -> None:
    _visible(locator, what)
    locator.click(timeout=TIMEOUT_MS)


def _until(page, predicate: str, what: str, arg=None) -> None:
    """Wait until the JavaScript ``predicate`` holds in the page; on timeout, say what for."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(predicate, arg=arg, timeout=TIMEOUT_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"waited {TIMEOUT_MS // 1000} s for {what}") from None


def _goto(page, url: str) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.goto(url, timeout=TIMEOUT_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"waited {TIMEOUT_MS // 1000} s for {url} to load") from None


def _graph_node(page, name: str):
    """The node ``name`` as drawn in the asset graph (the sidebar's asset tree lists the same
    names, and sooner: it does not wait for the layout)."""
    return page.locator(GRAPH_NODE).filter(has=page.get_by_text(name, exact=True))


def _graph_settled(page, what: str) -> None:
    """Until the graph's pan/zoom transform has not changed for half a second: after each new
    layout (and after the window is resized) the viewport centres itself, which would undo a
    drag made before it."""
    page.evaluate("delete window.__recsysGraphTransform")  # measured from now, not an earlier call
    _until(
        page,
        """sel => { const canvas = document.querySelector(sel)?.parentElement;
                    if (!canvas) return false;
                    const now = performance.now(), t = canvas.style.transform;
                    const last = window.__recsysGraphTransform;
                    if (last && last.t === t) return now - last.since > 500;
                    window.__recsysGraphTransform = {t, since: now};
                    return false; }""",
        what,
        arg=GRAPH_CANVAS,
    )


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
        pytest.fail(
            f"ingesting {broken} (every rating 1.0) should fail the raw_interactions contract; "
            f"exit code {bad.returncode}, log {root}/materialise_broken.log:\n{output[-4000:]}"
        )

    server = start_dagster_dev(home, dagster_home, env=env, log_path=root / "dagster_dev.log",
                               timeout=DEV_READY_S)  # fmt: skip
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
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
            )
        except PlaywrightTimeout:
            pytest.fail(f"waited {TIMEOUT_MS // 1000} s for {CHROMIUM} to start")
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
    row = page.locator("tr").filter(has=page.get_by_role("cell", name=key, exact=True))
    _visible(row.first, f"the metadata row {key!r}")
    return row.first


def _open_dialog(page, row, button: str):
    _click(row.get_by_text(button, exact=True), f"the {button} link in its row")
    dialog = page.get_by_role("dialog")
    _visible(dialog, f"the dialog {button} opens")
    # it fades in: wait until it and every ancestor are fully opaque (for the screenshot)
    _until(
        page,
        """d => { for (let e = d; e; e = e.parentElement) {
                    if (parseFloat(getComputedStyle(e).opacity) < 1) return false; }
                  return true; }""",
        f"the dialog {button} to finish fading in",
        arg=dialog.element_handle(timeout=TIMEOUT_MS),
    )
    return dialog


def _close_dialog(page) -> None:
    """Escape closes the dialog; sent only once it is open (``_open_dialog`` waited for that)."""
    from playwright.sync_api import expect

    page.keyboard.press("Escape")
    expect(
        page.get_by_role("dialog"), f"waited {TIMEOUT_MS // 1000} s for the dialog to close"
    ).to_have_count(0)


def _latest_metadata(dagster_home: Path, asset: str) -> dict:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was never materialised in {dagster_home}"
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _materialised(dagster_home: Path, assets: list[str]) -> list[str]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return [a for a in assets if instance.get_latest_materialization_event(dg.AssetKey(a))]


def test_asset_graph_shows_every_stage_and_family(ui, page, shots):
    from playwright.sync_api import expect

    _goto(page, f"{ui['url']}/asset-groups")
    # the graph itself is drawn once its layout is computed: one collapsed node per group
    for group in GROUPS:
        _visible(_graph_node(page, group).first, f"group {group} drawn in the asset graph")
    assets = [f"{stage}_{f}" for f in FAMILIES for stage in ("model", "onnx", "eval", "registry")]
    assets += ["raw_interactions", "raw_users", "raw_items", "fct_ratings", "fct_ctr_samples",
               "training_snapshot", "baseline_metrics", "leaderboard"]  # fmt: skip
    # collapsed groups hide their assets: nothing of a family is drawn yet
    expect(_graph_node(page, "model_wals"), "model_wals hidden in its collapsed group").to_have_count(0)

    # The graph draws only the nodes inside the viewport and zooms out no further than ~0.3, so
    # the whole expanded graph needs a tall window. Hide the left navigation and the asset tree,
    # "Expand all groups" (its shortcut, ⌥E), then drag the canvas a little so the top shows.
    page.set_viewport_size(GRAPH_VIEWPORT)
    _click(page.get_by_text("Hide navigation", exact=True), "the 'Hide navigation' button")
    _click(page.locator("button:has([aria-label='panel_show_right'])"), "the button hiding the asset tree")
    # ⌥E expands the groups the graph has loaded and collapses them when some are open, so it
    # is sent only once the graph is drawn and still, and it must take effect exactly once
    _visible(_graph_node(page, GROUPS[-1]).first, "the collapsed graph drawn in the larger window")
    _graph_settled(page, "the collapsed graph to settle after the window was resized")
    page.keyboard.press("Alt+e")
    expect(
        page, f"waited {TIMEOUT_MS // 1000} s for ⌥E to expand the groups (the URL lists them)"
    ).to_have_url(re.compile(r"[?&]expanded="))
    _visible(
        _graph_node(page, "training_snapshot").first, "the expanded graph drawn (node training_snapshot)"
    )
    _graph_settled(page, "the expanded graph to stop moving (it centres itself after each layout)")
    page.mouse.move(GRAPH_VIEWPORT["width"] - 300, 300)
    page.mouse.down()
    page.mouse.move(GRAPH_VIEWPORT["width"] - 310, 350, steps=8)
    page.mouse.up()
    for name in assets:
        _visible(_graph_node(page, name).first, f"asset {name} in the graph")
    # each node's status arrives after the layout: until it does, a node has the loading colour
    # (which a never-materialised node keeps, so only materialised ones are waited for)
    for name in _materialised(ui["dagster_home"], assets):
        _until(
            page,
            """([sel, name, loading]) => Array.from(document.querySelectorAll(sel)).some(node => {
                   const label = node.querySelector('[class*=assetName]');
                   if (!label || label.textContent !== name) return false;
                   const box = node.querySelector('[class*=minimalAssetNodeBox]');
                   return box ? box.style.getPropertyValue('--minimal-bg') !== loading
                              : !node.textContent.includes('Loading...'); })""",
            f"the status of asset {name} drawn in the graph",
            arg=[GRAPH_NODE, name, LOADING_BACKGROUND],
        )
    _save(page, shots, "ui_asset_graph")


def test_model_page_shows_training_curve(ui, page, shots):
    from playwright.sync_api import expect

    meta = _latest_metadata(ui["dagster_home"], "model_wals")
    _goto(page, f"{ui['url']}/assets/model_wals")
    _visible(page.get_by_text("trained on the mart snapshot", exact=False).first, "model_wals's description")
    curve = _metadata_row(page, "training_curve")
    for column in ("epoch", "train_loss", "valid_metric"):
        _visible(curve.get_by_text(column, exact=True).first, f"column {column} of the training curve")
    # one table row per epoch the model trained, plus the header
    expect(curve.locator("table tr"), "one training-curve row per epoch").to_have_count(meta["epochs"] + 1)
    # what it was trained on: the snapshot folder; who owns it, what it is, which group
    expect(_metadata_row(page, "snapshot"), "the snapshot folder").to_contain_text(meta["snapshot"])
    expect(_metadata_row(page, "config"), "the config").to_contain_text('"lam"')
    # where the checkpoint lives (not the IO manager's pickle, which owns the key "path")
    expect(_metadata_row(page, "checkpoint_dir"), "the checkpoint folder").to_contain_text("/artifacts/wals/")
    for text in ("recsys-ml", "PyTorch", "train"):
        _visible(page.get_by_text(text, exact=True).first, f"{text!r} (owner, kind, group) on the page")
    curve.scroll_into_view_if_needed(timeout=TIMEOUT_MS)
    _save(page, shots, "ui_model_wals")


def test_onnx_page_shows_parity_and_lineage(ui, page, shots):
    from playwright.sync_api import expect

    _goto(page, f"{ui['url']}/assets/onnx_wals")
    parity = _metadata_row(page, "parity")
    for case in ("batch_1", "batch_257", "unknown_ids"):
        _visible(parity.get_by_text(case, exact=True).first, f"parity case {case}")
    expect(parity.get_by_text("no", exact=True), "no failed parity case").to_have_count(0)
    # asset-level lineage: the model it was exported from, the snapshot it was checked on
    for upstream in ("model_wals", "training_snapshot"):
        _visible(page.locator(f"a[href$='/assets/{upstream}']").first, f"the link to upstream {upstream}")
    _save(page, shots, "ui_onnx_wals")

    # the lineage JSON in the UI is the lineage.json written beside model.onnx
    written = sorted(ui["home"].glob("artifacts/wals/*/onnx/lineage.json"))
    assert written, f"no lineage.json under {ui['home']}/artifacts/wals"
    lineage = json.loads(written[-1].read_text())
    dialog = _open_dialog(page, _metadata_row(page, "lineage"), "[Show JSON]")
    for key in ("snapshot_fingerprint", "data_fingerprint", "code_version"):
        expect(dialog, f"{key} in the lineage JSON").to_contain_text(f'"{key}": "{lineage[key]}"')
    _save(page, shots, "ui_onnx_wals_lineage")
    _close_dialog(page)

    _goto(page, f"{ui['url']}/assets/onnx_wals?view=checks")
    _visible(page.get_by_text("parity", exact=True).first, "the parity check")
    _visible(page.get_by_text("Passed", exact=True).first, "the parity check marked Passed")


def test_leaderboard_shows_table_and_chart(ui, page, shots):

    _goto(page, f"{ui['url']}/assets/leaderboard")
    best = _metadata_row(page, "best")
    for family in FAMILIES:
        _visible(best.get_by_text(family, exact=True), f"{family} in the best-model table")

    table = _open_dialog(page, _metadata_row(page, "leaderboard"), "[Show Markdown]")
    for model in (*FAMILIES, "baseline:popularity", "baseline:random"):
        _visible(table.locator("td").filter(has_text=model).first, f"{model} in the leaderboard table")
    _visible(table.get_by_text("ndcg@10", exact=True).first, "the ndcg@10 column")
    _save(page, shots, "ui_leaderboard_table")
    _close_dialog(page)

    chart = _open_dialog(page, _metadata_row(page, "chart"), "[Show Markdown]")
    image = chart.locator("img")
    _visible(image, "the leaderboard chart image")
    # decoded by the browser (a broken image has no natural width) ...
    _until(page, "img => img.complete && img.naturalWidth > 0", "the chart image to be decoded",
           arg=image.element_handle(timeout=TIMEOUT_MS))  # fmt: skip
    # ... and byte for byte the PNG the asset wrote
    src = image.get_attribute("src", timeout=TIMEOUT_MS)
    assert src.startswith("data:image/png;base64,"), src[:60]
    png = ui["home"] / "reports" / "leaderboard.png"
    assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes(), f"UI chart differs from {png}"
    _save(page, shots, "ui_leaderboard_chart")


def test_failed_contract_check_is_visible_as_failed(ui, page, shots):
    from playwright.sync_api import expect

    _goto(page, f"{ui['url']}/assets/raw_interactions?view=checks")
    _visible(page.get_by_text("This is a blocking asset check", exact=False), "the blocking-check note")
    _visible(page.get_by_text("contract", exact=True).first, "the contract check")
    _visible(page.get_by_text("Failed", exact=True).first, "the contract check marked Failed")
    expect(page.get_by_text("Passed", exact=True), "no check marked Passed").to_have_count(0)
    _save(page, shots, "ui_contract_failed")

    # the check's report names the failing column
    report = page.locator("tr").filter(has=page.get_by_text("report", exact=True))
    dialog = _open_dialog(page, report.first, "[Show Markdown]")
    expect(dialog, "the failing column in the report").to_contain_text("rating")
    _save(page, shots, "ui_contract_failed_report")
