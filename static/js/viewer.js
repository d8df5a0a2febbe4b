// The study viewer (templates/transfers/viewer.html): series strip, one or two viewports, tools.
//
// The server sends each frame as its modality values (Hounsfield units on CT) in a typed array,
// with what the frame is in the X-Relay-Frame header; this module windows them into pixels itself,
// so dragging the window, inverting or zooming never asks the server for anything. Frames load
// nearest-first around the image being looked at and stay cached in memory up to a budget.
//
// Tests read the viewer's state from the DOM: each viewport carries data-image-index (0-based),
// data-image-count, data-loaded, data-drawn-index, data-window-center/-width, data-zoom (%),
// data-scale (screen px per image px) and data-state; the overlay text is what the user sees.

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

// Common CT windows as [center (level), width], in HU.
const PRESETS = {
  brain: [40, 80],
  soft: [40, 400],
  lung: [-600, 1500],
  bone: [400, 1800],
  mediastinum: [50, 350],
};
const PRESET_KEYS = { 1: "brain", 2: "soft", 3: "lung", 4: "bone", 5: "mediastinum" };
const TOOL_KEYS = { w: "wl", p: "pan", z: "zoom", m: "measure", x: "probe" };
// Browsers allow ~6 connections per host; leave room for thumbnails and the page itself.
const CONCURRENCY = 4;
// A 300-slice CT is ~150 MB of values; past this the frames farthest from view are dropped.
const CACHE_BUDGET = 768 * 1048576;
const WHEEL_STEP = 40; // wheel delta (px) per image: one notch of a mouse, a short trackpad swipe
const MIN_MEASURE_PX = 3; // a click with the measure tool is not a measurement
const TYPED = {
  int16: Int16Array,
  uint16: Uint16Array,
  int32: Int32Array,
  float32: Float32Array,
  uint8: Uint8Array,
};

let study = null;
let stacks = [];
let tool = "wl";
let activeIndex = 0;
let inflight = 0;
let cacheBytes = 0;
let cineTimer = null;
let lastEscape = 0;

function num(value, digits = 2) {
  const factor = 10 ** digits;
  return String(Math.round(value * factor) / factor);
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// --- loading ------------------------------------------------------------------------------------

class LoadError extends Error {}

function stackOf(series) {
  const images = [];
  for (const instance of series.instances) {
    for (let frame = 0; frame < instance.frames; frame += 1) {
      const url = study.frame_url
        .replace("{sop}", encodeURIComponent(instance.uid))
        .replace("{frame}", String(frame));
      images.push({ url, frame, frames: instance.frames });
    }
  }
  return { series, images, cache: new Map(), pending: new Set(), strip: null };
}

function shownStacks() {
  return new Set(viewports.filter((vp) => !vp.el.hidden && vp.stack).map((vp) => vp.stack));
}

// The nearest image not yet loaded to the one in view, in the active viewport first; forward
// before backward at each distance, since people mostly scroll on.
function nextJob() {
  const order = [viewports[activeIndex], ...viewports.filter((_, i) => i !== activeIndex)];
  for (const vp of order) {
    const stack = vp.stack;
    if (vp.el.hidden || !stack) continue;
    const count = stack.images.length;
    for (let d = 0; d < count; d += 1) {
      for (const i of d === 0 ? [vp.index] : [vp.index + d, vp.index - d]) {
        if (i < 0 || i >= count || stack.cache.has(i) || stack.pending.has(i)) continue;
        if (!makeRoom(stack, vp.index, d)) return null;
        return { stack, index: i };
      }
    }
  }
  return null;
}

// Free memory for one more frame at `distance` from `center`: series out of view go first, then
// the frames of this series farther away than the one wanted. False when nothing may go.
function makeRoom(stack, center, distance) {
  if (cacheBytes < CACHE_BUDGET) return true;
  const shown = shownStacks();
  for (const other of stacks) {
    if (shown.has(other)) continue;
    for (const entry of other.cache.values()) cacheBytes -= entry.bytes;
    other.cache.clear();
    stripProgress(other);
  }
  while (cacheBytes >= CACHE_BUDGET) {
    let far = -1;
    let farDistance = distance;
    for (const i of stack.cache.keys()) {
      if (Math.abs(i - center) > farDistance) {
        far = i;
        farDistance = Math.abs(i - center);
      }
    }
    if (far < 0) return false;
    cacheBytes -= stack.cache.get(far).bytes;
    stack.cache.delete(far);
  }
  return true;
}

function pump() {
  while (inflight < CONCURRENCY) {
    const job = nextJob();
    if (!job) return;
    load(job.stack, job.index);
  }
}

async function fetchFrame(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) {
    throw new LoadError(
      response.status === 404
        ? "This image is no longer available to you (the share may have ended). Reload the page."
        : `The server could not send this image (${response.status}).`,
    );
  }
  const meta = JSON.parse(response.headers.get("X-Relay-Frame") || "null");
  const buffer = await response.arrayBuffer();
  if (!meta) throw new LoadError("The server sent no description of this image.");
  if (meta.error) return { meta, values: null, error: meta.error, bytes: 0 };
  const Typed = TYPED[meta.dtype];
  const samples = meta.kind === "rgb" ? 3 : 1;
  if (!Typed || buffer.byteLength !== meta.rows * meta.columns * samples * Typed.BYTES_PER_ELEMENT) {
    throw new LoadError("The image data arrived incomplete.");
  }
  return { meta, values: new Typed(buffer), error: null, bytes: buffer.byteLength };
}

