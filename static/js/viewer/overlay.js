// What is written and drawn over the image: the text in the four corners, the load progress,
// the probe's reading and the measurement lines with their lengths. The Viewport decides when;
// this module decides what it says and how it looks.

import { num } from "./windowing.js";

// Overlays are rewritten on every draw; writing only what changed spares the DOM the work and
// keeps the aria-live lines from announcing the same text again.
export function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

export function lengthLabel(meta, line) {
  const dx = line.b[0] - line.a[0];
  const dy = line.b[1] - line.a[1];
  const spacing = meta.pixel_spacing;
  if (!spacing) return `${num(Math.hypot(dx, dy), 1)} px`;
  const mm = Math.hypot(dx * spacing[1], dy * spacing[0]);
  // Imager Pixel Spacing is at the detector: not corrected for magnification, so it says so.
  const unit = meta.spacing_kind === "ImagerPixelSpacing" ? "mm (imager)" : "mm";
  return `${mm.toFixed(1)} ${unit}`;
}

// Lines in image coordinates, drawn through `matrix` in CSS px so that they stay thin and the
// labels stay upright however the image is zoomed, rotated or flipped.
export function drawMeasures(ctx, matrix, meta, lines) {
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
    const label = lengthLabel(meta, line);
    ctx.fillStyle = "#000";
    ctx.fillText(label, b.x + 7, b.y - 5);
    ctx.fillStyle = "#ffd400";
    ctx.fillText(label, b.x + 6, b.y - 6);
  }
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
    for (const name of ["name", "id", "birth", "study", "date", "series", "probe", "image", "slice", "progress", "window", "zoom", "orient"]) {
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
      setText(ov.window, `W: ${num(width)} L: ${num(center)}`);
      setText(ov.zoom, `Zoom: ${Math.round(vp.scale * 100)}%`);
      ds.windowCenter = String(center);
      ds.windowWidth = String(width);
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
