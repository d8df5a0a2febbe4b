// Measurement arithmetic, with no DOM in it: lengths, angles, Cobb angles and the statistics of
// an ellipse or rectangle region in modality units (HU on CT), and how each is written.
//
// Points are image coordinates: pixel (i, j) covers [j, j+1) x [i, i+1). A pixel belongs to a
// region when its centre lies inside it. Pixel Spacing is [between rows, between columns] (mm).

import { num } from "./windowing.js";

export const TOOL_NAMES = {
  measure: "Length",
  angle: "Angle",
  cobb: "Cobb angle",
  ellipse: "Ellipse",
  rect: "Rectangle",
  arrow: "Arrow",
};

// How many points each tool takes; the drag tools take two (start and end of the drag).
export const POINTS = { measure: 2, arrow: 2, ellipse: 2, rect: 2, angle: 3, cobb: 4 };
export const CLICK_TOOLS = new Set(["angle", "cobb"]);

// Degrees between the arms B->A and B->C, 0..180.
export function angleAt(a, b, c, spacing) {
  const [sy, sx] = spacing || [1, 1];
  const u = [(a[0] - b[0]) * sx, (a[1] - b[1]) * sy];
  const v = [(c[0] - b[0]) * sx, (c[1] - b[1]) * sy];
  const cosine = (u[0] * v[0] + u[1] * v[1]) / (Math.hypot(...u) * Math.hypot(...v));
  if (!Number.isFinite(cosine)) return NaN;
  return (Math.acos(Math.min(Math.max(cosine, -1), 1)) * 180) / Math.PI;
}

// The Cobb angle: between the lines AB and CD, whichever way each was drawn, 0..90.
export function cobbAngle(a, b, c, d, spacing) {
  const [sy, sx] = spacing || [1, 1];
  const t1 = Math.atan2((b[1] - a[1]) * sy, (b[0] - a[0]) * sx);
  const t2 = Math.atan2((d[1] - c[1]) * sy, (d[0] - c[0]) * sx);
  let degrees = (Math.abs(t1 - t2) * 180) / Math.PI % 180;
  if (degrees > 90) degrees = 180 - degrees;
  return degrees;
}

// The box [x0, y0, x1, y1] of two corners, in either order.
function box(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

// Mean, SD (population), min, max and count of the values inside the region `kind` ("ellipse"
// inscribed in, or "rect" equal to, the box of points a and b); null for an empty region.
export function regionStats(kind, a, b, values, rows, columns) {
  const [x0, y0, x1, y1] = box(a, b);
  const cx = (x0 + x1) / 2;
  const cy = (y0 + y1) / 2;
  const rx = (x1 - x0) / 2;
  const ry = (y1 - y0) / 2;
  const jStart = Math.max(Math.ceil(x0 - 0.5), 0);
  const jEnd = Math.min(Math.floor(x1 - 0.5), columns - 1);
  const iStart = Math.max(Math.ceil(y0 - 0.5), 0);
  const iEnd = Math.min(Math.floor(y1 - 0.5), rows - 1);
  let count = 0;
  let sum = 0;
  let sumSquares = 0;
  let min = Infinity;
  let max = -Infinity;
  for (let i = iStart; i <= iEnd; i += 1) {
    const y = i + 0.5;
    for (let j = jStart; j <= jEnd; j += 1) {
      const x = j + 0.5;
      if (kind === "ellipse") {
        if (rx <= 0 || ry <= 0) continue;
        const p = (x - cx) / rx;
        const q = (y - cy) / ry;
        if (p * p + q * q > 1) continue;
      } else if (x >= x1 || y >= y1) {
        continue;
      }
      const v = values[i * columns + j];
      count += 1;
      sum += v;
      sumSquares += v * v;
      if (v < min) min = v;
      if (v > max) max = v;
    }
  }
  if (!count) return null;
  const mean = sum / count;
  const variance = Math.max(sumSquares / count - mean * mean, 0);
  return { mean, sd: Math.sqrt(variance), min, max, count };
}

// The region's area: mm² with Pixel Spacing, else px².
export function regionArea(kind, a, b, spacing) {
  const [x0, y0, x1, y1] = box(a, b);
  const [sy, sx] = spacing || [1, 1];
  const w = (x1 - x0) * sx;
  const h = (y1 - y0) * sy;
  return kind === "ellipse" ? (Math.PI * w * h) / 4 : w * h;
}

export function lengthOf(a, b, spacing) {
  const [sy, sx] = spacing || [1, 1];
  return Math.hypot((b[0] - a[0]) * sx, (b[1] - a[1]) * sy);
}

// What a finished measurement says (the side panel, the status line and the label on the image).
// `meta` is the frame's description, `values` its modality values.
export function measureLabel(m, meta, values) {
  const spacing = meta.pixel_spacing;
  const p = m.points;
  switch (m.kind) {
    case "measure": {
      if (!spacing) return `${num(lengthOf(p[0], p[1]), 1)} px`;
      // Imager Pixel Spacing is at the detector: not corrected for magnification, so it says so.
      const unit = meta.spacing_kind === "ImagerPixelSpacing" ? "mm (imager)" : "mm";
      return `${lengthOf(p[0], p[1], spacing).toFixed(1)} ${unit}`;
    }
    case "angle":
      return `${angleAt(p[0], p[1], p[2], spacing).toFixed(1)}°`;
    case "cobb":
      return `${cobbAngle(p[0], p[1], p[2], p[3], spacing).toFixed(1)}°`;
    case "ellipse":
    case "rect": {
      if (!m.stats && values && meta.kind !== "rgb") {
        m.stats = regionStats(m.kind, p[0], p[1], values, meta.rows, meta.columns);
      }
      const area = regionArea(m.kind, p[0], p[1], spacing);
      const areaText = `area ${area.toFixed(1)} ${spacing ? "mm²" : "px²"}`;
      const s = m.stats;
      if (!s) return areaText;
      const digits = meta.dtype === "float32" ? 3 : 1;
      const units = meta.units ? ` ${meta.units}` : "";
      return `mean ${s.mean.toFixed(digits)} SD ${s.sd.toFixed(digits)} min ${num(s.min, 3)} max ${num(s.max, 3)}${units}, ${areaText}`;
    }
    default:
      return "";
  }
}