async function load(stack, index) {
  stack.pending.add(index);
  inflight += 1;
  let entry;
  try {
    entry = await fetchFrame(stack.images[index].url);
  } catch (error) {
    const reason = error instanceof LoadError ? error.message : "The network failed while loading this image.";
    entry = { meta: null, values: null, error: reason, bytes: 0 };
  }
  inflight -= 1;
  stack.pending.delete(index);
  stack.cache.set(index, entry);
  cacheBytes += entry.bytes;
  for (const vp of viewports) {
    if (vp.stack !== stack) continue;
    if (vp.index === index) vp.requestDraw();
    else vp.showProgress();
  }
  stripProgress(stack);
  pump();
}

// --- one viewport -------------------------------------------------------------------------------

class Viewport {
  constructor(el, position) {
    this.el = el;
    this.position = position;
    this.canvas = el.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.slider = el.querySelector(".vp-slider");
    this.message = el.querySelector(".vp-message");
    this.ov = {};
    for (const name of ["name", "id", "birth", "study", "date", "series", "probe", "image", "slice", "progress", "window", "zoom", "orient"]) {
      this.ov[name] = el.querySelector(`.ov-${name}`);
    }
    // The windowed image at its own size; drawn onto the visible canvas through the view matrix.
    this.image = document.createElement("canvas");
    this.imageCtx = this.image.getContext("2d");
    this.imageData = null;
    this.imageEntry = null;
    this.imageKey = "";
    this.stack = null;
    this.index = 0;
    this.pointers = new Map();
    this.gesture = null;
    this.drawQueued = false;
    this.wheelDelta = 0;
    this.reset();
    this.listen();
  }

  reset() {
    this.window = null; // [center, width] the user chose; null: each image's own default
    this.invert = false;
    this.rotation = 0;
    this.flipH = false;
    this.flipV = false;
    this.fitted = true;
    this.scale = 1;
    this.pan = [0, 0];
    this.measures = new Map(); // image index -> [{a, b}] in image coordinates
    this.drawing = null;
    this.probe = "";
    this.imageKey = "";
    this.requestDraw();
  }

