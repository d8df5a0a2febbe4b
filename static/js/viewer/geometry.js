// Where images lie in the patient, with no DOM in it: orientation letters for the edges of the
// screen, the position of a slice along its normal, the slice of another stack nearest to a
// point, and where one image plane cuts another (reference lines).
//
// Patient coordinates are DICOM's (LPS): +x towards the patient's left, +y posterior, +z head.
// An image's geometry is {ipp, iop, ps, rows, columns}: Image Position (Patient) of the first
// pixel's centre, Image Orientation (Patient) as [row direction, column direction], Pixel
// Spacing as [between rows, between columns] in mm.

const LETTERS = [
  ["R", "L"],
  ["A", "P"],
  ["F", "H"],
];
// A second letter once a direction leans this far towards a second axis (about 17°), as viewers
// mark oblique images.
const OBLIQUE = 0.3;

export const dot = (a, b) => a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
export const cross = (a, b) => [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
const add = (a, b) => [a[0] + b[0], a[1] + b[1], a[2] + b[2]];
const sub = (a, b) => [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
const times = (a, k) => [a[0] * k, a[1] * k, a[2] * k];
const norm = (a) => Math.hypot(a[0], a[1], a[2]);

// The letters of a patient direction: the axis it runs along most, and a second when oblique.
export function orientationLetters(vector) {
  const length = norm(vector);
  if (!(length > 0)) return "";
  const parts = vector
    .map((v, axis) => ({ axis, size: Math.abs(v) / length, letter: LETTERS[axis][v > 0 ? 1 : 0] }))
    .sort((a, b) => b.size - a.size);
  let text = parts[0].letter;
  if (parts[1].size >= OBLIQUE) text += parts[1].letter;
  return text;
}

export function rowDirection(g) {
  return g.iop.slice(0, 3);
}

export function columnDirection(g) {
  return g.iop.slice(3, 6);
}

export function normal(g) {
  return cross(rowDirection(g), columnDirection(g));
}

// The letters on the four edges of the screen. `toImage(dx, dy)` turns a direction on the screen
// into one in image pixels (the inverse of the view's rotation and flips).
export function edgeMarkers(g, toImage) {
  if (!g || !g.iop) return null;
  const patient = ([i, j]) => add(times(rowDirection(g), i), times(columnDirection(g), j));
  const right = patient(toImage(1, 0));
  const down = patient(toImage(0, 1));
  return {
    right: orientationLetters(right),
    left: orientationLetters(times(right, -1)),
    bottom: orientationLetters(down),
    top: orientationLetters(times(down, -1)),
  };
}

// The patient point at image coordinates (x, y), where pixel (i, j) covers [j, j+1) x [i, i+1).
export function imageToPatient(g, x, y) {
  const [rowSpacing, columnSpacing] = g.ps || [1, 1];
  return add(add(g.ipp, times(rowDirection(g), (x - 0.5) * columnSpacing)), times(columnDirection(g), (y - 0.5) * rowSpacing));
}

export function imageCentre(g) {
  return imageToPatient(g, g.columns / 2, g.rows / 2);
}

// Where the slice lies along its own normal (mm): what synchronized scrolling compares.
export function slicePosition(g) {
  return dot(g.ipp, normal(g));
}

export function hasPlane(g) {
  return Boolean(g && g.ipp && g.iop && g.iop.length === 6);
}

export function parallel(a, b, cosine = 0.8) {
  return Math.abs(dot(normal(a), normal(b))) >= cosine;
}

// The index of the slice among `geometries` nearest to `point` along their own normal, or -1.
export function nearestSlice(geometries, point) {
  let best = -1;
  let bestDistance = Infinity;
  geometries.forEach((g, i) => {
    if (!hasPlane(g)) return;
    const distance = Math.abs(dot(sub(point, g.ipp), normal(g)));
    if (distance < bestDistance - 1e-6) {
      best = i;
      bestDistance = distance;
    }
  });
  return best;
}

// Where the plane of `source` cuts the image `target`, as [x1, y1, x2, y2] in the target's image
// coordinates, clipped to the image; null when the planes are parallel or do not meet in it.
export function referenceLine(source, target) {
  if (!hasPlane(source) || !hasPlane(target) || parallel(source, target, 0.999)) return null;
  const n = normal(source);
  const d = dot(n, source.ipp);
  // The target plane as image coordinates: P(x, y) = origin + x * u + y * v.
  const origin = imageToPatient(target, 0, 0);
  const [rowSpacing, columnSpacing] = target.ps || [1, 1];
  const u = times(rowDirection(target), columnSpacing);
  const v = times(columnDirection(target), rowSpacing);
  // n . P(x, y) = d is the line a x + b y = c in image coordinates.
  const a = dot(n, u);
  const b = dot(n, v);
  const c = d - dot(n, origin);
  const w = target.columns;
  const h = target.rows;
  const points = [];
  const keep = (x, y) => {
    if (x < -1e-6 || x > w + 1e-6 || y < -1e-6 || y > h + 1e-6) return;
    if (points.some((p) => Math.hypot(p[0] - x, p[1] - y) < 1e-6)) return;
    points.push([x, y]);
  };
  if (Math.abs(b) > 1e-9) {
    keep(0, c / b);
    keep(w, (c - a * w) / b);
  }
  if (Math.abs(a) > 1e-9) {
    keep(c / a, 0);
    keep((c - b * h) / a, h);
  }
  if (points.length < 2) return null;
  return [points[0][0], points[0][1], points[1][0], points[1][1]];
}
