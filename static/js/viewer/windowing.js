// The viewer's arithmetic, with no DOM in it: modality values through a window into pixels, the
// CT presets, the typed arrays frames arrive in, and how numbers are written on the screen.

// Common CT windows as [center (level), width], in HU, in the order of keys 1-9.
export const PRESETS = {
  brain: [40, 80],
  soft: [40, 400],
  lung: [-600, 1500],
  bone: [400, 1800],
  mediastinum: [50, 350],
  subdural: [75, 215],
  stroke: [32, 8],
  abdomen: [60, 400],
  liver: [80, 150],
};

export const PRESET_LABELS = {
  brain: "Brain",
  soft: "Soft tissue",
  lung: "Lung",
  bone: "Bone",
  mediastinum: "Mediastinum",
  subdural: "Subdural",
  stroke: "Stroke",
  abdomen: "Abdomen",
  liver: "Liver",
};

// The presets a modality offers: Hounsfield windows mean something on CT only; every image has
// its own window ("default", from the file) and one from its values ("auto").
export function presetsFor(modality) {
  return modality === "CT" ? Object.keys(PRESETS) : [];
}

// A window from the values themselves: the 1st to 99th percentile, so a few outliers (metal,
// air outside the body) do not wash the image out.
export function autoWindow(meta, values) {
  if (!values || !values.length) return null;
  const samples = meta.kind === "rgb" ? 3 : 1;
  const step = Math.max(Math.floor(values.length / (samples * 65536)), 1) * samples;
  const picked = [];
  for (let i = 0; i < values.length; i += step) picked.push(values[i]);
  picked.sort((a, b) => a - b);
  const low = picked[Math.floor(picked.length * 0.01)];
  const high = picked[Math.min(Math.ceil(picked.length * 0.99), picked.length - 1)];
  const width = Math.max(high - low, meta.dtype === "float32" ? 1e-6 : 1);
  return [low + width / 2, width];
}

// The X-Relay-Frame header's dtype names the array its body is read into.
export const TYPED = {
  int16: Int16Array,
  uint16: Uint16Array,
  int32: Int32Array,
  float32: Float32Array,
  uint8: Uint8Array,
};

export function num(value, digits = 2) {
  const factor = 10 ** digits;
  return String(Math.round(value * factor) / factor);
}

// The preset the window is, so the menu never names a window that is not the one shown.
export function presetName(window) {
  if (!window) return "";
  const found = Object.entries(PRESETS).find(([, w]) => w[0] === window[0] && w[1] === window[1]);
  return found ? found[0] : "";
}

// How far one screen pixel of a window/level drag moves, as a share of the current width.
export const DRAG_SENSITIVITY = 0.005;

// The window after a drag of (dx, dy) screen px: across is width, up/down is level. The step is
// proportional to the width being shown (0.4 HU a pixel on a W80 brain window, 9 HU on a W1800
// bone window), with a floor so that a window dragged very narrow can still open up again.
export function windowDragged(meta, [center, width], dx, dy) {
  const range = Math.max(meta.max_value - meta.min_value, 1e-6);
  const minimum = meta.dtype === "float32" ? range / 1e4 : 1;
  const floor = Math.max(range / 200, minimum * 20);
  const step = Math.max(width, floor) * DRAG_SENSITIVITY;
  return [center + dy * step, Math.max(width + dx * step, minimum)];
}

// A window value as shown: whole numbers, except on floating-point images of a small range
// (PET SUV, parametric maps), where whole numbers would hide the window.
export function windowNumber(value, meta) {
  if (meta && meta.dtype === "float32" && Math.abs(meta.max_value - meta.min_value) < 100) return num(value, 2);
  return String(Math.round(value));
}

// A frame's values through the window into `out`, one 0xAABBGGRR word per pixel (the
// little-endian view of RGBA bytes).
export function windowPixels(out, meta, values, center, width, invert) {
  const low = center - width / 2;
  const gain = 255 / Math.max(width, 1e-9);
  if (meta.kind === "rgb") {
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
    return;
  }
  const min = Math.floor(meta.min_value);
  const max = Math.ceil(meta.max_value);
  const grey = (value) => {
    let v = (value - low) * gain;
    v = v < 0 ? 0 : v > 255 ? 255 : v | 0;
    if (invert) v = 255 - v;
    return 0xff000000 | (v << 16) | (v << 8) | v;
  };
  if (meta.dtype !== "float32" && max - min < 1 << 20) {
    // Integers over a modest range: one lookup per pixel instead of arithmetic.
    const lut = new Uint32Array(max - min + 1);
    for (let i = 0; i < lut.length; i += 1) lut[i] = grey(min + i);
    for (let p = 0; p < out.length; p += 1) out[p] = lut[values[p] - min];
  } else {
    for (let p = 0; p < out.length; p += 1) out[p] = grey(values[p]);
  }
}
