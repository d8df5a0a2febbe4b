// The warning before a session ends (portal/middleware.py ends it; this only tells the person).
// <body> carries how long the session had left when the page was made (data-session-left), how
// long before the end to warn (data-session-warn) and the status URL (data-session-ping).
// Before warning, the tab asks the server how long is really left: requests from another tab
// (or this page's own fetches) may have kept the session alive. Asking is not activity; only
// "Stay signed in" (a POST) is. Clicks and keys in the page do not extend the session.
const body = document.body;
const pingUrl = body.dataset.sessionPing;
const loginUrl = body.dataset.sessionLogin || "";
const csrf = body.dataset.sessionCsrf || "";
const warnSeconds = Number(body.dataset.sessionWarn) || 120;
const maxLabel = body.dataset.sessionMaxLabel || "";
const RECHECK_MS = 10_000; // while the warning shows: did another tab keep the session alive?

let deadline = 0; // performance.now() at which the server ends the session
let endsBy = "idle";
let timer = 0;
let ticker = 0;
let banner = null;

function countdown(seconds) {
  const s = Math.max(0, Math.ceil(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function secondsLeft() {
  return (deadline - performance.now()) / 1000;
}

async function status(method) {
  // null: the session has ended (the server signed it out, or nobody is signed in).
  const headers = { Accept: "application/json" };
  if (method === "POST") headers["X-CSRFToken"] = csrf;
  const response = await fetch(pingUrl, {
    method,
    headers,
    credentials: "same-origin",
    cache: "no-store",
  });
  if (response.status === 401) return null;
  if (!response.ok) throw new Error(`session status: HTTP ${response.status}`);
  return response.json();
}

function signedOut() {
  clearTimeout(timer);
  clearInterval(ticker);
  // The path only: a query string can hold what someone searched for.
  const next = encodeURIComponent(window.location.pathname);
  window.location.assign(loginUrl ? `${loginUrl}?next=${next}` : window.location.pathname);
}

function schedule(state) {
  clearTimeout(timer);
  deadline = performance.now() + state.left * 1000;
  endsBy = state.ends_by || "idle";
  const untilWarning = state.left - warnSeconds;
  if (untilWarning > 0) {
    hide();
    timer = setTimeout(check, untilWarning * 1000);
  } else {
    show();
    // At zero, ask again; until then, now and then, in case another tab kept the session alive.
    const wait = Math.min(Math.max(state.left, 0) * 1000 + 250, RECHECK_MS);
    timer = setTimeout(check, wait);
  }
}

async function check() {
  let state;
  try {
    state = await status("GET");
  } catch {
    // Relay unreachable for a moment: keep counting locally and ask again soon.
    if (secondsLeft() <= warnSeconds) show();
    timer = setTimeout(check, 2_000);
    return;
  }
  if (state === null) signedOut();
  else schedule(state);
}

async function staySignedIn() {
  const button = banner.querySelector("button");
  button.disabled = true;
  try {
    const state = await status("POST");
    if (state === null) signedOut();
    else schedule(state);
  } catch {
    banner.querySelector(".session-warning-error").textContent =
      "Relay could not be reached. Try again.";
  } finally {
    button.disabled = false;
  }
}

function build() {
  banner = document.createElement("div");
  banner.id = "session-warning";
  banner.className = "callout session-warning";
  banner.setAttribute("role", "alertdialog");
  banner.setAttribute("aria-labelledby", "session-warning-text");
  banner.hidden = true;
  banner.tabIndex = -1;
  // Styled here through the CSSOM (allowed by a strict content security policy), so that the
  // banner needs no rule of its own in relay.css.
  Object.assign(banner.style, {
    position: "fixed",
    top: "0.8rem",
    left: "50%",
    transform: "translateX(-50%)",
    zIndex: "1000",
    maxWidth: "min(36rem, 95vw)",
    boxShadow: "0 4px 16px rgba(0, 0, 0, 0.25)",
  });
  const text = document.createElement("p");
  text.id = "session-warning-text";
  text.style.margin = "0 0 0.5rem";
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Stay signed in";
  button.addEventListener("click", staySignedIn);
  const error = document.createElement("p");
  error.className = "session-warning-error error";
  error.setAttribute("aria-live", "polite");
  error.style.margin = "0.5rem 0 0";
  banner.append(text, button, error);
  document.body.append(banner);
}

function render() {
  const text = banner.querySelector("#session-warning-text");
  const left = countdown(secondsLeft());
  const button = banner.querySelector("button");
  if (endsBy === "absolute") {
    // Staying signed in cannot help: the session has reached its longest allowed time.
    text.textContent =
      `Your session ends in ${left}` +
      (maxLabel ? `: a session lasts at most ${maxLabel}.` : ".") +
      " Save your work; you will need to sign in again.";
    button.hidden = true;
  } else {
    text.textContent = `You will be signed out in ${left} for inactivity.`;
    button.hidden = false;
  }
}

function show() {
  if (!banner) build();
  const wasHidden = banner.hidden;
  render();
  clearInterval(ticker);
  ticker = setInterval(render, 250);
  if (wasHidden) {
    banner.hidden = false;
    banner.querySelector(".session-warning-error").textContent = "";
    // An alert dialog takes focus, so a screen reader reads it and a keyboard reaches the button.
    const button = banner.querySelector("button");
    (button.hidden ? banner : button).focus();
  }
}

function hide() {
  clearInterval(ticker);
  if (banner) banner.hidden = true;
}

if (pingUrl) {
  schedule({
    left: Number(body.dataset.sessionLeft) || 0,
    ends_by: body.dataset.sessionEndsBy,
  });
  // A tab brought back (or restored from the back-forward cache) may have slept through its
  // timers: ask where things stand.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") check();
  });
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) check();
  });
}
