// One viewport: a canvas showing one image of a stack through the user's window, zoom, pan,
// rotation and flips, with the measurements and overlay on top. Input (input.js) calls the
// methods here; the page (main.js) picks the stack and hears back through `page`.
//
// Tests read the viewer's state from the DOM: each viewport carries data-image-index (0-based),
// data-image-count, data-loaded, data-drawn-index, data-window-center/-width, data-zoom (%),
// data-scale (screen px per image px), data-state, data-slice-position (mm along the slice's
// normal) and data-reference-line (image coordinates); the overlay text is what the user sees.

import { edgeMarkers, slicePosition } from "./geometry.js";
import { PointerInput } from "./input.js";
import { CLICK_TOOLS, POINTS, TOOL_NAMES, measureLabel } from "./measure.js";
import { Overlay, drawAnnotations, drawReferenceLine, probeText, setText } from "./overlay.js";
import { autoWindow, windowDragged, windowPixels } from "./windowing.js";

const MIN_MEASURE_PX = 3; // a click with a drag tool is not a measurement
const BAND = "NOT FOR DIAGNOSIS";
let nextMeasureId = 1;
let firstDrawn = false; // the page's first image: marked once for its timeline (main.js)

export class Viewport {
  // `viewer` is the page's shared state (the study, its stacks, the tool); `page` is what a
  // viewport asks of the page around it: activate(position), framesWanted(), seriesShown(),
  // indexChanged(viewport) (for synchronized scrolling), drawn(viewport), measuresChanged(viewport)
  // and showMeasurement(text).
  constructor(el, position, viewer, page) {
    this.el = el;
    this.position = position;
    this.viewer = viewer;
    this.page = page;
    this.canvas = el.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.slider = el.querySelector(".vp-slider");
    this.message = el.querySelector(".vp-message");
    this.ov = new Overlay(el);
    // The windowed image at its own size; drawn onto the visible canvas through the view matrix.
    this.image = document.createElement("canvas");
    this.imageCtx = this.image.getContext("2d");
    this.imageData = null;
    this.imageEntry = null;
    this.imageKey = "";
    this.stack = null;
    this.index = 0;
    this.drawQueued = false;
    this.reset();
    this.input = new PointerInput(this, viewer, page);
    new ResizeObserver(() => this.requestDraw()).observe(this.el);
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
    this.measures = new Map(); // image index -> [{id, kind, points, stats}] in image coordinates
    this.drawing = null; // the measurement being drawn: {kind, points, cursor}
    this.probe = "";
    this.imageKey = "";
    this.requestDraw();
  }

  setStack(stack) {
    this.stack = stack;
    this.index = 0;
    this.referenceLine = null;
    this.reset();
    const count = stack ? stack.images.length : 0;
    this.slider.max = String(Math.max(count, 1));
    this.slider.value = "1";
    this.slider.hidden = count < 2;
    this.el.dataset.imageCount = String(count);
    this.page.seriesShown();
    this.page.framesWanted();
  }

  // `synced`: moved by another viewport's scrolling, which does not move the others in turn.
  setIndex(index, synced = false) {
    if (!this.stack) return;
    const count = this.stack.images.length;
    const next = Math.min(Math.max(index, 0), count - 1);
    if (next === this.index) return;
    this.index = next;
    this.slider.value = String(next + 1);
    this.drawing = null;
    this.probe = "";
    this.requestDraw();
    this.page.framesWanted();
    if (!synced) this.page.indexChanged(this);
  }

  // Where the image shown lies in the patient (study.json's geometry), or null.
  geometry() {
    const image = this.stack && this.stack.images[this.index];
    return image ? image.geometry : null;
  }

  setReferenceLine(line) {
    const same = JSON.stringify(line) === JSON.stringify(this.referenceLine);
    this.referenceLine = line;
    if (!same) this.requestDraw();
  }

  entry() {
    return this.stack ? this.stack.cache.get(this.index) : undefined;
  }

  windowOf(entry) {
    if (this.window) return this.window;
    return [entry.meta.window_center, entry.meta.window_width];
  }

  // The image's own window ("default") or one from its values ("auto").
  autoWindow() {
    const entry = this.entry();
    if (!entry || entry.error) return;
    const w = autoWindow(entry.meta, entry.values);
    if (w) this.setWindow(w);
  }

  // Brighter or darker by a tenth of the window (the patients' simple buttons).
  brighten(steps) {
    const entry = this.entry();
    if (!entry || entry.error) return;
    const [center, width] = this.windowOf(entry);
    this.setWindow([center - steps * Math.max(width, 1) * 0.1, width]);
  }

