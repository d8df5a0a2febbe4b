// The disc viewer (a classic script: a page opened from a disc has a file:// address, where
// browsers refuse ES modules and fetch). STUDY.JS calls RelayDisc.study(...) with the series;
// each frame arrives as DATA/<series>/F<n>.JS calling RelayDisc.frame(...), loaded by adding a
// <script> near the image in view. The windowing maths is the web viewer's own (WINDOW.JS,
// bundled from static/js/viewer/windowing.js at export time as window.RelayWindowing).
//
// Tests read the state from the canvas: data-series, data-index (0-based), data-count,
// data-drawn ("<series>:<index>" once that image is on it), data-window-center/-width and
// data-state (loading, drawn, error).
(function () {
  "use strict";

  var AHEAD = 4; // frames loaded ahead and behind the one in view
  var KEEP = 64; // frames kept in memory (a 512 x 512 frame is 1 MB of values)
  var maths = window.RelayWindowing;

  var state = {
    series: [], // [{key, number, label, count, study}]
    current: null,
    index: 0,
    window: null, // [center, width] the user dragged to; null: each image's own
    frames: {}, // "<key>:<index>" -> {meta, values}
    order: [], // keys of `frames`, oldest first
    loading: {}, // "<key>:<index>" -> true while its script loads
  };

  var canvas, ctx, box, slider, position, message, windowText;

  function frameKey(series, index) {
    return series.key + ":" + index;
  }

  function pad(number) {
    var text = String(number);
    while (text.length < 7) text = "0" + text;
    return text;
  }

  function frameFile(series, index) {
    return "DATA/" + series.key + "/F" + pad(index + 1) + ".JS";
  }

  // --- data ---------------------------------------------------------------------------------

  function decode(meta, base64) {
    var binary = atob(base64);
    var pixels = meta.rows * meta.columns;
    var values;
    if (meta.encoding === "rgb565") {
      values = new Uint8Array(pixels * 3);
      for (var p = 0, q = 0; p < pixels; p += 1, q += 3) {
        var code = binary.charCodeAt(2 * p) | (binary.charCodeAt(2 * p + 1) << 8);
        var r = code >> 11;
        var g = (code >> 5) & 63;
        var b = code & 31;
        values[q] = (r << 3) | (r >> 2);
        values[q + 1] = (g << 2) | (g >> 4);
        values[q + 2] = (b << 3) | (b >> 2);
      }
      return values;
    }
    values = meta.encoding === "int" ? new Int32Array(pixels) : new Float32Array(pixels);
    var scale = meta.scale;
    var offset = meta.offset;
    for (var i = 0; i < pixels; i += 1) {
      values[i] = (binary.charCodeAt(2 * i) | (binary.charCodeAt(2 * i + 1) << 8)) * scale + offset;
    }
    return values;
  }

  function remember(key, entry) {
    state.frames[key] = entry;
    state.order.push(key);
    while (state.order.length > KEEP) {
      var old = state.order.shift();
      if (state.current && old === frameKey(state.current, state.index)) {
        state.order.push(old);
        continue;
      }
      delete state.frames[old];
    }
  }

  function request(series, index) {
    var key = frameKey(series, index);
    if (index < 0 || index >= series.count || state.frames[key] || state.loading[key]) return;
    state.loading[key] = true;
    var script = document.createElement("script");
    script.src = frameFile(series, index);
    script.onload = function () {
      delete state.loading[key];
      script.remove(); // its text (the base64) can go now
    };
    script.onerror = function () {
      delete state.loading[key];
      script.remove();
      remember(key, { meta: null, values: null, error: "This image's file could not be read." });
      if (key === frameKey(state.current, state.index)) draw();
    };
    document.head.appendChild(script);
  }

  function want() {
    var series = state.current;
    if (!series) return;
    request(series, state.index);
    for (var d = 1; d <= AHEAD; d += 1) {
      request(series, state.index + d);
      request(series, state.index - d);
    }
  }

  // --- drawing -----------------------------------------------------------------------------

  function fit() {
    if (!canvas.width || !canvas.height) return;
    var scale = Math.min(box.clientWidth / canvas.width, box.clientHeight / canvas.height);
    if (!isFinite(scale) || scale <= 0) scale = 1;
    canvas.style.width = Math.floor(canvas.width * scale) + "px";
    canvas.style.height = Math.floor(canvas.height * scale) + "px";
  }

  function showMessage(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  function draw() {
    var series = state.current;
    if (!series) return;
    var entry = state.frames[frameKey(series, state.index)];
    canvas.dataset.series = String(series.number);
    canvas.dataset.index = String(state.index);
    canvas.dataset.count = String(series.count);
    position.textContent = "Image " + (state.index + 1) + " of " + series.count;
    if (!entry) {
      canvas.dataset.state = "loading";
      showMessage("Loading\u2026");
      return;
    }
    var meta = entry.meta;
    if (entry.error || !meta || meta.error) {
      canvas.dataset.state = "error";
      canvas.dataset.drawn = frameKey(series, state.index);
      showMessage("This image cannot be shown here: " + (entry.error || (meta && meta.error)));
      return;
    }
    if (canvas.width !== meta.columns || canvas.height !== meta.rows) {
      canvas.width = meta.columns;
      canvas.height = meta.rows;
      fit();
    }
    var window_ = state.window || [meta.window_center, meta.window_width];
    var image = ctx.createImageData(meta.columns, meta.rows);
    var out = new Uint32Array(image.data.buffer);
    maths.windowPixels(out, meta, entry.values, window_[0], window_[1], meta.invert);
    ctx.putImageData(image, 0, 0);
    canvas.dataset.windowCenter = String(window_[0]);
    canvas.dataset.windowWidth = String(window_[1]);
    canvas.dataset.drawn = frameKey(series, state.index);
    canvas.dataset.state = "drawn";
    showMessage("");
    var where = meta.slice_location !== null ? " \u00b7 slice at " + maths.num(meta.slice_location) + " mm" : "";
    windowText.textContent =
      "Window " + maths.num(window_[0], 0) + " / " + maths.num(window_[1], 0) +
      (meta.units ? " " + meta.units : "") + where;
  }

  // --- navigation ----------------------------------------------------------------------------

  function go(index) {
    var series = state.current;
    if (!series) return;
    var next = Math.max(0, Math.min(series.count - 1, index));
    if (next === state.index && canvas.dataset.drawn === frameKey(series, next)) return;
    state.index = next;
    slider.value = String(next + 1);
    want();
    draw();
  }

  function choose(number) {
    var series = state.series[number - 1] || state.series[0];
    if (!series) return;
    state.current = series;
    state.index = 0;
    state.window = null;
    slider.max = String(series.count);
    slider.value = "1";
    slider.disabled = series.count < 2;
    var buttons = document.querySelectorAll("#series-list button");
    for (var i = 0; i < buttons.length; i += 1) {
      buttons[i].setAttribute("aria-current", buttons[i].dataset.series === String(series.number) ? "true" : "false");
    }
    if (location.hash !== "#series=" + series.number) history.replaceState(null, "", "#series=" + series.number);
    want();
    draw();
  }

  function wire() {
    canvas = document.getElementById("image");
    ctx = canvas.getContext("2d");
    box = document.getElementById("box");
    slider = document.getElementById("slider");
    position = document.getElementById("position");
    message = document.getElementById("message");
    windowText = document.getElementById("window");
    document.getElementById("prev").addEventListener("click", function () { go(state.index - 1); });
    document.getElementById("next").addEventListener("click", function () { go(state.index + 1); });
    document.getElementById("reset").addEventListener("click", function () {
      state.window = null;
      draw();
    });
    slider.addEventListener("input", function () { go(Number(slider.value) - 1); });
    box.addEventListener("wheel", function (event) {
      event.preventDefault();
      go(state.index + (event.deltaY > 0 ? 1 : -1));
    }, { passive: false });
    document.addEventListener("keydown", function (event) {
      var steps = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
      if (event.target && event.target.tagName === "INPUT") return;
      if (event.key in steps) {
        event.preventDefault();
        go(state.index + steps[event.key]);
      } else if (event.key === "Home") {
        go(0);
      } else if (event.key === "End" && state.current) {
        go(state.current.count - 1);
      }
    });
    var drag = null;
    canvas.addEventListener("pointerdown", function (event) {
      var entry = state.current && state.frames[frameKey(state.current, state.index)];
      if (!entry || !entry.meta || entry.error || entry.meta.error) return;
      canvas.setPointerCapture(event.pointerId);
      drag = {
        x: event.clientX,
        y: event.clientY,
        meta: entry.meta,
        start: state.window || [entry.meta.window_center, entry.meta.window_width],
      };
    });
    canvas.addEventListener("pointermove", function (event) {
      if (!drag) return;
      state.window = maths.windowDragged(drag.meta, drag.start, event.clientX - drag.x, event.clientY - drag.y);
      draw();
    });
    var stop = function () { drag = null; };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    window.addEventListener("resize", fit);
    window.addEventListener("hashchange", function () { choose(hashSeries()); });
  }

  function hashSeries() {
    var match = /series=(\d+)/.exec(location.hash);
    return match ? Number(match[1]) : 1;
  }

  function list(data) {
    var nav = document.getElementById("series-list");
    var title = [];
    data.studies.forEach(function (study) {
      var heading = document.createElement("h2");
      heading.textContent = [study.patient, study.date, study.modalities].filter(Boolean).join(" \u00b7 ");
      nav.appendChild(heading);
      if (title.indexOf(study.patient) < 0) title.push(study.patient);
      study.series.forEach(function (series) {
        series.study = study;
        state.series.push(series);
        var button = document.createElement("button");
        button.type = "button";
        button.dataset.series = String(series.number);
        button.textContent = series.label + " (" + series.count + ")";
        button.addEventListener("click", function () { choose(series.number); });
        nav.appendChild(button);
      });
    });
    document.getElementById("title").textContent = title.join("; ");
    document.title = "Images \u00b7 " + title.join("; ");
  }

  window.RelayDisc = {
    study: function (data) {
      wire();
      list(data);
      if (!state.series.length) {
        canvas.dataset.state = "error";
        showMessage("There are no images this viewer can show.");
        return;
      }
      choose(hashSeries());
    },
    frame: function (seriesKey, index, meta, base64) {
      var key = seriesKey + ":" + index;
      var entry;
      try {
        entry = meta.error
          ? { meta: meta, values: null, error: meta.error }
          : { meta: meta, values: decode(meta, base64), error: null };
      } catch (error) {
        entry = { meta: meta, values: null, error: "This image's data is damaged." };
      }
      remember(key, entry);
      if (state.current && key === frameKey(state.current, state.index)) draw();
    },
  };
})();
