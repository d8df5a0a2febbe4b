// What is written and drawn over the image: the text in the four corners, the orientation
// letters on the edges, the load progress, the probe's reading, the measurements with their
// labels and the reference line. The Viewport decides when; this module decides what it says
// and how it looks.

import { measureLabel } from "./measure.js";
import { num, windowNumber } from "./windowing.js";

const MEASURE_COLOUR = "#ffd400";
const REFERENCE_COLOUR = "#3ddc84";

// Overlays are rewritten on every draw; writing only what changed spares the DOM the work and
// keeps the aria-live lines from announcing the same text again.
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// A label beside `at`, one line or several; to the left of `left` (when given) where the right
// side has no room.
function label(ctx, text, at, left = null) {
  const lines = text.split("\n");
  const width = Math.max(...lines.map((line) => ctx.measureText(line).width));
  let x = at.x + 6;
  if (left && x + width > ctx.canvas.clientWidth) x = Math.max(left.x - 6 - width, 2);
  lines.forEach((line, i) => {
    const y = at.y - 6 + i * 15;
    ctx.fillStyle = "#000";
    ctx.fillText(line, x + 1, y + 1);
    ctx.fillStyle = MEASURE_COLOUR;
    ctx.fillText(line, x, y);
  });
}

function dotAt(ctx, p) {
  ctx.beginPath();
  ctx.arc(p.x, p.y, 3, 0, 2 * Math.PI);
  ctx.stroke();
}

function segment(ctx, a, b) {
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
}

// Measurements in image coordinates, drawn through `matrix` in CSS px so that lines stay thin
// and labels stay upright however the image is zoomed, rotated or flipped.
export function drawAnnotations(ctx, matrix, entry, list) {
  ctx.lineWidth = 1.5;
  ctx.font = "13px system-ui, sans-serif";
  ctx.strokeStyle = MEASURE_COLOUR;
  for (const m of list) {
    const pts = m.points.map((p) => matrix.transformPoint(new DOMPoint(p[0], p[1])));
    const text = m.partial ? "" : measureLabel(m, entry.meta, entry.values);
    switch (m.kind) {
      case "measure":
        segment(ctx, pts[0], pts[1]);
        pts.forEach((p) => dotAt(ctx, p));
        if (text) label(ctx, text, pts[1]);
        break;
      case "arrow": {
        segment(ctx, pts[0], pts[1]);
        // The head at the end of the drag: where the arrow points.
        const angle = Math.atan2(pts[1].y - pts[0].y, pts[1].x - pts[0].x);
        for (const side of [-1, 1]) {
          const t = angle + Math.PI + side * 0.45;
          segment(ctx, pts[1], { x: pts[1].x + 12 * Math.cos(t), y: pts[1].y + 12 * Math.sin(t) });
        }
        break;
      }
      case "angle":
        segment(ctx, pts[0], pts[1]);
        if (pts[2]) segment(ctx, pts[1], pts[2]);
        pts.forEach((p) => dotAt(ctx, p));
        if (text) label(ctx, text, pts[1]);
        break;
      case "cobb":
        segment(ctx, pts[0], pts[1]);
        if (pts[3]) segment(ctx, pts[2], pts[3]);
        else if (pts[2]) dotAt(ctx, pts[2]);
        pts.forEach((p) => dotAt(ctx, p));
        if (text) label(ctx, text, pts[pts.length - 1]);
        break;
      case "ellipse":
      case "rect": {
        // Axis-aligned in the image: the four corners through the view, then the shape.
        const [a, b] = m.points;
        const corners = [
          [a[0], a[1]],
          [b[0], a[1]],
          [b[0], b[1]],
          [a[0], b[1]],
        ].map((p) => matrix.transformPoint(new DOMPoint(p[0], p[1])));
        ctx.beginPath();
        if (m.kind === "rect") {
          corners.forEach((p, i) => (i ? ctx.lineTo(p.x, p.y) : ctx.moveTo(p.x, p.y)));
          ctx.closePath();
        } else {
          const centre = matrix.transformPoint(new DOMPoint((a[0] + b[0]) / 2, (a[1] + b[1]) / 2));
          const half = (p, q) => ({ x: (p.x + q.x) / 2 - centre.x, y: (p.y + q.y) / 2 - centre.y });
          const u = half(corners[1], corners[2]); // towards the image's right side
          const v = half(corners[2], corners[3]); // towards its bottom
          for (let k = 0; k <= 64; k += 1) {
            const t = (k / 64) * 2 * Math.PI;
            const x = centre.x + u.x * Math.cos(t) + v.x * Math.sin(t);
            const y = centre.y + u.y * Math.cos(t) + v.y * Math.sin(t);
            if (k) ctx.lineTo(x, y);
            else ctx.moveTo(x, y);
          }
        }
        ctx.stroke();
        if (text) {
          // On the image the statistics take three short lines; the panel has them in one.
          const lines = text.replace(" min ", "\nmin ").replace(", area", "\narea");
          const top = corners.reduce((p, q) => (q.y < p.y ? q : p)).y;
          const right = corners.reduce((p, q) => (q.x > p.x ? q : p)).x;
          const left = corners.reduce((p, q) => (q.x < p.x ? q : p)).x;
          label(ctx, lines, { x: right, y: top + 12 }, { x: left });
        }
        break;
      }
      default:
        break;
    }
  }
}

