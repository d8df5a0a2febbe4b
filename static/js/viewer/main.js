// The study viewer's page (templates/transfers/viewer.html): reads the study, builds the series
// strip and the viewports, and wires the toolbar, keys, cine, layouts, synchronized scrolling,
// reference lines, the side panels, Save picture, help, the report panel and the patients'
// simple mode. The entry module: the template loads this one, and it imports the rest.

import { FrameLoader, geometryApply, stackOf } from "./data.js";
import { hasPlane, imageCentre, nearestSlice, parallel, referenceLine } from "./geometry.js";
import { setText } from "./overlay.js";
import { MeasurePanel, TagPanel } from "./panels.js";
import { Viewport } from "./viewport.js";
import { PRESETS, PRESET_LABELS, presetName, presetsFor } from "./windowing.js";

// The page's own timeline, read by bench/viewer.py (and by anyone in the Performance panel):
// "start" here, "decoded" when the first frame's values are in memory (data.js), "drawn" when a
// viewport first shows an image (viewport.js).
performance.mark("relay-viewer:start");

const root = document.getElementById("viewer");
const studyUrl = root.dataset.studyUrl;
const strip = document.getElementById("series-strip");
const statusLine = document.getElementById("status");
const measurementLine = document.getElementById("measurement");
const fpsInput = document.getElementById("fps");
const cineButton = document.getElementById("cine");
const presetSelect = document.getElementById("preset");
const helpDialog = document.getElementById("help");
const reportPanel = document.getElementById("report-panel");
const reportButton = document.getElementById("report-button");
const viewportsBox = document.getElementById("viewports");
const syncButton = document.getElementById("sync");
const refButton = document.getElementById("reflines");
const measurePanelEl = document.getElementById("measure-panel");
const measureButton = document.getElementById("measure-button");
const tagPanelEl = document.getElementById("tag-panel");
const tagsButton = document.getElementById("tags-button");
const moreButton = document.getElementById("more-tools");

const TOOL_KEYS = { w: "wl", p: "pan", z: "zoom", m: "measure", x: "probe", a: "angle", c: "cobb", e: "ellipse", b: "rect", k: "arrow" };
// How many viewports each layout shows; its name is columns x rows as viewers write it.
const LAYOUTS = { "1x1": 1, "1x2": 2, "2x1": 2, "2x2": 4, "1x3": 3 };

// What the page, the frame loader and the viewports share. Only this module writes it; the
// others are handed it and read it.
const viewer = {
  study: null, // the study's description (study.json), once read
  stacks: [], // one per series: its images, their frame cache and its strip button
  viewports: [], // the Viewports, in page order
  activeIndex: 0, // the viewport that keys, presets and cine act on
  tool: "wl", // what a left drag or one finger does
  layout: "1x1",
  sync: true, // scrolling one viewport moves the others of the same Frame of Reference
  referenceLines: false,
};
let cineTimer = null;
let lastEscape = 0;

const loader = new FrameLoader(viewer, {
  loaded(stack, index) {
    for (const vp of viewer.viewports) {
      if (vp.stack !== stack) continue;
      if (vp.index === index) vp.requestDraw();
      else vp.showProgress();
    }
    stripProgress(stack);
  },
  evicted: stripProgress,
});
// The first frame's request went out with the page (the template's <link rel=preload>); its body
// is read while the viewports are built below.
const firstFrameLink = document.querySelector('link[rel="preload"][as="fetch"][href*="/frames/"]');
if (firstFrameLink) loader.prefetch(firstFrameLink.href);

// What a viewport asks of the page.
const page = {
  activate: setActive,
  framesWanted: () => loader.pump(),
  seriesShown,
  indexChanged,
  drawn(vp) {
    if (vp.entry()) backgroundStart();
    if (vp !== active()) return;
    presetSelect.value = presetName(vp.window);
    panelsShow();
  },
  measuresChanged(vp) {
    if (vp === active()) panelsShow();
  },
  showMeasurement: (text) => setText(measurementLine, text),
};

const measurePanel = new MeasurePanel(measurePanelEl);
const tagPanel = tagPanelEl
  ? new TagPanel(tagPanelEl, (image) => viewer.study.tags_url.replace("{sop}", encodeURIComponent(image.sop)))
  : null;