  setStack(stack) {
    this.stack = stack;
    this.index = 0;
    this.reset();
    const count = stack ? stack.images.length : 0;
    this.slider.max = String(Math.max(count, 1));
    this.slider.value = "1";
    this.slider.hidden = count < 2;
    this.el.dataset.imageCount = String(count);
    markStrip();
    pump();
  }

  setIndex(index) {
    if (!this.stack) return;
    const count = this.stack.images.length;
    const next = Math.min(Math.max(index, 0), count - 1);
    if (next === this.index) return;
    this.index = next;
    this.slider.value = String(next + 1);
    this.drawing = null;
    this.probe = "";
    this.requestDraw();
    pump();
  }

  entry() {
    return this.stack ? this.stack.cache.get(this.index) : undefined;
  }

  windowOf(entry) {
    if (this.window) return this.window;
    return [entry.meta.window_center, entry.meta.window_width];
  }

  requestDraw() {
    if (this.drawQueued) return;
    this.drawQueued = true;
    requestAnimationFrame(() => this.draw());
  }

  // --- drawing

  draw() {
    this.drawQueued = false;
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(Math.round(canvas.clientWidth * dpr), 1);
    const height = Math.max(Math.round(canvas.clientHeight * dpr), 1);
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = this.ctx;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    const entry = this.entry();
    if (!this.stack) {
      this.say(this.stackMessage());
      this.el.dataset.state = "empty";
    } else if (!entry) {
      this.say(`Loading image ${this.index + 1}…`);
      this.el.dataset.state = "loading";
    } else if (entry.error) {
      this.say(`This image cannot be displayed: ${entry.error}`);
      this.el.dataset.state = "error";
      this.el.dataset.drawnIndex = String(this.index);
    } else {
      this.say("");
      this.windowImage(entry);
      if (this.fitted) {
        this.scale = this.fitScale(entry);
        this.pan = [0, 0];
      }
      const matrix = this.matrix(entry);
      ctx.setTransform(new DOMMatrix().scale(dpr, dpr).multiply(matrix));
      // Smooth, except magnified so far that the user is looking at single pixels (probe).
      ctx.imageSmoothingEnabled = this.scale < 8;
      ctx.drawImage(this.image, 0, 0);
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      this.drawMeasures(entry, matrix);
      this.el.dataset.state = "ready";
      this.el.dataset.drawnIndex = String(this.index);
    }
    this.overlay(entry);
  }

  stackMessage() {
    if (!study) return "Loading the study…";
    return "No images in this series (a report or document, perhaps).";
  }

  say(text) {
    this.message.hidden = !text;
    setText(this.message, text);
  }

  // The modality values through the window into grey (or colour) pixels, cached per setting.
  windowImage(entry) {
    const [center, width] = this.windowOf(entry);
    const invert = Boolean(entry.meta.invert) !== this.invert;
    const key = `${center}|${width}|${invert}`;
    if (this.imageEntry === entry && this.imageKey === key) return;
    const { rows, columns } = entry.meta;
    if (this.image.width !== columns || this.image.height !== rows || !this.imageData) {
      this.image.width = columns;
      this.image.height = rows;
      this.imageData = this.imageCtx.createImageData(columns, rows);
    }
    const out = new Uint32Array(this.imageData.data.buffer); // little-endian: 0xAABBGGRR
    const values = entry.values;
    const low = center - width / 2;
    const gain = 255 / Math.max(width, 1e-9);
    if (entry.meta.kind === "rgb") {
      for (let p = 0, q = 0; p < out.length; p += 1, q += 3) {
        let r = (values[q] - low) * gain;
        let g = (values[q + 1] - low) * gain;
        let b = (values[q + 2] - low) * gain;
        r = r < 0 ? 0 : r > 255 ? 255 : r | 0;
        g = g < 0 ? 0 : g > 255 ? 255 : g | 0;
        b = b < 0 ? 0 : b > 255 ? 255 : b | 0;
        if (invert) {
          r = 255 - r;
          g = 255 - g;
          b = 255 - b;
        }
        out[p] = 0xff000000 | (b << 16) | (g << 8) | r;
      }
    } else {
      const min = Math.floor(entry.meta.min_value);
      const max = Math.ceil(entry.meta.max_value);
      const grey = (value) => {
        let v = (value - low) * gain;
        v = v < 0 ? 0 : v > 255 ? 255 : v | 0;
        if (invert) v = 255 - v;
        return 0xff000000 | (v << 16) | (v << 8) | v;
      };
      if (entry.meta.dtype !== "float32" && max - min < 1 << 20) {
        // Integers over a modest range: one lookup per pixel instead of arithmetic.
        const lut = new Uint32Array(max - min + 1);
        for (let i = 0; i < lut.length; i += 1) lut[i] = grey(min + i);
        for (let p = 0; p < out.length; p += 1) out[p] = lut[values[p] - min];
      } else {
        for (let p = 0; p < out.length; p += 1) out[p] = grey(values[p]);
      }
    }
    this.imageCtx.putImageData(this.imageData, 0, 0);
    this.imageEntry = entry;
    this.imageKey = key;
  }

