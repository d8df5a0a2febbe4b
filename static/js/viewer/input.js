// What the user's hands mean in a viewport: mouse, pen and touch through one set of pointer
// events, the wheel, the image slider and a series dropped from the strip, turned into calls on
// the Viewport. Gestures are recognised here; what they change is the Viewport's business.

const ANNOTATION_TOOLS = new Set(["measure", "angle", "cobb", "ellipse", "rect", "arrow"]);
// Tools that one finger uses on a touch screen; with any other, one finger scrolls the stack.
const FINGER_TOOLS = new Set([...ANNOTATION_TOOLS, "probe", "pan"]);
const WHEEL_STEP = 40; // wheel delta (px) per image: one notch of a mouse, a short trackpad swipe

export class PointerInput {
  // `viewer` is the page's shared state (the tool, the stacks); `page.activate(position)` makes
  // the touched viewport the one that keys, presets and cine act on.
  constructor(vp, viewer, page) {
    this.vp = vp;
    this.viewer = viewer;
    this.page = page;
    this.pointers = new Map();
    this.gesture = null;
    this.wheelDelta = 0;
    this.listen();
  }

  point(event) {
    const rect = this.vp.canvas.getBoundingClientRect();
    return [event.clientX - rect.left, event.clientY - rect.top];
  }

  listen() {
    const vp = this.vp;
    const canvas = vp.canvas;
    canvas.addEventListener("pointerdown", (e) => this.pointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.pointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.pointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.pointerUp(e, true));
    canvas.addEventListener("wheel", (e) => this.wheel(e), { passive: false });
    canvas.addEventListener("dblclick", () => vp.act("fit"));
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
    vp.slider.addEventListener("input", () => vp.setIndex(Number(vp.slider.value) - 1));
    vp.el.addEventListener("focusin", () => this.page.activate(vp.position));
    vp.el.addEventListener("dragover", (e) => {
      e.preventDefault();
      vp.el.classList.add("drop-target");
    });
    vp.el.addEventListener("dragleave", () => vp.el.classList.remove("drop-target"));
    vp.el.addEventListener("drop", (e) => {
      e.preventDefault();
      vp.el.classList.remove("drop-target");
      const stacks = this.viewer.stacks;
      const i = Number(e.dataTransfer.getData("text/x-relay-series"));
      if (stacks[i]) {
        this.page.activate(vp.position);
        vp.setStack(stacks[i]);
      }
    });
  }

  pointerDown(event) {
    const vp = this.vp;
    const tool = this.viewer.tool;
    this.page.activate(vp.position);
    event.preventDefault();
    // Keys go to the image again after, say, typing a frame rate (preventDefault kept focus).
    vp.el.focus({ preventScroll: true });
    vp.canvas.setPointerCapture(event.pointerId);
    const at = this.point(event);
    this.pointers.set(event.pointerId, at);
    if (this.pointers.size === 2) {
      const [p, q] = [...this.pointers.values()];
      vp.measureDrop();
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
    } else if (!FINGER_TOOLS.has(tool)) {
      kind = "scroll"; // one finger scrolls the stack unless a finger tool was chosen
    }
    this.gesture = { kind, start: at, last: at, travel: 0 };
    if (ANNOTATION_TOOLS.has(kind)) {
      this.gesture.kind = "measure";
      vp.measureStart(at);
    } else if (kind === "probe") {
      vp.probeAt(at);
    }
  }

  pointerMove(event) {
    const vp = this.vp;
    const at = this.point(event);
    if (!this.pointers.has(event.pointerId)) {
      if (this.viewer.tool === "probe" && event.pointerType === "mouse") vp.probeAt(at);
      else if (ANNOTATION_TOOLS.has(this.viewer.tool)) vp.measureHover(at);
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
        vp.pinch(distance / g.distance, middle, dx, dy);
      } else if (g.mode === "wl") {
        vp.adjustWindow(dx, dy);
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
        vp.adjustWindow(dx, dy);
        break;
      case "pan":
        vp.panBy(dx, dy);
        break;
      case "zoom":
        vp.zoomBy(Math.exp(-dy * 0.01), g.start);
        break;
      case "measure":
        vp.measureMove(at);
        break;
      case "probe":
        vp.probeAt(at);
        break;
      case "scroll": {
        // A swipe across the viewport's height pages through ~the whole stack, at most 40 px
        // and at least 8 px per image. Swiping up goes on, like scrolling a page.
        const count = vp.stack ? vp.stack.images.length : 1;
        const step = Math.min(Math.max(vp.canvas.clientHeight / Math.max(count, 1), 8), 40);
        const images = Math.trunc(-g.travel / step);
        if (images) {
          g.travel += images * step;
          vp.setIndex(vp.index + images);
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
    if (this.gesture && this.gesture.kind === "measure") this.vp.measureEnd(cancelled, this.point(event));
    // After a two-finger gesture the remaining finger does nothing until it is lifted too.
    this.gesture = this.pointers.size === 0 ? null : { kind: "none" };
  }

  wheel(event) {
    const vp = this.vp;
    event.preventDefault();
    this.page.activate(vp.position);
    const delta = event.deltaMode === 1 ? event.deltaY * 40 : event.deltaMode === 2 ? event.deltaY * 800 : event.deltaY;
    if (event.ctrlKey) {
      // Ctrl + wheel, and a trackpad's pinch, which browsers report the same way.
      vp.zoomBy(Math.exp(-delta * 0.002), this.point(event));
      return;
    }
    this.wheelDelta += delta;
    // A mouse notch (or more) is exactly one image; small trackpad deltas add up to one.
    if (Math.abs(delta) >= WHEEL_STEP) this.wheelDelta = Math.sign(delta) * WHEEL_STEP;
    const images = Math.trunc(this.wheelDelta / WHEEL_STEP);
    if (images) {
      this.wheelDelta -= images * WHEEL_STEP;
      vp.setIndex(vp.index + images);
    }
  }
}