viewer.viewports = [...document.querySelectorAll(".viewport")].map((el, i) => new Viewport(el, i, viewer, page));

function active() {
  return viewer.viewports[viewer.activeIndex];
}

function setActive(position) {
  if (position === viewer.activeIndex || viewer.viewports[position].el.hidden) return;
  viewer.activeIndex = position;
  viewer.viewports.forEach((vp, i) => vp.el.classList.toggle("active", i === viewer.activeIndex));
  cineStop();
  markStrip();
  presetsBuild();
  fpsFromFile();
  referenceLinesUpdate();
  panelsShow();
  loader.pump();
}

function shown() {
  return viewer.viewports.filter((vp) => !vp.el.hidden);
}

// A viewport shows another series: the strip, the choosers, the presets and the cine rate follow.
function seriesShown() {
  markStrip();
  for (const vp of viewer.viewports) {
    const select = vp.el.querySelector(".vp-series");
    const i = viewer.stacks.indexOf(vp.stack);
    if (select && i >= 0 && select.value !== String(i)) select.value = String(i);
  }
  presetsBuild();
  fpsFromFile();
  referenceLinesUpdate();
}

// --- synchronized scrolling and reference lines -------------------------------------------------

function sameFrame(a, b) {
  return Boolean(a.stack && b.stack && a.stack.frameOfReference && a.stack.frameOfReference === b.stack.frameOfReference);
}

// Scrolling one viewport takes the others in its Frame of Reference, showing planes parallel to
// its own, to their slice nearest the centre of the one shown, along their own normal.
function indexChanged(vp) {
  if (viewer.sync) {
    const g = vp.geometry();
    if (hasPlane(g)) {
      const centre = imageCentre(g);
      for (const other of shown()) {
        if (other === vp || !sameFrame(vp, other)) continue;
        const geometries = other.stack.images.map((image) => image.geometry);
        const first = geometries.find(hasPlane);
        if (!first || !parallel(g, first)) continue;
        const index = nearestSlice(geometries, centre);
        if (index >= 0) other.setIndex(index, true);
      }
    }
  }
  referenceLinesUpdate();
}

// The active viewport's slice as a line on every other viewport of its Frame of Reference.
function referenceLinesUpdate() {
  const source = active();
  for (const vp of viewer.viewports) {
    let line = null;
    if (viewer.referenceLines && vp !== source && !vp.el.hidden && sameFrame(source, vp)) {
      line = referenceLine(source.geometry(), vp.geometry());
    }
    vp.setReferenceLine(line);
  }
}

function syncToggle() {
  viewer.sync = !viewer.sync;
  syncButton.setAttribute("aria-pressed", String(viewer.sync));
  if (viewer.sync) indexChanged(active());
}

function referenceLinesToggle() {
  viewer.referenceLines = !viewer.referenceLines;
  refButton.setAttribute("aria-pressed", String(viewer.referenceLines));
  referenceLinesUpdate();
}

// --- side panels --------------------------------------------------------------------------------

function panelsShow() {
  const vp = active();
  if (!measurePanelEl.hidden) measurePanel.show(vp);
  if (tagPanel && tagPanel.open) tagPanel.show(vp.stack ? vp.stack.images[vp.index] : null);
}

function panelToggle(panel, button) {
  if (!panel) return;
  panel.hidden = !panel.hidden;
  button.setAttribute("aria-pressed", String(!panel.hidden));
  viewer.viewports.forEach((vp) => vp.requestDraw());
  panelsShow();
}

// --- series strip -------------------------------------------------------------------------------

function buildStrip() {
  strip.replaceChildren();
  viewer.stacks.forEach((stack, i) => {
    const s = stack.series;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.draggable = true;
    const img = document.createElement("img");
    // Thumbnails wait behind the first frame: the image is what the reader came for.
    img.fetchPriority = "low";
    img.alt = "";
    img.loading = "lazy";
    // Set once the first image is drawn (backgroundStart): until then the server works for it.
    img.dataset.src = s.thumbnail_url;
    const label = document.createElement("span");
    label.className = "thumb-label";
    label.textContent = [s.number != null ? `S${s.number}` : "", s.modality].filter(Boolean).join(" ") || "Series";
    const description = document.createElement("span");
    description.className = "thumb-desc";
    description.textContent = s.description;
    const count = document.createElement("span");
    count.className = "thumb-count";
    count.textContent = `${stack.images.length} image${stack.images.length === 1 ? "" : "s"}`;
    const bar = document.createElement("progress");
    bar.max = Math.max(stack.images.length, 1);
    bar.value = 0;
    button.append(img, label, description, count, bar);
    button.title = `${label.textContent} ${s.description}`.trim();
    button.addEventListener("click", () => active().setStack(stack));
    button.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/x-relay-series", String(i)));
    stack.strip = { button, bar };
    strip.append(button);
  });
}

