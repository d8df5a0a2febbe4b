// The study viewer's page (templates/transfers/viewer.html): reads the study, builds the series
// strip and the viewports, and wires the toolbar, keys, cine, layout, help and report panel.
// The entry module: the template loads this one, and it imports the rest.

import { FrameLoader, stackOf } from "./data.js";
import { setText } from "./overlay.js";
import { Viewport } from "./viewport.js";
import { PRESETS, presetName } from "./windowing.js";

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
const layoutButton = document.getElementById("layout");
const viewportsBox = document.getElementById("viewports");

const PRESET_KEYS = { 1: "brain", 2: "soft", 3: "lung", 4: "bone", 5: "mediastinum" };
const TOOL_KEYS = { w: "wl", p: "pan", z: "zoom", m: "measure", x: "probe" };

// What the page, the frame loader and the viewports share. Only this module writes it; the
// others are handed it and read it.
const viewer = {
  study: null, // the study's description (study.json), once read
  stacks: [], // one per series: its images, their frame cache and its strip button
  viewports: [], // the Viewports, in page order
  activeIndex: 0, // the viewport that keys, presets and cine act on
  tool: "wl", // what a left drag or one finger does
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

// What a viewport asks of the page.
const page = {
  activate: setActive,
  framesWanted: () => loader.pump(),
  seriesShown: markStrip,
  drawn(vp) {
    if (vp === active()) presetSelect.value = presetName(vp.window);
  },
  showMeasurement: (text) => setText(measurementLine, text),
};

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
  loader.pump();
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
    img.src = s.thumbnail_url;
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

function fpsChange(step) {
  fpsInput.value = String(Math.min(Math.max((Number(fpsInput.value) || 10) + step, 1), 60));
}

function layoutToggle() {
  const [first, second] = viewer.viewports;
  const two = second.el.hidden;
  second.el.hidden = !two;
  viewportsBox.classList.toggle("layout-2", two);
  viewportsBox.classList.toggle("layout-1", !two);
  layoutButton.setAttribute("aria-pressed", String(two));
  if (two && !second.stack) {
    // The next series with images, else the same one again (e.g. two windows of one CT).
    const current = viewer.stacks.indexOf(first.stack);
    const others = viewer.stacks.filter((s, i) => i !== current && s.images.length);
    second.setStack(others[0] || first.stack);
  }
  if (!two) setActive(0);
  viewer.viewports.forEach((vp) => vp.requestDraw());
  loader.pump();
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

function presetApply(name) {
  // The presets are CT windows in HU; on other images they would mean nothing.
  if (!name || (name !== "default" && presetSelect.disabled)) return;
  const vp = active();
  if (name === "default") vp.act("default-window");
  else if (PRESETS[name]) vp.setWindow([...PRESETS[name]]);
}

function command(action) {
  switch (action) {
    case "cine": cineToggle(); break;
    case "layout": layoutToggle(); break;
    case "fullscreen": fullscreenToggle(); break;
    case "report": reportToggle(); break;
    case "help": helpToggle(); break;
    case "reset": active().act("reset"); break;
    default: active().act(action);
  }
}

document.querySelector(".vtools").addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.dataset.tool) setTool(button.dataset.tool);
  else if (button.dataset.action) command(button.dataset.action);
});
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
  const key = event.key.length === 1 && event.key !== "F" ? event.key.toLowerCase() : event.key;
  if (key === "Escape") {
    cineStop();
    const now = Date.now();
    if (now - lastEscape < 600) command("reset");
    lastEscape = now;
    return;
  }
  // Tab moves between the two viewports while one has focus; elsewhere it moves focus as usual.
  if (key === "Tab" && !viewer.viewports[1].el.hidden && target.closest && target.closest(".viewport")) {
    event.preventDefault();
    setActive((viewer.activeIndex + 1) % 2);
    active().el.focus({ preventScroll: true });
    return;
  }
  if (TOOL_KEYS[key]) {
    setTool(TOOL_KEYS[key]);
  } else if (PRESET_KEYS[key]) {
    presetApply(PRESET_KEYS[key]);
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
  const first = viewer.stacks.find((s) => s.images.length) || viewer.stacks[0] || null;
  if (!first) statusLine.textContent = "This study has no series.";
  const modalities = viewer.study.study.modalities || [];
  presetSelect.disabled = !modalities.includes("CT");
  viewer.viewports[0].setStack(first);
}

setTool("wl");
start();
