// Frames from the server into memory: a stack of images per series, a queue that loads a few at
// a time, nearest first to the image being looked at, and a cache held to a memory budget.
//
// The server sends each frame as its modality values (Hounsfield units on CT) in a typed array,
// with what the frame is in the X-Relay-Frame header; windowing them into pixels happens in the
// browser, so dragging the window, inverting or zooming never asks the server for anything.

import { TYPED } from "./windowing.js";

// Browsers allow ~6 connections per host; leave room for thumbnails and the page itself.
const CONCURRENCY = 4;
// A 300-slice CT is ~150 MB of values; past this the frames farthest from view are dropped.
const CACHE_BUDGET = 768 * 1048576;

export class LoadError extends Error {}

// `frameUrl` is study.json's template with {sop} and {frame}; the page's <link rel=preload> of
// frame 0 is built from the same template, so the first fetch finds that response waiting.
export function stackOf(series, frameUrl) {
  const images = [];
  for (const instance of series.instances) {
    for (let frame = 0; frame < instance.frames; frame += 1) {
      const url = frameUrl
        .replace("{sop}", encodeURIComponent(instance.uid))
        .replace("{frame}", String(frame));
      // `geometry` (where the image lies in the patient) comes with geometry.json, later.
      images.push({ url, frame, frames: instance.frames, sop: instance.uid, geometry: null });
    }
  }
  return { series, images, cache: new Map(), pending: new Set(), strip: null, frameOfReference: "", fps: null };
}

// geometry.json's answer into the stacks: each series' Frame of Reference and frame rate, and
// where each of its images lies. Its instances are in study.json's order.
export function geometryApply(stacks, data) {
  const byUid = new Map(data.series.map((s) => [s.uid, s]));
  for (const stack of stacks) {
    const g = byUid.get(stack.series.uid);
    if (!g) continue;
    stack.frameOfReference = g.frame_of_reference || "";
    stack.fps = g.fps || null;
    let n = 0;
    stack.series.instances.forEach((instance, i) => {
      for (let frame = 0; frame < instance.frames; frame += 1, n += 1) {
        stack.images[n].geometry = frameGeometry(g.instances[i] || {}, frame);
      }
    });
  }
}

// geometry.json's entry for one instance, for one of its frames: a multi-frame object lists a
// position (and, when they differ, an orientation and spacing) per frame.
function frameGeometry(g, frame) {
  const pick = (value, width) => (Array.isArray(value) && Array.isArray(value[0]) ? value[frame] || null : value && value.length === width ? value : null);
  const geometry = { rows: g.rows, columns: g.columns, ipp: pick(g.ipp, 3), iop: pick(g.iop, 6), ps: pick(g.ps, 2) };
  return geometry.ipp && geometry.iop ? geometry : null;
}

export async function fetchFrame(url) {
  // Same-origin credentials match the preload's crossorigin="anonymous"; any other mode and
  // the browser would fetch frame 0 a second time.
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

export class FrameLoader {
  // `viewer` is the page's shared state; the loader reads its stacks, viewports and activeIndex
  // to decide what to fetch next. The page hears of every change to a stack's cache through
  // `loaded(stack, index)` and `evicted(stack)`, since it owns the overlays and the strip.
  constructor(viewer, { loaded, evicted }) {
    this.viewer = viewer;
    this.loaded = loaded;
    this.evicted = evicted;
    this.inflight = 0;
    this.cacheBytes = 0;
    this.loadedAny = false;
    this.opened = false;
    this.early = new Map(); // absolute URL -> fetchFrame() promise started by prefetch()
  }

  // Start loading a frame the page already asked for (its <link rel=preload>) before any
  // viewport wants it: reading its body runs while the page builds the viewports.
  prefetch(url) {
    const key = new URL(url, document.baseURI).href;
    const early = fetchFrame(key);
    early.catch(() => {}); // its error is handled where load() awaits it
    this.early.set(key, early);
  }

  // The first image is on screen: load as many frames at once as the browser allows.
  openUp() {
    this.opened = true;
    this.pump();
  }

  pump() {
    // Until the page has drawn its first image (openUp), that frame alone: it does not share
    // the server, or the machine, with its neighbours.
    const limit = this.opened ? CONCURRENCY : this.loadedAny ? 0 : 1;
    while (this.inflight < limit) {
      const job = this.nextJob();
      if (!job) return;
      this.load(job.stack, job.index);
    }
  }

  shownStacks() {
    return new Set(this.viewer.viewports.filter((vp) => !vp.el.hidden && vp.stack).map((vp) => vp.stack));
  }

  // The nearest image not yet loaded to the one in view, in the active viewport first; forward
  // before backward at each distance, since people mostly scroll on.
  nextJob() {
    const { viewports, activeIndex } = this.viewer;
    const order = [viewports[activeIndex], ...viewports.filter((_, i) => i !== activeIndex)];
    for (const vp of order) {
      const stack = vp.stack;
      if (vp.el.hidden || !stack) continue;
      const count = stack.images.length;
      for (let d = 0; d < count; d += 1) {
        for (const i of d === 0 ? [vp.index] : [vp.index + d, vp.index - d]) {
          if (i < 0 || i >= count || stack.cache.has(i) || stack.pending.has(i)) continue;
          if (!this.makeRoom(stack, vp.index, d)) return null;
          return { stack, index: i };
        }
      }
    }
    return null;
  }

  // Free memory for one more frame at `distance` from `center`: series out of view go first, then
  // the frames of this series farther away than the one wanted. False when nothing may go.
  makeRoom(stack, center, distance) {
    if (this.cacheBytes < CACHE_BUDGET) return true;
    const shown = this.shownStacks();
    for (const other of this.viewer.stacks) {
      if (shown.has(other)) continue;
      for (const entry of other.cache.values()) this.cacheBytes -= entry.bytes;
      other.cache.clear();
      this.evicted(other);
    }
    while (this.cacheBytes >= CACHE_BUDGET) {
      let far = -1;
      let farDistance = distance;
      for (const i of stack.cache.keys()) {
        if (Math.abs(i - center) > farDistance) {
          far = i;
          farDistance = Math.abs(i - center);
        }
      }
      if (far < 0) return false;
      this.cacheBytes -= stack.cache.get(far).bytes;
      stack.cache.delete(far);
    }
    return true;
  }

  async load(stack, index) {
    stack.pending.add(index);
    this.inflight += 1;
    let entry;
    try {
      const url = new URL(stack.images[index].url, document.baseURI).href;
      const early = this.early.get(url);
      this.early.delete(url);
      entry = await (early || fetchFrame(url));
    } catch (error) {
      const reason = error instanceof LoadError ? error.message : "The network failed while loading this image.";
      // A failed frame is cached as failed, so the queue moves on instead of retrying forever.
      entry = { meta: null, values: null, error: reason, bytes: 0 };
    }
    if (!this.loadedAny) {
      this.loadedAny = true;
      performance.mark("relay-viewer:decoded");
    }
    this.inflight -= 1;
    stack.pending.delete(index);
    stack.cache.set(index, entry);
    this.cacheBytes += entry.bytes;
    this.loaded(stack, index);
    this.pump();
  }
}