// Each viewport's own series menu: the other way to choose, without dragging.
function buildChoosers() {
  for (const vp of viewer.viewports) {
    const select = vp.el.querySelector(".vp-series");
    select.replaceChildren(
      ...viewer.stacks.map((stack, i) => {
        const s = stack.series;
        const option = document.createElement("option");
        option.value = String(i);
        option.textContent = [s.number != null ? `S${s.number}` : "", s.modality, s.description].filter(Boolean).join(" ") || `Series ${i + 1}`;
        return option;
      }),
    );
    select.addEventListener("change", () => {
      const stack = viewer.stacks[Number(select.value)];
      if (!stack) return;
      setActive(vp.position);
      vp.setStack(stack);
    });
  }
}

function stripProgress(stack) {
  if (stack.strip) stack.strip.bar.value = stack.cache.size;
}

function markStrip() {
  const stack = active().stack;
  for (const s of viewer.stacks) {
    if (s.strip) s.strip.button.setAttribute("aria-current", String(s === stack));
  }
}

// --- toolbar ------------------------------------------------------------------------------------

function setTool(name) {
  viewer.tool = name;
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === name));
  }
  root.dataset.tool = name;
  for (const vp of viewer.viewports) {
    vp.probe = "";
    vp.requestDraw();
  }
}

function cineStop() {
  if (cineTimer) clearTimeout(cineTimer);
  cineTimer = null;
  cineButton.setAttribute("aria-pressed", "false");
  cineButton.textContent = "Play";
}

function cineTick() {
  const vp = active();
  const count = vp.stack ? vp.stack.images.length : 0;
  if (count < 2) {
    cineStop();
    return;
  }
  const next = (vp.index + 1) % count;
  // Wait for a frame still loading rather than skip it: a cine that skips misleads.
  if (vp.stack.cache.has(next)) vp.setIndex(next);
  const fps = Math.min(Math.max(Number(fpsInput.value) || 10, 1), 60);
  cineTimer = setTimeout(cineTick, 1000 / fps);
}

function cineToggle() {
  if (cineTimer) {
    cineStop();
    return;
  }
  cineButton.setAttribute("aria-pressed", "true");
  cineButton.textContent = "Stop";
  cineTick();
}

// The file's own rate (Recommended Display Frame Rate, else 1000 / Frame Time) for its series.
let fpsStack = null;
function fpsFromFile() {
  const stack = active().stack;
  if (!stack || stack === fpsStack) return;
  fpsStack = stack;
  if (stack.fps) fpsInput.value = String(Math.min(Math.max(Math.round(stack.fps), 1), 60));
}

function fpsChange(step) {
  fpsInput.value = String(Math.min(Math.max((Number(fpsInput.value) || 10) + step, 1), 60));
}

function setLayout(name) {
  const count = LAYOUTS[name];
  if (!count) return;
  viewer.layout = name;
  viewportsBox.className = `viewports layout-${name}`;
  for (const button of document.querySelectorAll("[data-layout]")) {
    button.setAttribute("aria-pressed", String(button.dataset.layout === name));
  }
  const withImages = viewer.stacks.filter((s) => s.images.length);
  viewer.viewports.forEach((vp, i) => {
    vp.el.hidden = i >= count;
    if (i < count && !vp.stack && withImages.length) {
      // The next series not yet shown, else the same ones again (e.g. two windows of one CT).
      const used = new Set(viewer.viewports.map((v) => v.stack));
      vp.setStack(withImages.find((s) => !used.has(s)) || withImages[i % withImages.length]);
    }
  });
  if (viewer.activeIndex >= count) setActive(0);
  referenceLinesUpdate();
  viewer.viewports.forEach((vp) => vp.requestDraw());
  loader.pump();
}