// The slice shown in the active viewport, as a line across this one.
export function drawReferenceLine(ctx, matrix, line) {
  const a = matrix.transformPoint(new DOMPoint(line[0], line[1]));
  const b = matrix.transformPoint(new DOMPoint(line[2], line[3]));
  ctx.save();
  ctx.strokeStyle = REFERENCE_COLOUR;
  ctx.lineWidth = 1;
  ctx.setLineDash([6, 4]);
  segment(ctx, a, b);
  ctx.restore();
}

// The value under image pixel (x, y); "" off the image.
export function probeText(entry, x, y) {
  const { rows, columns } = entry.meta;
  if (x < 0 || y < 0 || x >= columns || y >= rows) return "";
  if (entry.meta.kind === "rgb") {
    const i = (y * columns + x) * 3;
    const v = entry.values;
    return `X ${x} Y ${y}: R ${v[i]} G ${v[i + 1]} B ${v[i + 2]}`;
  }
  const value = entry.values[y * columns + x];
  const shown = entry.meta.dtype === "float32" ? num(value, 3) : String(value);
  return `X ${x} Y ${y}: ${shown}${entry.meta.units ? ` ${entry.meta.units}` : ""}`;
}

// The corner text of one viewport, and the data-* attributes that mirror it for the tests.
export class Overlay {
  constructor(el) {
    this.el = el;
    this.lines = {};
    for (const name of ["name", "id", "birth", "study", "date", "series", "probe", "image", "slice", "progress", "window", "zoom", "orient", "mark-left", "mark-right", "mark-top", "mark-bottom"]) {
      this.lines[name] = el.querySelector(`.ov-${name}`);
    }
  }

  write(vp, entry, study) {
    const ov = this.lines;
    const ds = this.el.dataset;
    const count = vp.stack ? vp.stack.images.length : 0;
    if (study) {
      const s = study.study;
      setText(ov.name, s.patient_name || "(no name)");
      setText(ov.id, s.patient_id ? `ID: ${s.patient_id}` : "");
      setText(ov.birth, [s.patient_birth_date && `Born: ${s.patient_birth_date}`, s.patient_sex].filter(Boolean).join(" "));
      setText(ov.study, s.description);
      setText(ov.date, [s.study_date, s.study_time].filter(Boolean).join(" "));
    }
    const series = vp.stack ? vp.stack.series : null;
    const meta = entry && entry.meta;
    const description = (series && series.description) || (meta && meta.series_description) || "";
    setText(
      ov.series,
      series ? [series.number != null ? `Se: ${series.number}` : "", series.modality, description].filter(Boolean).join(" ") : "",
    );
    setText(ov.image, count ? `Im: ${vp.index + 1} / ${count}` : "");
    const image = vp.stack && vp.stack.images[vp.index];
    const slice = [];
    if (image && image.frames > 1) slice.push(`Frame ${image.frame + 1} / ${image.frames}`);
    if (meta && meta.slice_location != null) slice.push(`Loc: ${num(meta.slice_location, 1)} mm`);
    if (meta && meta.slice_thickness != null) slice.push(`Thick: ${num(meta.slice_thickness, 1)} mm`);
    setText(ov.slice, slice.join("  "));
    setText(ov.probe, vp.probe);
    if (meta && !entry.error) {
      const [center, width] = vp.windowOf(entry);
      const w = windowNumber(width, meta);
      const l = windowNumber(center, meta);
      setText(ov.window, `W: ${w} L: ${l}`);
      setText(ov.zoom, `Zoom: ${Math.round(vp.scale * 100)}%`);
      ds.windowCenter = l;
      ds.windowWidth = w;
      ds.zoom = String(Math.round(vp.scale * 100));
      ds.scale = String(vp.scale);
    } else {
      setText(ov.window, "");
      setText(ov.zoom, "");
    }
    const flags = [];
    if (vp.invert) flags.push("Inverted");
    if (vp.rotation) flags.push(`Rot ${vp.rotation}°`);
    if (vp.flipH) flags.push("Flip H");
    if (vp.flipV) flags.push("Flip V");
    setText(ov.orient, flags.join("  "));
    const marks = meta && !entry.error ? vp.markers(entry) : null;
    for (const side of ["left", "right", "top", "bottom"]) setText(ov[`mark-${side}`], marks ? marks[side] : "");
    const position = vp.slicePosition();
    ds.slicePosition = position == null ? "" : num(position, 2);
    const line = vp.referenceLine;
    ds.referenceLine = line ? line.map((v) => num(v, 2)).join(" ") : "";
    ds.imageIndex = String(vp.index);
    ds.imageCount = String(count);
  }

  probe(text) {
    setText(this.lines.probe, text);
  }

  progress(loaded, count) {
    this.el.dataset.loaded = String(loaded);
    setText(this.lines.progress, count && loaded < count ? `Loaded ${loaded} / ${count}` : "");
  }
}
