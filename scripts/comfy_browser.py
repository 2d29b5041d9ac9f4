"""Drive ComfyUI's real web frontend in Debian's headless Chromium with Playwright for Python.

Used by the browser test (tests/test_browser_ui.py) and by the workflow asset generator
(scripts/make_workflow_assets.py):

    with ComfyBrowser() as browser:
        ui = browser.open(server.url)                   # a ComfyPage: the app is loaded
        ui.open_workflow_file(path)                     # Ctrl+O and the file chooser, as a user does
        assert not ui.missing_nodes_dialog()
        prompt_id = ui.queue_from_ui()                  # clicks Run
        ui.wait_for_prompt(prompt_id)                   # the frontend's own websocket events

The browser is /usr/bin/chromium (scripts/setup_browser.sh installs it from Debian) or DF_CHROMIUM;
Playwright's own browser download is never used. Every start gets a fresh --user-data-dir.
Only the standard library and playwright.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("DF_CHROMIUM", "/usr/bin/chromium")
# What this machine's Chromium needs headless as root with no network beyond loopback.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
# Settings a returning user has: no first-run templates dialog; the missing-nodes warning on (default).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    # screenshots: node text at any zoom, no minimap over the canvas
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Minimap.Visible": False,
}


class BrowserError(RuntimeError):
    pass


def _css_string(text: str) -> str:
    """`text` for inside a double-quoted CSS attribute value (template titles have spaces and commas)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def chromium_available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