function layoutNext() {
  const names = Object.keys(LAYOUTS);
  setLayout(names[(names.indexOf(viewer.layout) + 1) % names.length]);
}

function fullscreenToggle() {
  if (document.fullscreenElement) document.exitFullscreen();
  else if (root.requestFullscreen) root.requestFullscreen().catch(() => {});
}

function reportToggle() {
  if (!reportPanel) return;
  reportPanel.hidden = !reportPanel.hidden;
  reportButton.setAttribute("aria-pressed", String(!reportPanel.hidden));
}

function helpToggle() {
  if (helpDialog.open) helpDialog.close();
  else helpDialog.showModal();
}

// The active viewport's modality decides the menu: CT windows in HU on CT only.
function presetsBuild() {
  const vp = active();
  const modality = vp.stack ? vp.stack.series.modality : "";
  const names = presetsFor(modality);
  const key = names.join(",");
  if (presetSelect.dataset.presets === key) return;
  presetSelect.dataset.presets = key;
  for (const option of [...presetSelect.options]) if (option.dataset.preset) option.remove();
  names.forEach((name, i) => {
    const option = document.createElement("option");
    const [center, width] = PRESETS[name];
    option.value = name;
    option.dataset.preset = "1";
    option.textContent = `${PRESET_LABELS[name]} W${width} L${center} (${i + 1})`;
    presetSelect.append(option);
  });
  presetSelect.value = presetName(vp.window);
}

function presetApply(name) {
  const vp = active();
  if (name === "default") vp.act("default-window");
  else if (name === "auto") vp.act("auto-window");
  else if (PRESETS[name] && (presetSelect.dataset.presets || "").split(",").includes(name)) vp.setWindow([...PRESETS[name]]);
}

function presetKey(key) {
  const names = (presetSelect.dataset.presets || "").split(",").filter(Boolean);
  const name = names[Number(key) - 1];
  if (name) presetApply(name);
}

// --- Save picture -------------------------------------------------------------------------------

// A PNG of the active viewport as shown, with the band burned in. Its name says what it is, never
// whose: no patient name or ID in a file that may be passed on.
function pictureSave() {
  const vp = active();
  const entry = vp.entry();
  if (!entry || entry.error) {
    statusLine.textContent = "Nothing to save yet: the image is still loading.";
    return;
  }
  const series = vp.stack.series;
  const name = `relay-image-s${series.number != null ? series.number : "x"}-${vp.index + 1}.png`;
  vp.picture().toBlob((blob) => {
    if (!blob) return;
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
    statusLine.textContent = `Saved ${name} (not for diagnosis).`;
  }, "image/png");
}

function moreToggle() {
  const more = !root.classList.contains("more");
  root.classList.toggle("more", more);
  moreButton.setAttribute("aria-pressed", String(more));
}

function command(action) {
  switch (action) {
    case "cine": cineToggle(); break;
    case "layout": layoutNext(); break;
    case "sync": syncToggle(); break;
    case "reflines": referenceLinesToggle(); break;
    case "measurements": panelToggle(measurePanelEl, measureButton); break;
    case "tags": panelToggle(tagPanelEl, tagsButton); break;
    case "save": pictureSave(); break;
    case "more": moreToggle(); break;
    case "fullscreen": fullscreenToggle(); break;
    case "report": reportToggle(); break;
    case "help": helpToggle(); break;
    case "reset": active().act("reset"); break;
    default: active().act(action);
  }
}

function toolbarClick(event) {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.dataset.tool) setTool(button.dataset.tool);
  else if (button.dataset.layout) setLayout(button.dataset.layout);
  else if (button.dataset.action) command(button.dataset.action);
}

document.querySelector(".vtools").addEventListener("click", toolbarClick);
document.getElementById("simple-bar").addEventListener("click", toolbarClick);
presetSelect.addEventListener("change", () => presetApply(presetSelect.value));

// --- keys ---------------------------------------------------------------------------------------