  // Pixels that are not square (Pixel Spacing rows != columns) are shown at their true shape.
  aspect(entry) {
    const spacing = entry.meta.pixel_spacing;
    return spacing && spacing[0] > 0 && spacing[1] > 0 ? spacing[0] / spacing[1] : 1;
  }

  fitScale(entry) {
    let w = entry.meta.columns;
    let h = entry.meta.rows * this.aspect(entry);
    if (this.rotation % 180) [w, h] = [h, w];
    return Math.min(this.canvas.clientWidth / w, this.canvas.clientHeight / h);
  }

  // Image coordinates (pixel (i, j) covers [j, j+1) x [i, i+1)) to CSS px on the canvas.
  matrix(entry) {
    const s = this.scale;
    return new DOMMatrix()
      .translate(this.canvas.clientWidth / 2 + this.pan[0], this.canvas.clientHeight / 2 + this.pan[1])
      .scale(this.flipH ? -s : s, this.flipV ? -s : s)
      .rotate(this.rotation)
      .scale(1, this.aspect(entry))
      .translate(-entry.meta.columns / 2, -entry.meta.rows / 2);
  }

  toImage(point) {
    const entry = this.entry();
    if (!entry || entry.error) return null;
    const p = this.matrix(entry).inverse().transformPoint(new DOMPoint(point[0], point[1]));
    return [p.x, p.y];
  }

  lengthLabel(entry, line) {
    const dx = line.b[0] - line.a[0];
    const dy = line.b[1] - line.a[1];
    const spacing = entry.meta.pixel_spacing;
    if (!spacing) return `${num(Math.hypot(dx, dy), 1)} px`;
    const mm = Math.hypot(dx * spacing[1], dy * spacing[0]);
    const unit = entry.meta.spacing_kind === "ImagerPixelSpacing" ? "mm (imager)" : "mm";
    return `${mm.toFixed(1)} ${unit}`;
  }

  drawMeasures(entry, matrix) {
    const lines = [...(this.measures.get(this.index) || [])];
    if (this.drawing) lines.push(this.drawing);
    const ctx = this.ctx;
    ctx.lineWidth = 1.5;
    ctx.font = "13px system-ui, sans-serif";
    for (const line of lines) {
      const a = matrix.transformPoint(new DOMPoint(line.a[0], line.a[1]));
      const b = matrix.transformPoint(new DOMPoint(line.b[0], line.b[1]));
      ctx.strokeStyle = "#ffd400";
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
      for (const end of [a, b]) {
        ctx.beginPath();
        ctx.arc(end.x, end.y, 3, 0, 2 * Math.PI);
        ctx.stroke();
      }
      const label = this.lengthLabel(entry, line);
      ctx.fillStyle = "#000";
      ctx.fillText(label, b.x + 7, b.y - 5);
      ctx.fillStyle = "#ffd400";
      ctx.fillText(label, b.x + 6, b.y - 6);
    }
  }