  // Many changes in one event (a drag, a frame arriving) make one draw, on the next frame.
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
      if (this.referenceLine) drawReferenceLine(ctx, matrix, this.referenceLine);
      drawAnnotations(ctx, matrix, entry, this.annotationsShown());
      this.el.dataset.state = "ready";
      this.el.dataset.drawnIndex = String(this.index);
      if (!firstDrawn) {
        firstDrawn = true;
        performance.mark("relay-viewer:drawn");
      }
    }
    this.overlay(entry);
  }

  // The finished measurements of this image, and the one being drawn (its last point follows
  // the pointer).
  annotationsShown() {
    const list = [...(this.measures.get(this.index) || [])];
    const d = this.drawing;
    if (d) {
      const points = d.cursor && d.points.length < POINTS[d.kind] ? [...d.points, d.cursor] : d.points;
      if (points.length > 1) list.push({ kind: d.kind, points, partial: points.length < POINTS[d.kind] });
    }
    return list;
  }

  // Screen directions (CSS px) to image directions, through the view's rotation and flips.
  screenToImageDirection(entry) {
    const m = this.matrix(entry).inverse();
    return (dx, dy) => {
      const x = m.a * dx + m.c * dy;
      const y = m.b * dx + m.d * dy;
      const length = Math.hypot(x, y) || 1;
      return [x / length, y / length];
    };
  }

  markers(entry) {
    if (!entry || entry.error || !entry.meta.image_orientation) return null;
    return edgeMarkers({ iop: entry.meta.image_orientation }, this.screenToImageDirection(entry));
  }

  slicePosition() {
    const g = this.geometry();
    return g ? slicePosition(g) : null;
  }

  stackMessage() {
    if (!this.viewer.study) return "Loading the study…";
    return "No images in this series (a report or document, perhaps).";
  }

  say(text) {
    this.message.hidden = !text;
    setText(this.message, text);
  }

  // Windowing a frame is the costly step of a draw, so its result is kept until the frame or
  // the window changes; zooming and panning only redraw the kept image.
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
    const out = new Uint32Array(this.imageData.data.buffer);
    windowPixels(out, entry.meta, entry.values, center, width, invert);
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

  overlay(entry) {
    this.ov.write(this, entry, this.viewer.study);
    this.page.drawn(this);
    this.showProgress();
  }

  showProgress() {
    const count = this.stack ? this.stack.images.length : 0;
    const loaded = this.stack ? this.stack.cache.size : 0;
    this.ov.progress(loaded, count);
  }

  // --- what the tools do

  adjustWindow(dx, dy) {
    const entry = this.entry();
    if (!entry || entry.error) return;
    this.window = windowDragged(entry.meta, this.windowOf(entry), dx, dy);
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

  middle() {
    return [this.canvas.clientWidth / 2, this.canvas.clientHeight / 2];
  }

  panBy(dx, dy) {
    this.pan = [this.pan[0] + dx, this.pan[1] + dy];
    this.fitted = false;
    this.requestDraw();
  }

  // Two fingers spreading around `middle`, which itself moved by (dx, dy).
  pinch(ratio, middle, dx, dy) {
    this.zoomBy(ratio, middle);
    this.pan = [this.pan[0] + dx, this.pan[1] + dy];
  }

  probeAt(point) {
    const entry = this.entry();
    const p = this.toImage(point);
    if (!entry || !p) return;
    this.probe = probeText(entry, Math.floor(p[0]), Math.floor(p[1]));
    this.ov.probe(this.probe);
  }

  // --- measurements
  //
  // Drag tools (length, arrow, ellipse, rectangle) take the two ends of one drag. Click tools
  // take points one by one: an angle three (arm, vertex, arm), a Cobb angle four (two lines);
  // a point is placed where the pointer goes down, and a drag places a second at its end.

  measureStart(point) {
    const p = this.toImage(point);
    if (!p) return;
    const kind = this.viewer.tool;
    if (this.drawing && this.drawing.kind === kind && CLICK_TOOLS.has(kind)) {
      this.drawing.points.push(p);
    } else {
      this.drawing = { kind, points: [p], cursor: p, down: point };
    }
    this.drawing.down = point;
    this.drawing.cursor = p;
    this.finishIfComplete();
  }

  measureMove(point) {
    if (!this.drawing) return;
    const p = this.toImage(point);
    if (p) this.drawing.cursor = p;
    this.requestDraw();
  }

  // Hovering with a click tool shows the next arm following the pointer.
  measureHover(point) {
    if (this.drawing && CLICK_TOOLS.has(this.drawing.kind)) this.measureMove(point);
  }

  // A second finger turns a measurement being drawn into a pinch; the line is dropped unseen.
  measureDrop() {
    this.drawing = null;
  }

  measureEnd(cancelled, point) {
    const d = this.drawing;
    if (cancelled || !d) {
      this.drawing = null;
      this.requestDraw();
      return;
    }
    const moved = point && d.down && Math.hypot(point[0] - d.down[0], point[1] - d.down[1]) >= MIN_MEASURE_PX;
    if (moved) {
      const p = this.toImage(point);
      if (p) d.points.push(p);
    } else if (!CLICK_TOOLS.has(d.kind)) {
      // A click with a drag tool is not a measurement.
      this.drawing = null;
    }
    this.finishIfComplete();
    this.requestDraw();
  }

  finishIfComplete() {
    const d = this.drawing;
    if (!d || d.points.length < POINTS[d.kind]) return;
    this.drawing = null;
    const entry = this.entry();
    if (!entry || entry.error) return;
    const m = { id: nextMeasureId, kind: d.kind, points: d.points.slice(0, POINTS[d.kind]), stats: null };
    nextMeasureId += 1;
    const list = this.measures.get(this.index) || [];
    list.push(m);
    this.measures.set(this.index, list);
    this.page.showMeasurement(this.measureText(m, entry));
    this.page.measuresChanged(this);
    this.requestDraw();
  }

  measureText(m, entry) {
    const label = measureLabel(m, entry.meta, entry.values);
    return label ? `${TOOL_NAMES[m.kind]}: ${label}` : TOOL_NAMES[m.kind];
  }

  // The measurements of the image shown, as the side panel lists them.
  measureList() {
    const entry = this.entry();
    if (!entry || entry.error) return [];
    return (this.measures.get(this.index) || []).map((m) => ({ id: m.id, text: this.measureText(m, entry) }));
  }

  measureDelete(id) {
    const list = (this.measures.get(this.index) || []).filter((m) => m.id !== id);
    this.measures.set(this.index, list);
    this.page.measuresChanged(this);
    this.requestDraw();
  }

  // --- Save picture

  // The image as shown (window, zoom, rotation, measurements, orientation letters) with a band
  // "not for diagnosis" burned in: a copy for a patient's records or a slide, never for reading.
  picture() {
    const source = this.canvas;
    const out = document.createElement("canvas");
    out.width = source.width;
    out.height = source.height;
    const ctx = out.getContext("2d");
    ctx.drawImage(source, 0, 0);
    const dpr = source.width / Math.max(source.clientWidth, 1);
    const marks = this.markers(this.entry());
    const font = Math.max(Math.round(14 * dpr), 10);
    ctx.font = `600 ${font}px system-ui, sans-serif`;
    ctx.fillStyle = "#fff";
    ctx.textBaseline = "middle";
    if (marks) {
      const w = out.width;
      const h = out.height;
      ctx.textAlign = "center";
      ctx.fillText(marks.top, w / 2, font);
      ctx.fillText(marks.left, font, h / 2);
      ctx.fillText(marks.right, w - font, h / 2);
    }
    const band = Math.max(Math.round(out.height * 0.06), font * 2);
    if (marks) ctx.fillText(marks.bottom, out.width / 2, out.height - band - font);
    ctx.fillStyle = "#b00020";
    ctx.fillRect(0, out.height - band, out.width, band);
    ctx.fillStyle = "#fff";
    ctx.textAlign = "center";
    ctx.font = `700 ${Math.round(band * 0.5)}px system-ui, sans-serif`;
    ctx.fillText(BAND, out.width / 2, out.height - band / 2, out.width - 2 * font);
    return out;
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
      case "auto-window": this.autoWindow(); return;
      case "zoom-in": this.zoomBy(1.25, this.middle()); return;
      case "zoom-out": this.zoomBy(0.8, this.middle()); return;
      case "brighter": this.brighten(1); return;
      case "darker": this.brighten(-1); return;
      case "clear-measures": this.measures.delete(this.index); this.drawing = null; this.page.measuresChanged(this); break;
      case "reset": this.reset(); this.page.showMeasurement(""); break;
      default: return;
    }
    this.requestDraw();
  }
}
