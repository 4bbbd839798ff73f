"""Real-browser check of the example workflows (issue 8, part 3).

Starts a live ComfyUI (the same harness the tests use: this pack + the test injector pack in a temporary base
directory, stand-in files under every model name the workflows use, ComfyUI's real frontend from
`comfyui-frontend-package`), then runs tests/browser/check_workflows.mjs in Debian's headless Chromium. For every
workflow in workflows/*.json it asserts: no missing-nodes dialog, every node created with a registered type, the
real Queue button's POST /api/prompt answered 200 with a prompt id that the server then lists in /history.
A negative control (a copy of the first workflow with one node of an unknown type) must trip both checks, so the
check is shown to be able to fail on every run.

Artifacts: test-artifacts/browser/<name>.png (loaded graph, full UI), <name>.queued.png (after queueing),
<name>.canvas.png (graph only); thumbnails workflows/<name>.jpg (512x384, from the .canvas.png).

Run through scripts/browser_check.sh (installs Chromium and playwright-core if missing). Options:
  --no-thumbnails   do not rewrite workflows/*.jpg
  --only NAME       check one workflow (repeatable)
  --workflows DIR   check another folder's workflows

The queued graphs run the real loaders on the empty stand-in checkpoints, so their executions fail on the server;
that is expected here (tests/test_workflows.py runs every workflow end to end on tiny models). The check is that
the frontend builds a prompt the server accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from tdm_devkit import comfy_runtime  # noqa: E402

ARTIFACTS_ROOT = REPO / "test-artifacts" / "browser"
DRIVER = REPO / "tests" / "browser" / "check_workflows.mjs"
THUMBNAIL_SIZE = (512, 384)
UNKNOWN_TYPE = "TDMBrowserCheckNoSuchNode"


def make_control(workflow: dict) -> dict:
    """A copy whose first TDM node has a type no pack registers: what a user sees without this pack installed."""
    control = json.loads(json.dumps(workflow))
    node = next(n for n in control["nodes"] if n["type"].startswith("TDM"))
    node["type"] = UNKNOWN_TYPE
    return control


# Thumbnail banners by what the workflow makes (first key its title contains): graphs look alike at thumbnail size,
# the banner's colour and title tell the cards apart (a test holds every pair of thumbnails apart).
BANNER_KINDS = (("flux", "DISTIL YOUR OWN 4-STEP LORA", (109, 76, 65)),
                ("wan", "DISTIL A 4-STEP VIDEO LORA", (0, 105, 140)),
                ("distil", "DISTIL YOUR OWN 4-STEP LORA", (46, 125, 50)), ("video", "VIDEO · 4 STEPS", (106, 27, 154)),
                ("teacher", "TEACHER VS TDM", (191, 54, 12)), ("sd3.5", "IMAGE · 4 STEPS", (0, 121, 107)),
                ("dreamshaper", "IMAGE · 4 STEPS", (173, 20, 87)), ("", "IMAGE · 4 STEPS", (21, 101, 192)))
BANNER_HEIGHT = 132


def _wrapped(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]


def write_thumbnail(canvas_png: Path, target: Path) -> None:
    """The template browser's card image: a banner with the workflow's title (its file name, which the browser shows
    under the card too) on a colour for what it makes, over the graph screenshot cropped to fit; a plain JPEG."""
    from PIL import Image, ImageDraw, ImageFont

    title = target.stem
    label, colour = next((label, colour) for key, label, colour in BANNER_KINDS if key in title.lower())
    card = Image.new("RGB", THUMBNAIL_SIZE, colour)
    graph_size = (THUMBNAIL_SIZE[0], THUMBNAIL_SIZE[1] - BANNER_HEIGHT)
    with Image.open(canvas_png) as image:
        image = image.convert("RGB")
        width, height = image.size
        aspect = graph_size[0] / graph_size[1]
        if width / height > aspect:
            new_width = round(height * aspect)
            left = (width - new_width) // 2
            image = image.crop((left, 0, left + new_width, height))
        else:
            new_height = round(width / aspect)
            image = image.crop((0, 0, width, new_height))  # the top: where the loaders and the Read me are
        card.paste(image.resize(graph_size, Image.LANCZOS), (0, BANNER_HEIGHT))
    draw = ImageDraw.Draw(card)
    draw.text((16, 12), label, font=ImageFont.load_default(size=15), fill=(255, 255, 255, 200))
    font = ImageFont.load_default(size=27)
    for row, line in enumerate(_wrapped(draw, title, font, THUMBNAIL_SIZE[0] - 32)[:3]):
        draw.text((16, 36 + 31 * row), line, font=font, fill=(255, 255, 255))
    card.save(target, "JPEG", quality=85, optimize=True)


def _has_native_cogvideox() -> bool:
    import comfy.model_base

    return hasattr(comfy.model_base, "CogVideoX")


REPORT_LORA = "tdm_browser_check_sd3.safetensors"


def feature_workflows(object_info: dict, base: Path, folder: Path) -> dict[str, Path]:
    """Two small graphs on the test pack's tiny models that really run in the page's ComfyUI, so what the pack shows
    after a run is checked as drawn: `lora_report` (a real tiny SD3 LoRA through TDM LoRA Loader in auto mode, then
    TDM KSampler with preset auto) and `jobs_demo` (a 3-iteration distillation, for the jobs panel's curve and
    preview). Written as UI-format files the driver loads like any workflow."""
    import build_workflows

    from tdm_devkit import lora_files, twins
    from tdm_devkit.workflow_build import Node
    from tdm_devkit.workflow_build import build as build_ui

    lora = lora_files.synthesise(twins.comfy_twin("sd3").diffusers, "sd3", rank=4, seed=7)
    lora_files.write_peft(lora, base / "models" / "loras" / REPORT_LORA)
    graphs = {
        "lora_report": [
            Node("model", "TDMTest_TinyModel", {"family": "sd3", "seed": 0}, pos=(0, 0)),
            # beside the LoRA loader, so their links reach the sampler without passing under it
            Node("cond", "TDMTest_TinyConditioning", {"family": "sd3", "text": "a lighthouse"}, pos=(380, 380)),
            Node("latent", "EmptySD3LatentImage", {"width": 128, "height": 128, "batch_size": 1}, pos=(380, 600)),
            Node("lora", "TDMLoraLoader", {"lora_name": REPORT_LORA, "strength_mode": "auto"},
                 links={"model": ("model", 0)}, pos=(380, 0), size=(420, 300)),
            Node("sample", "TDMKSampler", {"preset": "auto", "steps": 4, "seed": 42},
                 links={"model": ("lora", 0), "positive": ("cond", 0), "latent_image": ("latent", 0)},
                 pos=(840, 0), size=(420, 330)),
            Node("save", "SaveLatent", {"filename_prefix": "browser_check/lora_report"},
                 links={"samples": ("sample", 0)}, pos=(1300, 0)),
        ],
        "jobs_demo": [
            Node("model", "TDMTest_TinyModel", {"family": "sd15", "seed": 0}, pos=(0, 0)),
            Node("clip", "TDMTest_TinyCLIP", {"family": "sd15"}, pos=(0, 200)),
            Node("vae", "TDMTest_TinyVAE", {"family": "sd15", "seed": 0}, pos=(0, 360)),
            Node("start", "TDMDistillStart", {
                "prompts": "a red fox\na lighthouse", "output_name": "tdm_browser_check_job", "steps": 4,
                "iterations": 3, "width": 64, "height": 64, "save_every": 1, "preview_every": 1},
                 links={"model": ("model", 0), "clip": ("clip", 0), "vae": ("vae", 0)}, pos=(380, 0)),
            Node("status", "TDMDistillStatus", {"wait": True}, links={"job": ("start", 0)}, pos=(780, 0)),
            Node("text", "PreviewAny", links={"source": ("status", 0)}, pos=(1160, 0), size=(400, 200)),
            # a video job after it (one worker: it waits for the image job), for the panel's frames-across-time
            # preview: 9 frames (3 latent frames) decoded whole by the tiny Wan VAE, four of them shown per clip
            Node("wan_model", "TDMTest_TinyModel", {"family": "wan21", "seed": 0}, pos=(0, 900)),
            Node("wan_clip", "TDMTest_TinyCLIP", {"family": "wan21"}, pos=(0, 1100)),
            Node("wan_vae", "TDMTest_TinyVAE", {"family": "wan21", "seed": 0}, pos=(0, 1260)),
            Node("wan_start", "TDMDistillStart", {
                "prompts": "a red fox running\nwaves on a beach", "output_name": "tdm_browser_check_wan_job",
                "steps": 4, "iterations": 3, "width": 64, "height": 64, "save_every": 1, "preview_every": 1,
                "frames": 9},
                 links={"model": ("wan_model", 0), "clip": ("wan_clip", 0), "vae": ("wan_vae", 0)}, pos=(380, 900)),
            Node("wan_status", "TDMDistillStatus", {"wait": True}, links={"job": ("wan_start", 0)}, pos=(780, 900)),
            Node("wan_text", "PreviewAny", links={"source": ("wan_status", 0)}, pos=(1160, 900), size=(400, 200)),
        ],
    }
    paths = {}
    for name, nodes in graphs.items():
        workflow = build_ui(nodes, object_info, build_workflows.PACK_PROPERTIES, build_workflows.CORE_VERSION,
                            str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tdm/browser-check/{name}")))
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(workflow))
    return paths


def check_features(results: dict) -> list[str]:
    """Failures of the on-node report and the jobs panel, as the driver read them from the page."""
    failures = []
    report = results.get("loraReport") or {}
    texts = report.get("reports", {})
    lora_text, sampler_text = texts.get("TDMLoraLoader", ""), texts.get("TDMKSampler", "")
    if not re.search(r"applied strength 0\.125 \(.*\); strength_mode auto", lora_text) \
            or not re.search(r"matched (\d+)/\1 modules", lora_text):
        failures.append(f"TDM LoRA Loader does not show its report on the node: {lora_text!r}")
    if "preset sd3 (" not in sampler_text or "picked from the MODEL" not in sampler_text:
        failures.append(f"TDM KSampler does not name the preset auto picked: {sampler_text!r}")
    strength = report.get("strengthWidget") or {}
    if not (strength.get("disabled") and "auto" in str(strength.get("label"))):
        failures.append(f"in auto mode the strength widget is not marked unused: {strength}")
    panel = results.get("jobsPanel") or {}
    for key, what in (("header", "a header"), ("curve", "a loss curve"), ("preview", "a loaded preview image"),
                      ("remove", "a Remove button for the finished job")):
        if not panel.get(key):
            failures.append(f"the jobs panel shows no {what}: {panel}")
    # decoded by the job's VAE at image size: two 64×64 samples side by side; the video job's two clips side by side,
    # four frames of each below each other
    if panel.get("previewSize") and [128, 64] not in panel["previewSize"]:
        failures.append(f"the jobs panel's preview is not the decoded 2×64×64 strip: {panel.get('previewSize')}")
    if [128, 256] not in (panel.get("previewSize") or []):
        failures.append("the jobs panel's preview of the video job is not four frames of each of its two 64×64 "
                        f"clips: {panel.get('previewSize')}")
    return failures


def badge_workflow(object_info: dict, folder: Path) -> Path:
    """`jobs_badge`: two long distillations on the tiny SD1.5 models (one runs, one waits behind it), for the badge on
    the TDM jobs sidebar icon; the driver stops and removes them."""
    import build_workflows

    from tdm_devkit.workflow_build import Node
    from tdm_devkit.workflow_build import build as build_ui

    job = {"prompts": "a red fox", "steps": 4, "iterations": 1000000, "width": 64, "height": 64,
           "save_every": 0, "preview_every": 0}
    nodes = []
    for row, which in enumerate("ab"):  # one row of tiny models and a TDM Distill per job
        top = 900 * row
        nodes += [
            Node(f"model_{which}", "TDMTest_TinyModel", {"family": "sd15", "seed": 0}, pos=(0, top)),
            Node(f"clip_{which}", "TDMTest_TinyCLIP", {"family": "sd15"}, pos=(0, top + 200)),
            Node(f"vae_{which}", "TDMTest_TinyVAE", {"family": "sd15", "seed": 0}, pos=(0, top + 360)),
            Node(f"start_{which}", "TDMDistillStart", {**job, "output_name": f"tdm_browser_check_badge_{which}"},
                 links={"model": (f"model_{which}", 0), "clip": (f"clip_{which}", 0), "vae": (f"vae_{which}", 0)},
                 pos=(380, top)),
        ]
    workflow = build_ui(nodes, object_info, build_workflows.PACK_PROPERTIES, build_workflows.CORE_VERSION,
                        str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-tdm/browser-check/jobs_badge")))
    path = folder / "jobs_badge.json"
    path.write_text(json.dumps(workflow))
    return path


def fold_workflow(folder: Path) -> Path:
    """The first workflow (by file name) with a TDM Distill node: the advanced-inputs check loads it as a user
    opens it (whatever --only says)."""
    for path in sorted(folder.glob("*.json")):
        if any(node.get("type") == "TDMDistillStart" for node in json.loads(path.read_text()).get("nodes", [])):
            return path
    raise SystemExit(f"browser: no workflow in {folder} has a TDMDistillStart node for the advanced-inputs check")


def check_badge_and_fold(results: dict) -> list[str]:
    """Failures of the jobs badge on the sidebar icon and of TDM Distill's folded advanced inputs (the driver's
    checkJobsBadge and checkAdvancedFold)."""
    failures = []
    badge = results.get("jobsBadge")
    if not badge:
        failures.append("the jobs badge check did not run")
    else:
        for stage, least in (("before", 0), ("during", 2), ("one", 1), ("after", 0)):
            seen = badge.get(stage) or {}
            want = str(seen.get("active")) if seen.get("active") else None
            if not seen.get("button"):
                failures.append(f"jobs badge ({stage}): no TDM jobs button in the sidebar: {seen}")
            elif seen.get("badge") != want:
                failures.append(f"jobs badge ({stage}): the icon shows {seen.get('badge')!r} with "
                                f"{seen.get('active')} active jobs (expected {want!r}): {seen}")
            if stage != "before" and seen.get("active") != least:
                failures.append(f"jobs badge ({stage}): expected {least} active jobs, /tdm/jobs had {seen}")
    fold = results.get("advancedFold")
    if not fold:
        failures.append("the advanced-inputs check did not run")
        return failures
    folded, unfolded, refolded = fold.get("folded") or {}, fold.get("unfolded") or {}, fold.get("refolded") or {}
    if folded.get("vueNodesMode"):
        failures.append("advanced inputs: the page is in Nodes 2.0 mode; the check is for the standard canvas")
    if folded.get("advancedShown") or not folded.get("advancedHidden"):
        failures.append(f"advanced inputs: not folded when TDM Distill loads: shown {folded.get('advancedShown')}")
    for name, state in (("loaded", folded), ("after the toggle", unfolded), ("folded again", refolded)):
        if state.get("everydayHidden"):
            failures.append(f"advanced inputs ({name}): everyday inputs hidden: {state['everydayHidden']}")
        if state.get("widgetsValues") != fold.get("expectedValues"):
            failures.append(f"advanced inputs ({name}): saved widgets_values {state.get('widgetsValues')} differ "
                            f"from the workflow's {fold.get('expectedValues')}")
    if not (folded.get("toggle") or {}).get("at"):
        failures.append(f"advanced inputs: no toggle on the node: {folded.get('toggle')}")
    if unfolded.get("advancedHidden") or not unfolded.get("advancedShown"):
        failures.append(f"advanced inputs: still hidden after the toggle: {unfolded.get('advancedHidden')}")
    if refolded.get("advancedShown"):
        failures.append(f"advanced inputs: not folded after the second toggle: {refolded.get('advancedShown')}")
    if not folded.get("size", [0, 0])[1] < unfolded.get("size", [0, 0])[1]:
        failures.append(f"advanced inputs: the node did not grow when shown: {folded.get('size')} -> "
                        f"{unfolded.get('size')}")
    if refolded.get("size") != folded.get("size"):
        failures.append(f"advanced inputs: folded again, the node is {refolded.get('size')}, not {folded.get('size')}")
    inputs = set(fold.get("inputNames") or [])
    names, values = fold.get("widgetNames") or [], fold.get("expectedValues") or []
    if len(names) != len(values):
        failures.append(f"advanced inputs: {len(names)} saved widgets but {len(values)} saved values")
    expected = {name: value for name, value in zip(names, values, strict=False) if name in inputs}
    for when in ("queuedUnfolded", "queuedFolded"):
        queued = fold.get(when) or {}
        posted = queued.get("inputs") or {}
        wrong = {name: (posted.get(name, "<missing>"), value) for name, value in expected.items()
                 if posted.get(name, "<missing>") != value}
        if queued.get("status") != 200 or not posted or wrong:
            failures.append(f"advanced inputs ({when}): /api/prompt {queued.get('status')}, inputs that differ "
                            f"(posted, expected): {wrong}")
    return failures


def frontend_version() -> str:
    try:
        from importlib.metadata import version

        return version("comfyui-frontend-package")
    except Exception:  # noqa: BLE001 (reporting only)
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-thumbnails", action="store_true")
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--workflows", type=Path, default=REPO / "workflows", metavar="DIR",
                        help="folder of UI-format workflows (thumbnails are written next to them)")
    args = parser.parse_args()

    chromium = Path(os.environ.get("TDM_CHROMIUM", "/usr/bin/chromium"))
    browser_dir = Path(os.environ.get("TDM_BROWSER_DIR", REPO / ".browser"))
    if not chromium.is_file() or not (browser_dir / "node_modules" / "playwright-core").is_dir():
        print(f"browser: needs {chromium} and playwright-core in {browser_dir}/: run bash scripts/browser_check.sh",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    comfy_runtime.bootstrap()
    global ARTIFACTS
    ARTIFACTS = ARTIFACTS_ROOT / f"comfyui-{comfy_runtime.comfyui_version()}"  # one folder per runtime checked
    import build_workflows

    from tdm_devkit.server import ComfyServer, make_base_directory
    from tdm_devkit.workflow_placeholders import install_placeholders

    files = sorted(args.workflows.resolve().glob("*.json"))
    if args.only:  # a file's name (its title) or the generator's id of it
        wanted = {build_workflows.TITLES.get(name, name) for name in args.only}
        files = [f for f in files if f.stem in wanted]
    # Workflows for native CogVideoX cannot validate on a ComfyUI without it (0.3.75): checked on the runtimes that
    # have it, listed as skipped elsewhere. Feature detection, as in the tests.
    native = _has_native_cogvideox()
    needs_native = {build_workflows.TITLES[name] for name in build_workflows.NEEDS_NATIVE_COGVIDEOX}
    skipped = [] if native else [f.stem for f in files if f.stem in needs_native]
    files = [f for f in files if f.stem not in skipped]
    if not files:
        print("browser: no workflows to check", file=sys.stderr)
        return 1
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    # One thumbnail source per workflow however many runtimes are checked: the oldest runtime that loads it (0.3.75;
    # upstream only for the workflows that need it), so a second run does not rewrite the committed images.
    thumbnail_here = (lambda stem: True) if not native else (
        lambda stem: stem in needs_native or not _older_runtime_present())

    with tempfile.TemporaryDirectory(prefix="tdm_browser_") as tmp:
        base = make_base_directory(Path(tmp) / "base")
        install_placeholders(base, build_workflows.model_files())
        # A returning user's settings: no first-run template browser; the missing-nodes warning on (the default).
        settings = base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        # Every other setting at its default (the level of detail included: the check fails on a workflow whose text
        # would not be drawn at its saved zoom). Frontend 1.49 shows a minimap by default; it would cover a corner of
        # every thumbnail and screenshot, and hides nothing the check looks at.
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True,
                                        "Comfy.Workflow.ShowMissingNodesWarning": True,
                                        "Comfy.Minimap.Visible": False}))
        control = Path(tmp) / f"{files[0].stem}__unknown_node.json"
        control.write_text(json.dumps(make_control(json.loads(files[0].read_text()))))

        server = ComfyServer(base)
        try:
            server.start()
            features = feature_workflows(server.object_info(), base, Path(tmp))
            command = ["node", str(DRIVER), "--url", server.url, "--out", str(ARTIFACTS), "--control", str(control),
                       "--report", str(features["lora_report"]), "--jobs", str(features["jobs_demo"])]
            command += ["--badge", str(badge_workflow(server.object_info(), Path(tmp))),
                        "--fold", str(fold_workflow(args.workflows.resolve()))]
            for f in files:
                command += ["--workflow", str(f)]
            proc = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=900)
            if proc.returncode != 0:
                print(proc.stdout[-4000:], file=sys.stderr)
                print(f"browser: the driver failed ({proc.returncode}); server log: {ARTIFACTS / 'server.log'}\n"
                      f"{server.log_tail(2000)}", file=sys.stderr)
                return 1
            results = json.loads(proc.stdout.strip().splitlines()[-1])
            history = server.get("/history?max_items=1000")
        finally:
            server.stop()
            if server.log_path.exists():
                shutil.copy(server.log_path, ARTIFACTS / "server.log")
        (ARTIFACTS / "results.json").write_text(json.dumps(results, indent=1))

    failures: list[str] = []
    loaded = dialogs = queued = alerted = 0
    control_detected = None
    control_how = "no control"
    for r in results["workflows"]:
        name = r["name"]
        if r["control"]:
            # flagged to the user (a dialog in 1.32, a toast in 1.49) and the node not created as a real one
            flagged = r["missingNodesDialog"] or r.get("missingNodesToast", False)
            control_detected = flagged and any(n["type"] == UNKNOWN_TYPE for n in r["badNodes"])
            control_how = "dialog" if r["missingNodesDialog"] else "notice" if flagged else "not flagged"
            if not control_detected:
                failures.append(f"control {name}: an unknown node type was NOT detected "
                                f"(dialogs {r['storeDialogs']} {r['domDialogs']}, bad nodes {r['badNodes']})")
            continue
        complete = not r["badNodes"] and r["nodeCount"] == r["jsonNodeCount"]
        loaded += complete
        flagged = r["missingNodesDialog"] or r.get("missingNodesToast", False)
        dialogs += flagged
        if flagged or not complete:
            failures.append(f"{name}: missing-nodes dialog={r['missingNodesDialog']}, "
                            f"notice={r.get('missingNodesToast')}, bad nodes={r['badNodes']}, "
                            f"nodes {r['nodeCount']}/{r['jsonNodeCount']}")
        alerts = [t for t in r["toasts"] if t["severity"] in ("error", "warn", "unknown")]
        alerted += bool(alerts)
        if alerts:
            failures.append(f"{name}: the frontend raised alerts on load: {alerts}")
        if r["anyDialog"] and not r["missingNodesDialog"]:
            failures.append(f"{name}: an unexpected dialog opened on load: {r['storeDialogs']} {r['domDialogs']}")
        if r.get("queueStatus") == 200 and r.get("promptId") in history:
            queued += 1
        else:
            failures.append(f"{name}: queueing failed: HTTP {r.get('queueStatus')} {r.get('queueError')}; "
                            f"prompt id {r.get('promptId')} in /history: {r.get('promptId') in history}")
        if not args.no_thumbnails and r.get("canvas") and thumbnail_here(name):
            write_thumbnail(Path(r["canvas"]), Path(r["file"]).with_suffix(".jpg"))

    elapsed = time.monotonic() - started
    panel = results.get("jobsPanel") or {}
    panel_ok = bool(panel.get("registered") and panel.get("text"))
    if not panel_ok:
        failures.append(f"the TDM jobs sidebar panel did not render: {panel}")
    failures += check_features(results)
    badge_fold_failures = check_badge_and_fold(results)
    failures += badge_fold_failures
    layout_failures = [f"{r['name']}: {problem}" for r in results["workflows"] if not r["control"]
                       for problem in r.get("layoutProblems", [])]
    failures += layout_failures
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if results.get("pageErrors"):
        print(f"page errors (informational): {results['pageErrors'][:5]}", file=sys.stderr)
    badge, fold = results.get("jobsBadge") or {}, results.get("advancedFold") or {}
    print("browser: jobs badge (active jobs → badge) "
          + ", ".join(f"{stage} {(badge.get(stage) or {}).get('active')} → {(badge.get(stage) or {}).get('badge')!r}"
                      for stage in ("before", "during", "one", "after"))
          + f"; TDM Distill advanced inputs: {len((fold.get('folded') or {}).get('advancedHidden') or [])} hidden at "
          f"load (size {(fold.get('folded') or {}).get('size')}), "
          f"{len((fold.get('unfolded') or {}).get('advancedShown') or [])} shown after the toggle "
          f"(size {(fold.get('unfolded') or {}).get('size')}), /api/prompt "
          f"{(fold.get('queuedUnfolded') or {}).get('status')}/{(fold.get('queuedFolded') or {}).get('status')}; "
          f"badge/fold failures: {len(badge_fold_failures)}")
    print(f"browser: ComfyUI {comfy_runtime.comfyui_version()}, frontend {frontend_version()}, headless Chromium; "
          f"screenshots in {ARTIFACTS.relative_to(REPO)}/, took {elapsed:.0f}s")
    print(f"browser: {loaded} workflows loaded, {dialogs} missing-node dialogs/notices, {queued} queued, "
          f"{alerted} with load alerts; control with an unknown node type detected: {bool(control_detected)} "
          f"({control_how}); "
          f"jobs panel rendered: {panel_ok}; layout problems (unreadable zoom, overlaps, off-screen, links under "
          f"nodes): {len(layout_failures)}; "
          f"LoRA report on the node: {(results.get('loraReport') or {}).get('reports', {}).get('TDMLoraLoader', '')!r}; "
          f"jobs panel curve/preview/remove: {panel.get('curve')}/{panel.get('preview')}/{panel.get('remove')}"
          + (f"; skipped (need native CogVideoX): {', '.join(skipped)}" if skipped else ""))
    return 1 if failures else 0


def _older_runtime_present() -> bool:
    """Whether scripts/browser_check.sh also checks the 0.3.75 tree (it always does: it runs that tree first)."""
    return (REPO / ".comfyui" / "comfyui_version.py").is_file()


if __name__ == "__main__":
    sys.exit(main())