  // --- overlay text

  overlay(entry) {
    const ds = this.el.dataset;
    const count = this.stack ? this.stack.images.length : 0;
    if (study) {
      const s = study.study;
      setText(this.ov.name, s.patient_name || "(no name)");
      setText(this.ov.id, s.patient_id ? `ID: ${s.patient_id}` : "");
      setText(this.ov.birth, [s.patient_birth_date && `Born: ${s.patient_birth_date}`, s.patient_sex].filter(Boolean).join(" "));
      setText(this.ov.study, s.description);
      setText(this.ov.date, [s.study_date, s.study_time].filter(Boolean).join(" "));
    }
    const series = this.stack ? this.stack.series : null;
    const meta = entry && entry.meta;
    const description = (series && series.description) || (meta && meta.series_description) || "";
    setText(
      this.ov.series,
      series ? [series.number != null ? `Se: ${series.number}` : "", series.modality, description].filter(Boolean).join(" ") : "",
    );
    setText(this.ov.image, count ? `Im: ${this.index + 1} / ${count}` : "");
    const image = this.stack && this.stack.images[this.index];
    const slice = [];
    if (image && image.frames > 1) slice.push(`Frame ${image.frame + 1} / ${image.frames}`);
    if (meta && meta.slice_location != null) slice.push(`Loc: ${num(meta.slice_location, 1)} mm`);
    if (meta && meta.slice_thickness != null) slice.push(`Thick: ${num(meta.slice_thickness, 1)} mm`);
    setText(this.ov.slice, slice.join("  "));
    setText(this.ov.probe, this.probe);
    if (meta && !entry.error) {
      const [center, width] = this.windowOf(entry);
      setText(this.ov.window, `W: ${num(width)} L: ${num(center)}`);
      setText(this.ov.zoom, `Zoom: ${Math.round(this.scale * 100)}%`);
      ds.windowCenter = String(center);
      ds.windowWidth = String(width);
      ds.zoom = String(Math.round(this.scale * 100));
      ds.scale = String(this.scale);
    } else {
      setText(this.ov.window, "");
      setText(this.ov.zoom, "");
    }
    const flags = [];
    if (this.invert) flags.push("Inverted");
    if (this.rotation) flags.push(`Rot ${this.rotation}°`);
    if (this.flipH) flags.push("Flip H");
    if (this.flipV) flags.push("Flip V");
    setText(this.ov.orient, flags.join("  "));
    ds.imageIndex = String(this.index);
    ds.imageCount = String(count);
    if (this === active()) presetSelect.value = presetName(this.window);
    this.showProgress();
  }

  showProgress() {
    const count = this.stack ? this.stack.images.length : 0;
    const loaded = this.stack ? this.stack.cache.size : 0;
    this.el.dataset.loaded = String(loaded);
    setText(this.ov.progress, count && loaded < count ? `Loaded ${loaded} / ${count}` : "");
  }

  // --- what the tools do

  adjustWindow(dx, dy) {
    const entry = this.entry();
    if (!entry || entry.error) return;
    const [center, width] = this.windowOf(entry);
    const range = Math.max(entry.meta.max_value - entry.meta.min_value, 1e-6);
    // Half a percent of the image's range per pixel dragged: ~5 HU on CT, ~1 on 8-bit images.
    const step = range / 512;
    const minimum = entry.meta.dtype === "float32" ? range / 1e4 : 1;
    this.window = [center + dy * step, Math.max(width + dx * step, minimum)];
    this.requestDraw();
  }

  setWindow(window) {
    this.window = window;
    this.requestDraw();
  }