const KEYS = {
  ArrowDown: "next",
  ArrowRight: "next",
  ArrowUp: "previous",
  ArrowLeft: "previous",
  PageDown: "page-down",
  PageUp: "page-up",
  Home: "first",
  End: "last",
  f: "fit",
  i: "invert",
  r: "rotate",
  h: "flip-h",
  v: "flip-v",
  0: "default-window",
  Delete: "clear-measures",
  Backspace: "clear-measures",
  " ": "cine",
  l: "layout",
  s: "sync",
  n: "reflines",
  u: "measurements",
  d: "tags",
  A: "auto-window",
  S: "save",
  F: "fullscreen",
  t: "report",
  "?": "help",
};

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target.closest && target.closest("input, select, textarea")) return;
  if (helpDialog.open) {
    if (event.key === "?") helpToggle();
    return;
  }
  if (target.closest && target.closest("button, a") && (event.key === " " || event.key === "Enter")) return;
  const key = event.key.length === 1 && !["F", "A", "S"].includes(event.key) ? event.key.toLowerCase() : event.key;
  if (key === "Escape") {
    cineStop();
    if (active().drawing) {
      active().measureDrop();
      active().requestDraw();
      return;
    }
    const now = Date.now();
    if (now - lastEscape < 600) command("reset");
    lastEscape = now;
    return;
  }
  // Tab moves between the viewports while one has focus; elsewhere it moves focus as usual.
  if (key === "Tab" && shown().length > 1 && target.closest && target.closest(".viewport")) {
    event.preventDefault();
    setActive((viewer.activeIndex + 1) % shown().length);
    active().el.focus({ preventScroll: true });
    return;
  }
  if (TOOL_KEYS[key]) {
    setTool(TOOL_KEYS[key]);
  } else if (/^[1-9]$/.test(key)) {
    presetKey(key);
  } else if (key === "[" || key === "]") {
    fpsChange(key === "]" ? 1 : -1);
  } else if (KEYS[key]) {
    command(KEYS[key]);
  } else {
    return;
  }
  event.preventDefault();
});

// --- start --------------------------------------------------------------------------------------

async function studyLoad() {
  // The page carries the study's description (no round trip before the first frame);
  // study.json answers the same for a page that does not.
  const embedded = document.getElementById("study-data");
  if (embedded) return JSON.parse(embedded.textContent);
  let response;
  try {
    response = await fetch(studyUrl, { credentials: "same-origin" });
  } catch {
    statusLine.textContent = "The study could not be loaded: the network failed. Reload the page to try again.";
    return null;
  }
  if (!response.ok) {
    statusLine.textContent = "The study could not be loaded (it may no longer be shared with you). Reload the page to try again.";
    strip.replaceChildren();
    return null;
  }
  return response.json();
}

async function start() {
  viewer.study = await studyLoad();
  if (!viewer.study) return;
  viewer.stacks = viewer.study.series.map((series) => stackOf(series, viewer.study.frame_url));
  buildStrip();
  buildChoosers();
  const first = viewer.stacks.find((s) => s.images.length) || viewer.stacks[0] || null;
  if (!first) statusLine.textContent = "This study has no series.";
  viewer.viewports[0].setStack(first);
  if (!first || !first.images.length) backgroundStart();
}

// What the page loads besides the first image (the thumbnails, where the images lie, the
// neighbouring frames) starts once that image is drawn, or failed: until then the first frame
// is the only request the page makes of the server.
let backgroundStarted = false;
function backgroundStart() {
  if (backgroundStarted || !viewer.study) return;
  backgroundStarted = true;
  for (const img of strip.querySelectorAll("img[data-src]")) {
    img.src = img.dataset.src;
    img.removeAttribute("data-src");
  }
  geometryLoad();
  loader.openUp();
}

// Where the images lie (for synced scrolling, reference lines and the cine rate) arrives after
// the first image is drawn: reading every header of a large study takes a moment.
async function geometryLoad() {
  try {
    const response = await fetch(viewer.study.geometry_url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(String(response.status));
    geometryApply(viewer.stacks, await response.json());
  } catch {
    root.dataset.geometry = "failed";
    return;
  }
  fpsStack = null;
  fpsFromFile();
  if (viewer.sync) indexChanged(active());
  else referenceLinesUpdate();
  viewer.viewports.forEach((vp) => vp.requestDraw());
  root.dataset.geometry = "ready";
}

setTool("wl");
start();