class ComfyBrowser:
    """One headless Chromium (Playwright persistent context with a fresh user-data-dir)."""

    def __init__(self, *, viewport=(1400, 900), log_console: bool = False):
        self.viewport = {"width": viewport[0], "height": viewport[1]}
        self.log_console = log_console
        self.console: list[str] = []
        self._pw = None
        self.context = None
        self._profile = None

    def __enter__(self) -> "ComfyBrowser":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> "ComfyBrowser":
        from playwright.sync_api import sync_playwright

        if not chromium_available():
            raise BrowserError(f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh (Debian's chromium)")
        self._profile = tempfile.mkdtemp(prefix="dreamforge-chromium-")
        self._pw = sync_playwright().start()
        try:
            self.context = self._pw.chromium.launch_persistent_context(
                self._profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport=self.viewport, accept_downloads=False,
            )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.context is not None:
            try:
                self.context.close()
            finally:
                self.context = None
        if self._pw is not None:
            self._pw.stop()
            self._pw = None
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def open(self, url: str, timeout: float = 90.0, settings: dict | None = None) -> "ComfyPage":
        """Pre-set the settings a returning user has (and `settings`, e.g. {"Comfy.VueNodes.Enabled": True}
        for the Nodes 2.0 renderer of newer frontends), open the UI and wait until the app is up."""
        page = self.context.new_page()
        page.on("console", self._on_console)
        page.on("pageerror", lambda err: self.console.append(f"pageerror: {err}"))
        for key, value in {**SETTINGS, **(settings or {})}.items():
            resp = page.request.post(f"{url}/api/settings/{key}", data=json.dumps(value),
                                     headers={"Content-Type": "application/json"})
            if not resp.ok:
                raise BrowserError(f"POST /api/settings/{key} -> {resp.status}")
        ui = ComfyPage(page, url)
        ui.load(timeout)
        return ui

    def _on_console(self, msg) -> None:
        line = f"{msg.type}: {msg.text}"
        self.console.append(line)
        if self.log_console:
            print("[browser]", line[:300], flush=True)


# JavaScript run in the page. `app` is window.app (ComfyUI's ComfyApp), LiteGraph is window.LiteGraph.
_JS_INSTALL_EVENT_LOG = """() => {
  if (window.__df_events) return;
  window.__df_events = [];
  const keep = ['execution_start', 'executing', 'executed', 'execution_success', 'execution_error',
                'execution_interrupted', 'execution_cached'];
  for (const type of keep) {
    app.api.addEventListener(type, (e) => window.__df_events.push({type, detail: e.detail}));
  }
}"""

_JS_LIVE_NODES = """() => app.graph.nodes.map((n) => ({
  id: n.id, type: n.type, title: n.title,
  registered: n.type in LiteGraph.registered_node_types,
  has_errors: !!n.has_errors,
  // the widgets litegraph keeps in widgets_values (configure() assigns the file's values to these, in order)
  widgets: (n.widgets || []).filter((w) => w.serialize !== false).map((w) => ({name: w.name, value: w.value})),
  serialized: n.serialize().widgets_values ?? null,
}))"""

_JS_BUILD_FROM_API = """async ({api, notes, order}) => {
  // Build the UI graph of an API-format prompt with the frontend's own node classes, so every
  // widget, socket and default is what a user gets when adding the nodes by hand.
  app.graph.clear();
  const made = {};
  for (const id of order) {
    const spec = api[id];
    const node = LiteGraph.createNode(spec.class_type);
    if (!node) throw new Error(`node type ${spec.class_type} is not registered in the frontend`);
    node.id = Number(id);
    app.graph.add(node);
    if (spec._meta && spec._meta.title) node.title = spec._meta.title;
    made[id] = node;
  }
  const problems = [];
  for (const id of order) {
    const spec = api[id], node = made[id];
    for (const [name, value] of Object.entries(spec.inputs)) {
      if (Array.isArray(value) && value.length === 2 && typeof value[0] === 'string' && made[value[0]]) {
        const slot = node.findInputSlot(name);
        if (slot < 0) { problems.push(`${id}.${name}: no input socket`); continue; }
        const link = made[value[0]].connect(value[1], node, slot);
        if (!link) problems.push(`${id}.${name}: could not connect ${value[0]}:${value[1]}`);
        continue;
      }
      const w = (node.widgets || []).find((w) => w.name === name);
      if (!w) { problems.push(`${id}.${name}: no widget`); continue; }
      w.value = value;
    }
    for (const w of node.widgets || []) {
      if (w.name === 'control_after_generate') w.value = 'fixed';  // reproducible seeds
    }
  }
  if (problems.length) throw new Error(problems.join('; '));
  // layout: a column per depth (longest path from a source), nodes stacked in each column
  const depth = {};
  const depthOf = (id) => {
    if (depth[id] !== undefined) return depth[id];
    let d = 0;
    for (const v of Object.values(api[id].inputs))
      if (Array.isArray(v) && v.length === 2 && made[v[0]]) d = Math.max(d, depthOf(v[0]) + 1);
    return (depth[id] = d);
  };
  const columns = {};
  for (const id of order) (columns[depthOf(id)] ??= []).push(id);
  let x = 40;
  let noteY = 40;
  for (const d of Object.keys(columns).map(Number).sort((a, b) => a - b)) {
    let y = 40, width = 0;
    for (const id of columns[d]) {
      const node = made[id];
      const size = node.computeSize();
      const titleWidth = Math.min(600, 8.5 * node.title.length + 70);
      // nodes that show an image or text grow when it arrives: leave room for it
      const room = {LoadImage: 380, SaveImage: 380, DreamForgeSaveImage: 380, PreviewImage: 380, PreviewAny: 220}[node.type] || 0;
      // nodes that show a preview of each step while they run
      const preview = /^DreamForgeCoZ/.test(node.type) ? 300 : 0;
      const height = Math.max(size[1], room) + preview;
      node.size = [Math.max(size[0], 320, titleWidth), height];
      node.pos = [x, y];
      y += node.size[1] + 70;
      width = Math.max(width, node.size[0]);
      noteY = Math.max(noteY, y);
    }
    x += width + 60;
  }
  for (const text of notes) {
    const note = LiteGraph.createNode('MarkdownNote') || LiteGraph.createNode('Note');
    app.graph.add(note);
    note.widgets[0].value = text;
    note.title = 'About this workflow';
    note.size = [Math.max(480, x - 100), 180];
    note.pos = [40, noteY];
    noteY += 220;
  }
  app.graph.setDirtyCanvas(true, true);
  const {workflow, output} = await app.graphToPrompt();
  return JSON.stringify({workflow, output});  // as Export writes it (undefined fields left out)
}"""


class ComfyPage:
    """The ComfyUI frontend in one browser tab."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url

    # ------------------------------------------------------------------------------ loading
    def load(self, timeout: float = 90.0) -> None:
        self.page.goto(self.url + "/", wait_until="domcontentloaded", timeout=timeout * 1000)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph && "
            "document.querySelector('[data-testid=\"queue-button\"]')", timeout=timeout * 1000)
        self.page.evaluate(_JS_INSTALL_EVENT_LOG)
        self.close_dialogs()

    def close_dialogs(self) -> None:
        """Close whatever dialog is open (Escape), as a user would."""
        for _ in range(3):
            if self.page.locator(".p-dialog").count() == 0:
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def open_workflow_file(self, path: str | os.PathLike, timeout: float = 30.0, attempts: int = 4) -> int:
        """Workflow > Open (Ctrl+O) and pick the file in the file chooser, as a user does.

        Returns how many presses it took: the browser shows a file chooser only within a user gesture,
        and under CPU load a press is now and then handled after its gesture has lapsed; the key is then
        pressed again (a person would too)."""
        expected = len(json.loads(Path(path).read_text())["nodes"])
        for attempt in range(1, attempts + 1):
            self.page.evaluate("() => document.activeElement && document.activeElement.blur()")  # not in a text box
            try:
                with self.page.expect_file_chooser(timeout=timeout * 1000 / attempts) as chooser:
                    self.page.keyboard.press("Control+o")
            except Exception as exc:  # playwright TimeoutError
                if attempt == attempts:
                    raise BrowserError(f"Ctrl+O showed no file chooser in {attempts} tries") from exc
                continue
            chooser.value.set_files(str(path))
            break
        self.page.wait_for_function("(n) => app.graph.nodes.length === n", arg=expected, timeout=timeout * 1000)
        self.page.wait_for_timeout(300)  # the dialogs the loader may raise are shown after configure
        return attempt

    def new_blank_workflow(self) -> None:
        """Workflow > New: an empty graph in a new tab."""
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
        self.page.wait_for_function("() => app.graph.nodes.length === 0")

    def missing_nodes_dialog(self) -> list[str]:
        """The node types ComfyUI says are missing ([] when it says nothing): frontend 1.32.9's dialog
        lists them; newer frontends show a notice titled "Missing node: TYPE" (or "Missing nodes")."""
        box = self.page.locator(".comfy-missing-nodes")
        if box.count() and box.first.is_visible():
            return [t.strip() for t in box.first.locator("span").all_inner_texts() if t.strip()] or ["(dialog open)"]
        notices = self.page.get_by_text(re.compile(r"^Missing nodes?(: .+)?$"))
        titles = [t.strip() for i, t in enumerate(notices.all_inner_texts()) if notices.nth(i).is_visible()]
        return [t.split(": ", 1)[1] if ": " in t else "(notice shown)" for t in titles]

    MISSING_MODELS = "the following models were not found"  # frontend 1.32.9's missing-models dialog

    def missing_models_dialog(self, timeout: float = 0.0) -> str:
        """The text of ComfyUI's missing-models dialog ("" when none is open; with `timeout`, wait that long
        for it: the page opens it after asking the server for the model folders). It lists each missing file
        as "directory / name" with its download link."""
        box = self.page.locator(".p-dialog", has_text=self.MISSING_MODELS)
        if timeout:
            try:
                box.first.wait_for(state="visible", timeout=timeout * 1000)
            except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no dialog
                return ""
        return box.first.inner_text() if box.count() and box.first.is_visible() else ""

    def missing_model_links(self) -> list[str]:
        """The download links the open missing-models dialog offers (its anchors and URL tooltips)."""
        box = self.page.locator(".p-dialog", has_text=self.MISSING_MODELS).first
        return box.evaluate("""(el) => [...el.querySelectorAll('a[href], [title], [data-url]')]
            .map((e) => e.getAttribute('href') || e.dataset.url || e.getAttribute('title'))
            .filter((u) => u && u.startsWith('http'))""")

    def warning_toasts(self) -> list[str]:
        """Texts of the warning / error toasts on screen (e.g. "Invalid workflow against zod schema")."""
        out = []
        for el in self.page.locator(".p-toast-message").all():
            cls = el.get_attribute("class") or ""
            if "p-toast-message-warn" in cls or "p-toast-message-error" in cls:
                out.append(el.inner_text().strip())
        return out

    def clear_toasts(self) -> None:
        for button in self.page.locator(".p-toast-message .p-toast-close-button").all():
            try:
                button.click(timeout=2000)
            except Exception:  # noqa: BLE001 - a toast that went away by itself
                pass

    def open_templates_dialog(self, module: str, timeout: float = 30.0) -> dict:
        """Click Templates in the sidebar, then the pack's entry under Extensions; the cards shown:
        {name: {"title": the card's heading, "text": all its text, "thumbnail": src, "width": natural width
        once decoded}}."""
        self.page.locator("button.templates-tab-button, button[aria-label^='Templates']").first.click()
        content = self.page.locator('[data-testid="template-workflows-content"]')
        content.wait_for(state="visible", timeout=timeout * 1000)
        self.page.get_by_text(module, exact=True).first.click()
        cards = self.page.locator('[data-testid^="template-workflow-"]')
        self.page.wait_for_function(
            # LazyImage sets src only once the card is seen, and an <img> without src counts as complete
            """() => { const imgs = [...document.querySelectorAll('[data-testid^="template-workflow-"] img')];
                       return imgs.length > 0 && imgs.every((i) => i.getAttribute('src') && i.complete
                                                                    && i.naturalWidth > 0); }""",
            timeout=timeout * 1000)
        out = {}
        for card in cards.all():
            name = card.get_attribute("data-testid")[len("template-workflow-"):]
            card.scroll_into_view_if_needed()  # a card below the fold gets its <img> only once it is seen
            img = card.locator("img").first
            try:
                img.wait_for(state="attached", timeout=timeout * 1000)
                self.page.wait_for_function("(i) => i.getAttribute('src') && i.complete && i.naturalWidth > 0",
                                            arg=img.element_handle(), timeout=timeout * 1000)
            except Exception:  # noqa: BLE001 - Playwright's TimeoutError: reported below as no thumbnail
                pass
            heading = card.locator("h3").first
            out[name] = {"title": heading.inner_text().strip() if heading.count() else "",
                         "text": card.inner_text(),
                         "thumbnail": img.get_attribute("src") if img.count() else None,
                         "width": img.evaluate("(i) => i.naturalWidth") if img.count() else 0}
        return out

    def open_template(self, name: str, timeout: float = 30.0) -> None:
        """Click a card of the open templates dialog; wait until the dialog closed and the graph loaded."""
        self.page.locator(f'[data-testid="template-workflow-{_css_string(name)}"]').first.click()
        self.page.locator('[data-testid="template-workflows-content"]').wait_for(state="detached",
                                                                                timeout=timeout * 1000)
        self.page.wait_for_function("() => app.graph.nodes.length > 0", timeout=timeout * 1000)
        self.page.wait_for_timeout(300)

    def live_nodes(self) -> list[dict]:
        """Every node of the graph in the page: type, registered?, widget values (live and serialised)."""
        return self.page.evaluate(_JS_LIVE_NODES)

    def loaded_differences(self, workflow: dict) -> list[str]:
        """How the graph in the page differs from the UI-format `workflow` just opened: a missing-nodes or
        missing-models dialog, warning toasts (e.g. the schema check), other node ids or types, unregistered node types,
        widget values (live, and as the node re-serialises them) unlike the file's widgets_values."""
        problems = []
        missing = self.missing_nodes_dialog()
        if missing:
            problems.append(f"missing-nodes dialog: {missing}")
        models = self.missing_models_dialog()
        if models:
            problems.append(f"missing-models dialog: {' | '.join(models.split(chr(10)))}")
        problems += [f"warning: {w}" for w in self.warning_toasts()]
        # ids as text: 1.32.9 keeps the file's numbers, newer frontends turn them into strings
        live = {str(n["id"]): n for n in self.live_nodes()}
        ids = sorted(str(n["id"]) for n in workflow["nodes"])
        if sorted(live) != ids:
            problems.append(f"node ids {sorted(live)} != file {ids}")
        for node in workflow["nodes"]:
            got = live.get(str(node["id"]))
            if got is None:
                continue
            where = f"node {node['id']} ({node['type']})"
            if got["type"] != node["type"]:
                problems.append(f"{where}: type in the page {got['type']}")
            if not got["registered"]:
                problems.append(f"{where}: not a registered node type")
            want = node.get("widgets_values", [])
            values = [w["value"] for w in got["widgets"]]
            if values != want:
                pairs = [(w["name"], w["value"]) for w in got["widgets"]]
                problems.append(f"{where}: widgets in the page {pairs} != file {want}")
            elif (got["serialized"] or []) != want:
                problems.append(f"{where}: re-serialises as {got['serialized']} != file {want}")
        return problems

    def graph_to_prompt(self) -> dict:
        """{"workflow": UI format, "output": API format} exactly as the frontend makes them to queue/export."""
        return json.loads(self.page.evaluate("async () => { const r = await app.graphToPrompt(); "
                                             "return JSON.stringify({workflow: r.workflow, output: r.output}); }"))

    def set_widget(self, node_id: int, name: str, value) -> None:
        self.page.evaluate(
            """([id, name, value]) => {
                 const node = app.graph.getNodeById(id);
                 const w = node.widgets.find((w) => w.name === name);
                 if (!w) throw new Error(`node ${id} has no widget ${name}`);
                 w.value = value; w.callback?.(value, app.canvas, node);
                 app.graph.setDirtyCanvas(true, true);
               }""", [node_id, name, value])

    def remove_node(self, node_id: int) -> None:
        self.page.evaluate("(id) => { app.graph.remove(app.graph.getNodeById(id)); app.graph.setDirtyCanvas(true, true); }",
                           node_id)

    def combo_values(self, node_id: int, name: str) -> list:
        return self.page.evaluate(
            "([id, name]) => app.graph.getNodeById(id).widgets.find((w) => w.name === name).options.values",
            [node_id, name])

    # ------------------------------------------------------------------------------ building
    def build_from_api(self, api: dict, notes: list[str] = ()) -> dict:
        """Build the graph of an API prompt with the frontend's node classes; {"workflow", "output"}."""
        order = sorted(api, key=lambda k: (len(k), k))
        self.new_blank_workflow()
        return json.loads(self.page.evaluate(_JS_BUILD_FROM_API, {"api": api, "notes": list(notes), "order": order}))

    # ------------------------------------------------------------------------------ running
    def queue_from_ui(self, timeout: float = 30.0) -> str:
        """Click Run; the prompt id the server gave (read from the frontend's websocket log)."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                       timeout=timeout * 1000) as resp_info:
            # 1.32.9 wraps the button in the test id; newer frontends put the id on the button itself
            self.page.locator('[data-testid="queue-button"] button, button[data-testid="queue-button"]').first.click()
        resp = resp_info.value
        body = resp.json()
        if resp.status != 200 or "prompt_id" not in body:
            raise BrowserError(f"the server refused the prompt queued from the UI (HTTP {resp.status}): "
                               f"{json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def events(self, prompt_id: str | None = None) -> list[dict]:
        events = self.page.evaluate("() => window.__df_events")
        if prompt_id is None:
            return events
        return [e for e in events if isinstance(e.get("detail"), dict) and e["detail"].get("prompt_id") == prompt_id]

    def wait_for_prompt(self, prompt_id: str, timeout: float = 180.0) -> list[dict]:
        """Wait for the frontend to hear execution_success / _error / _interrupted; its events for the prompt."""
        done = ("execution_success", "execution_error", "execution_interrupted")
        self.page.wait_for_function(
            "([pid, done]) => window.__df_events.some((e) => e.detail && e.detail.prompt_id === pid && "
            "done.includes(e.type))", arg=[prompt_id, list(done)], timeout=timeout * 1000, polling=250)
        events = self.events(prompt_id)
        final = [e for e in events if e["type"] in done][-1]
        if final["type"] != "execution_success":
            raise BrowserError(f"prompt {prompt_id} ended with {final['type']}: {json.dumps(final['detail'])[:3000]}")
        return events

    def node_images(self, node_id: int) -> list[dict]:
        """The images the node shows on the canvas (node.imgs): src and natural size once loaded."""
        return self.page.evaluate(
            """(id) => {
                 const node = app.graph.getNodeById(id);
                 return (node.imgs || []).map((img) => ({src: img.src, complete: img.complete,
                                                          width: img.naturalWidth, height: img.naturalHeight}));
               }""", node_id)

    def wait_for_node_images(self, node_id: int, count: int, timeout: float = 30.0) -> list[dict]:
        self.page.wait_for_function(
            """([id, count]) => {
                 const node = app.graph.getNodeById(id);
                 return node && node.imgs && node.imgs.length >= count &&
                        node.imgs.every((img) => img.complete && img.naturalWidth > 0);
               }""", arg=[node_id, count], timeout=timeout * 1000, polling=200)
        return self.node_images(node_id)

    def _active_sidebar_tab(self):
        return self.page.evaluate("() => app.extensionManager.sidebarTab.activeSidebarTabId ?? null")

    def show_queue_sidebar(self, show: bool = True) -> None:
        """Open (or close) the Queue sidebar tab: the runs with their result images."""
        if (self._active_sidebar_tab() == "queue") != show:
            self.page.locator("button.queue-tab-button").first.click()
            self.page.wait_for_function(
                "(show) => (app.extensionManager.sidebarTab.activeSidebarTabId === 'queue') === show", arg=show)

    def wait_for_rendered_img(self, filename: str, within: str = "body", timeout: float = 30.0) -> dict:
        """An <img> element under `within` whose src names `filename`, decoded (naturalWidth > 0)."""
        find = """([name, within]) => [...document.querySelectorAll(within + ' img')].find((img) =>
                    decodeURIComponent(img.src).includes('filename=' + name) && img.complete && img.naturalWidth > 0)"""
        self.page.wait_for_function(f"(a) => !!({find})(a)", arg=[filename, within], timeout=timeout * 1000,
                                    polling=250)
        return self.page.evaluate(f"(a) => {{ const img = ({find})(a); "
                                  "return {src: img.src, width: img.naturalWidth, height: img.naturalHeight}; }",
                                  [filename, within])

    def fit_view(self) -> None:
        self.page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(300)

    def screenshot(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    # ------------------------------------------------------------------------------ node search
    def add_node_by_search(self, text: str, at=(700, 450), timeout: float = 15.0) -> str:
        """Double-click empty canvas, type into the node search box that opens, wait until the first
        suggestion shows what was typed, press Enter. Returns the first suggestion's text."""
        mask = self.page.locator(".node-search-box-dialog-mask")
        for attempt in range(3):  # litegraph times the two clicks itself; under load one may come late
            self.page.locator("#graph-canvas").dblclick(position={"x": at[0], "y": at[1]})
            try:
                mask.wait_for(state="visible", timeout=timeout * 1000 / 3)
                break
            except Exception:  # noqa: BLE001 - playwright TimeoutError
                if attempt == 2:
                    raise BrowserError("double-clicking the canvas opened no node search box") from None
                self.page.keyboard.press("Escape")
        self.page.locator(".comfy-vue-node-search-container input").first.wait_for(state="visible")
        self.page.keyboard.type(text, delay=5)  # the search box has the focus, as for a user
        self.page.wait_for_function(
            """(text) => { const o = document.querySelector('.node-search-box-dialog-mask .p-autocomplete-list [role="option"]');
                           return o && o.innerText.includes(text); }""", arg=text, timeout=timeout * 1000)
        first = self.page.locator('.node-search-box-dialog-mask .p-autocomplete-list [role="option"]').first.inner_text()
        self.page.keyboard.press("Enter")
        mask.wait_for(state="detached", timeout=timeout * 1000)
        return first


# ------------------------------------------------------------------------------ a newer frontend
FRONTEND_PACKAGE = "comfyui-frontend-package"
FRONTEND_CACHE = Path(os.environ.get("DF_FRONTEND_CACHE", Path.home() / ".cache" / "dreamforge-upscale" / "frontend"))


def _wheel_version(wheel: Path) -> tuple[int, ...]:
    """comfyui_frontend_package-1.58.1-py3-none-any.whl -> (1, 58, 1)."""
    return tuple(int(p) for p in wheel.name.split("-")[1].split(".") if p.isdigit())


def frontend_static(version: str | None = None, cache: Path = FRONTEND_CACHE) -> tuple[str, Path]:
    """A comfyui-frontend-package from the package registry, unpacked into `cache` (not into the venv, so
    the pinned one ComfyUI imports stays): (version, its static/ folder for --front-end-root). `version`
    None: the newest on the registry (DF_NEW_FRONTEND pins one); offline, the newest wheel already cached.
    Raises BrowserError naming what to do when there is none."""
    import subprocess
    import sys
    import zipfile

    version = version or os.environ.get("DF_NEW_FRONTEND") or None
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{FRONTEND_PACKAGE}=={version}" if version else FRONTEND_PACKAGE
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "--disable-pip-version-check", "-d", str(wheels), spec],
                         capture_output=True, text=True, timeout=300)
    pattern = f"comfyui_frontend_package-{version or '*'}-py3-none-any.whl"
    found = sorted(wheels.glob(pattern), key=_wheel_version)
    if not found:
        raise BrowserError(f"no {spec} wheel: pip download said {got.stderr.strip()[-500:]!r}; "
                           f"put the wheel in {wheels} or set DF_NEW_FRONTEND to a cached version")
    # the newest pip named, or (offline) the newest cached
    named = [w for w in found if w.name in got.stdout]
    wheel = named[-1] if named else found[-1]
    target = cache / wheel.name.split("-")[1]
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=cache))
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # whole or not at all: a killed unpack leaves no half folder behind
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return wheel.name.split("-")[1], static