  zoomBy(ratio, at) {
    const entry = this.entry();
    if (!entry || entry.error) return;
    const scale = Math.min(Math.max(this.scale * ratio, 0.02), 64);
    const real = scale / this.scale;
    // Keep the image point under `at` where it is.
    const cx = this.canvas.clientWidth / 2;
    const cy = this.canvas.clientHeight / 2;
    this.pan = [at[0] - cx - (at[0] - cx - this.pan[0]) * real, at[1] - cy - (at[1] - cy - this.pan[1]) * real];
    this.scale = scale;
    this.fitted = false;
    this.requestDraw();
  }

  probeAt(point) {
    const entry = this.entry();
    const p = this.toImage(point);
    if (!entry || !p) return;
    const x = Math.floor(p[0]);
    const y = Math.floor(p[1]);
    const { rows, columns } = entry.meta;
    if (x < 0 || y < 0 || x >= columns || y >= rows) {
      this.probe = "";
    } else if (entry.meta.kind === "rgb") {
      const i = (y * columns + x) * 3;
      const v = entry.values;
      this.probe = `X ${x} Y ${y}: R ${v[i]} G ${v[i + 1]} B ${v[i + 2]}`;
    } else {
      const value = entry.values[y * columns + x];
      const shown = entry.meta.dtype === "float32" ? num(value, 3) : String(value);
      this.probe = `X ${x} Y ${y}: ${shown}${entry.meta.units ? ` ${entry.meta.units}` : ""}`;
    }
    setText(this.ov.probe, this.probe);
  }

  finishMeasure() {
    const line = this.drawing;
    this.drawing = null;
    const entry = this.entry();
    if (!line || !entry || entry.error) return;
    const matrix = this.matrix(entry);
    const a = matrix.transformPoint(new DOMPoint(line.a[0], line.a[1]));
    const b = matrix.transformPoint(new DOMPoint(line.b[0], line.b[1]));
    if (Math.hypot(b.x - a.x, b.y - a.y) < MIN_MEASURE_PX) return;
    const list = this.measures.get(this.index) || [];
    list.push(line);
    this.measures.set(this.index, list);
    setText(measurementLine, `Length: ${this.lengthLabel(entry, line)}`);
  }

  // --- pointers: mouse, pen and touch through one set of events

  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  listen() {
    const canvas = this.canvas;
    canvas.addEventListener("pointerdown", (e) => this.pointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.pointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.pointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.pointerUp(e, true));
    canvas.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
    canvas.addEventListener("dblclick", () => this.act("fit"));
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
    this.slider.addEventListener("input", () => this.setIndex(Number(this.slider.value) - 1));
    this.el.addEventListener("focusin", () => setActive(this.position));
    this.el.addEventListener("dragover", (e) => e.preventDefault());
    this.el.addEventListener("drop", (e) => {
      e.preventDefault();
      const i = Number(e.dataTransfer.getData("text/x-relay-series"));
      if (stacks[i]) {
        setActive(this.position);
        this.setStack(stacks[i]);
      }
    });
    new ResizeObserver(() => this.requestDraw()).observe(this.el);
  }

  pointerDown(event) {
    setActive(this.position);
    event.preventDefault();
    // Keys go to the image again after, say, typing a frame rate (preventDefault kept focus).
    this.el.focus({ preventScroll: true });
    this.canvas.setPointerCapture(event.pointerId);
    const at = this.point(event);
    this.pointers.set(event.pointerId, at);
    if (this.pointers.size === 2) {
      const [p, q] = [...this.pointers.values()];
      this.drawing = null;
      this.gesture = {
        kind: "two",
        mode: null,
        distance: Math.hypot(q[0] - p[0], q[1] - p[1]),
        middle: [(p[0] + q[0]) / 2, (p[1] + q[1]) / 2],
      };
      return;
    }
    if (this.pointers.size > 2) return;
    let kind = tool;
    if (event.pointerType === "mouse") {
      if (event.button === 1) kind = "pan";
      else if (event.button === 2) kind = "zoom";
      else if (event.button !== 0) return;
    } else if (!["measure", "probe", "pan"].includes(tool)) {
      kind = "scroll"; // one finger scrolls the stack unless a finger tool was chosen
    }
    this.gesture = { kind, start: at, last: at, travel: 0 };
    if (kind === "measure") {
      const p = this.toImage(at);
      this.drawing = p ? { a: p, b: p } : null;
    } else if (kind === "probe") {
      this.probeAt(at);
    }
  }

  pointerMove(event) {
    const at = this.point(event);
    if (!this.pointers.has(event.pointerId)) {
      if (tool === "probe" && event.pointerType === "mouse") this.probeAt(at);
      return;
    }
    event.preventDefault();
    this.pointers.set(event.pointerId, at);
    const g = this.gesture;
    if (!g) return;
    if (g.kind === "two") {
      if (this.pointers.size !== 2) return;
      const [p, q] = [...this.pointers.values()];
      const distance = Math.hypot(q[0] - p[0], q[1] - p[1]);
      const middle = [(p[0] + q[0]) / 2, (p[1] + q[1]) / 2];
      const dx = middle[0] - g.middle[0];
      const dy = middle[1] - g.middle[1];
      // Whichever the fingers do first decides: spreading is a pinch, moving together is W/L.
      // Until then nothing moves, and the start is kept, so the deciding movement counts too.
      if (!g.mode) {
        if (Math.abs(distance - g.distance) > 16) g.mode = "pinch";
        else if (Math.hypot(dx, dy) > 16) g.mode = "wl";
        else return;
      }
      if (g.mode === "pinch" && g.distance > 0) {
        this.zoomBy(distance / g.distance, middle);
        this.pan = [this.pan[0] + dx, this.pan[1] + dy];
      } else if (g.mode === "wl") {
        this.adjustWindow(dx, dy);
      }
      g.distance = distance;
      g.middle = middle;
      return;
    }
    const dx = at[0] - g.last[0];
    const dy = at[1] - g.last[1];
    g.last = at;
    g.travel += dy;
    switch (g.kind) {
      case "wl":
        this.adjustWindow(dx, dy);
        break;
      case "pan":
        this.pan = [this.pan[0] + dx, this.pan[1] + dy];
        this.fitted = false;
        this.requestDraw();
        break;
      case "zoom":
        this.zoomBy(Math.exp(-dy * 0.01), g.start);
        break;
      case "measure":
        if (this.drawing) {
          const p = this.toImage(at);
          if (p) this.drawing.b = p;
          this.requestDraw();
        }
        break;
      case "probe":
        this.probeAt(at);
        break;
      case "scroll": {
        // A swipe across the viewport's height pages through ~the whole stack, at most 40 px
        // and at least 8 px per image. Swiping up goes on, like scrolling a page.
        const count = this.stack ? this.stack.images.length : 1;
        const step = Math.min(Math.max(this.canvas.clientHeight / Math.max(count, 1), 8), 40);
        const images = Math.trunc(-g.travel / step);
        if (images) {
          g.travel += images * step;
          this.setIndex(this.index + images);
        }
        break;
      }
      default:
        break;
    }
  }

  pointerUp(event, cancelled = false) {
    if (!this.pointers.has(event.pointerId)) return;
    this.pointers.delete(event.pointerId);
    if (this.gesture && this.gesture.kind === "measure") {
      if (cancelled) this.drawing = null;
      else this.finishMeasure();
      this.requestDraw();
    }
    // After a two-finger gesture the remaining finger does nothing until it is lifted too.
    this.gesture = this.pointers.size === 0 ? null : { kind: "none" };
  }

  wheel(event) {
    event.preventDefault();
    setActive(this.position);
    const delta = event.deltaMode === 1 ? event.deltaY * 40 : event.deltaMode === 2 ? event.deltaY * 800 : event.deltaY;
    if (event.ctrlKey) {
      // Ctrl + wheel, and a trackpad's pinch, which browsers report the same way.
      this.zoomBy(Math.exp(-delta * 0.002), this.point(event));
      return;
    }
    this.wheelDelta += delta;
    if (Math.abs(delta) >= WHEEL_STEP) this.wheelDelta = Math.sign(delta) * WHEEL_STEP;
    const images = Math.trunc(this.wheelDelta / WHEEL_STEP);
    if (images) {
      this.wheelDelta -= images * WHEEL_STEP;
      this.setIndex(this.index + images);
    }
  }

  act(action) {
    const count = this.stack ? this.stack.images.length : 0;
    switch (action) {
      case "next": this.setIndex(this.index + 1); break;
      case "previous": this.setIndex(this.index - 1); break;
      case "page-down": this.setIndex(this.index + 10); break;
      case "page-up": this.setIndex(this.index - 10); break;
      case "first": this.setIndex(0); break;
      case "last": this.setIndex(count - 1); break;
      case "fit": this.fitted = true; break;
      case "invert": this.invert = !this.invert; break;
      case "rotate": this.rotation = (this.rotation + 90) % 360; break;
      case "flip-h": this.flipH = !this.flipH; break;
      case "flip-v": this.flipV = !this.flipV; break;
      case "default-window": this.window = null; break;
      case "clear-measures": this.measures.delete(this.index); this.drawing = null; break;
      case "reset": this.reset(); setText(measurementLine, ""); break;
      default: return;
    }
    this.requestDraw();
  }
}

const viewports = [...document.querySelectorAll(".viewport")].map((el, i) => new Viewport(el, i));

function active() {
  return viewports[activeIndex];
}

function setActive(position) {
  if (position === activeIndex || viewports[position].el.hidden) return;
  activeIndex = position;
  viewports.forEach((vp, i) => vp.el.classList.toggle("active", i === activeIndex));
  cineStop();
  markStrip();
  pump();
}

// --- series strip -------------------------------------------------------------------------------

function buildStrip() {
  strip.replaceChildren();
  stacks.forEach((stack, i) => {
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
  for (const s of stacks) {
    if (s.strip) s.strip.button.setAttribute("aria-current", String(s === stack));
  }
}

// --- toolbar ------------------------------------------------------------------------------------

function setTool(name) {
  tool = name;
  for (const button of document.querySelectorAll("[data-tool]")) {
    button.setAttribute("aria-pressed", String(button.dataset.tool === name));
  }
  root.dataset.tool = name;
  for (const vp of viewports) {
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
  const second = viewports[1];
  const two = second.el.hidden;
  second.el.hidden = !two;
  viewportsBox.classList.toggle("layout-2", two);
  viewportsBox.classList.toggle("layout-1", !two);
  layoutButton.setAttribute("aria-pressed", String(two));
  if (two && !second.stack) {
    // The next series with images, else the same one again (e.g. two windows of one CT).
    const current = stacks.indexOf(viewports[0].stack);
    const others = stacks.filter((s, i) => i !== current && s.images.length);
    second.setStack(others[0] || viewports[0].stack);
  }
  if (!two) setActive(0);
  viewports.forEach((vp) => vp.requestDraw());
  pump();
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

// The preset the window is, so the menu never names a window that is not the one shown.
function presetName(window) {
  if (!window) return "";
  const found = Object.entries(PRESETS).find(([, w]) => w[0] === window[0] && w[1] === window[1]);
  return found ? found[0] : "";
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
  if (key === "Tab" && !viewports[1].el.hidden && target.closest && target.closest(".viewport")) {
    event.preventDefault();
    setActive((activeIndex + 1) % 2);
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
  study = await studyLoad();
  if (!study) return;
  stacks = study.series.map(stackOf);
  buildStrip();
  const first = stacks.find((s) => s.images.length) || stacks[0] || null;
  if (!first) statusLine.textContent = "This study has no series.";
  const modalities = study.study.modalities || [];
  presetSelect.disabled = !modalities.includes("CT");
  viewports[0].setStack(first);
}

setTool("wl");
start();
