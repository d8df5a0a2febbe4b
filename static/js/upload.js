// The browser upload page: files or whole folders, by drag-and-drop or picker, sent one request
// per file to the upload API (several at a time) with a progress bar each and overall.
const root = document.getElementById("uploader");
const endpoint = root.dataset.endpoint;
const manifestEndpoint = root.dataset.manifest;
const HASH_LIMIT = 512 * 1048576; // larger files are left to the server's quiet period
const maxBytes = Number(root.dataset.maxBytes);
const csrf = root.querySelector("input[name=csrfmiddlewaretoken]").value;
const facilitySelect = document.getElementById("facility");
const table = document.getElementById("files");
const tbody = table.querySelector("tbody");
const overall = document.getElementById("overall");
const overallBar = document.getElementById("overall-bar");
const overallText = document.getElementById("overall-text");
const summary = document.getElementById("summary");
const completion = document.getElementById("completion");
const studyUrl = root.dataset.studyUrl; // ends in a placeholder UUID, replaced per study
const shareUrl = root.dataset.shareUrl;
const PLACEHOLDER = "00000000-0000-0000-0000-000000000000";
const SHARE_LIMIT = 100; // the share form takes at most this many studies
const CONCURRENCY = 4;
const NOT_DICOM = "Not a DICOM image, skipped";

const queue = [];
const counts = { stored: 0, duplicate: 0, skipped: 0, conflict: 0, rejected: 0, unavailable: 0 };
let totalBytes = 0;
let doneBytes = 0;
let active = 0;
let finished = 0;
let total = 0;

const labels = {
  stored: "Stored",
  duplicate: "Already stored",
  skipped: "Skipped (not DICOM)",
  conflict: "Conflict",
  rejected: "Rejected",
  unavailable: "Not stored",
};

function addFiles(files) {
  if (!facilitySelect.value) {
    facilitySelect.focus();
    summary.hidden = false;
    summary.textContent = "Choose the facility to upload to first.";
    return;
  }
  // The facility is fixed when files are added, so changing the menu mid-upload cannot split
  // one study between two facilities.
  const facility = facilitySelect.value;
  for (const { file, path } of files) {
    const row = tbody.insertRow();
    // data-label: the column's name, shown beside the value when a phone lays rows out as cards.
    const name = row.insertCell();
    name.textContent = path;
    name.dataset.label = "File";
    const bar = document.createElement("progress");
    bar.max = file.size || 1;
    bar.value = 0;
    const progress = row.insertCell();
    progress.append(bar);
    progress.dataset.label = "Progress";
    const result = row.insertCell();
    result.dataset.label = "Result";
    result.textContent = "Waiting";
    queue.push({ file, path, facility, row, bar, result, sent: 0 });
    totalBytes += file.size;
    total += 1;
  }
  table.hidden = false;
  overall.hidden = false;
  render();
  pump();
}

function size(bytes) {
  if (bytes < 1048576) return `${Math.ceil(bytes / 1024)} KB`;
  return `${(bytes / 1048576).toFixed(1)} MB`;
}

function render() {
  overallBar.max = totalBytes || 1;
  overallBar.value = doneBytes;
  overallText.textContent = `${finished} of ${total} files, ${size(doneBytes)} of ${size(totalBytes)}`;
  facilitySelect.disabled = finished < total;
  const parts = Object.entries(counts).filter(([, n]) => n).map(([k, n]) => `${n} ${labels[k][0].toLowerCase()}${labels[k].slice(1)}`);
  summary.hidden = parts.length === 0;
  summary.textContent = (finished === total ? "Done: " : "So far: ") + parts.join(", ");
}

function settle(item, status, reason) {
  counts[status] = (counts[status] || 0) + 1;
  item.row.className = status;
  if (status === "skipped") item.result.textContent = reason;
  else item.result.textContent = status === "stored" || status === "duplicate" || !reason ? labels[status] : `${labels[status]}: ${reason}`;
  doneBytes += item.file.size - item.sent;
  item.sent = item.file.size;
  item.bar.value = item.bar.max;
  finished += 1;
  active -= 1;
  if (status === "stored" || status === "duplicate") {
    done.push(item);
    if (item.studyUuid) {
      const study = studies.get(item.studyUuid) || { uuid: item.studyUuid, facility: item.facility, paths: [] };
      study.paths.push(item.path);
      studies.set(item.studyUuid, study);
    }
  }
  render();
  pump();
  if (finished === total && active === 0) sendManifest();
}

// The end of an upload: the UID and SHA-256 of every file now on the server (of the copy the
// server keeps, whose 128-byte preamble is zeroed), so that it can mark the studies complete
// and tell their recipients.
const done = [];
// The studies this page's files went into, in the order they first appeared: {uuid, facility, paths}.
const studies = new Map();
async function storedSha256(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  if (bytes.length >= 132 && String.fromCharCode(...bytes.slice(128, 132)) === "DICM") bytes.fill(0, 0, 128);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
}

async function sendManifest() {
  const batch = done.splice(0).filter((item) => item.sopInstanceUid && item.file.size <= HASH_LIMIT);
  if (!batch.length || !crypto.subtle) {
    showNext(null, new Set(), new Set());
    return;
  }
  const byFacility = new Map();
  for (const item of batch) {
    const entry = { sop_instance_uid: item.sopInstanceUid, sha256: await storedSha256(item.file) };
    byFacility.set(item.facility, [...(byFacility.get(item.facility) || []), entry]);
  }
  const complete = new Set();
  const shared = new Set();
  for (const [facility, instances] of byFacility) {
    const response = await fetch(manifestEndpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify({ facility, instances }),
    });
    if (!response.ok) continue;
    const answer = await response.json();
    for (const uuid of answer.complete || []) complete.add(uuid);
    for (const uuid of answer.shared || []) shared.add(uuid);
  }
  showNext([...complete], complete, shared);
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// What next, once the upload is done: how many studies are complete, whether anyone is told
// (only when a study has a share), a link to each study and "Share these studies".
function showNext(completeList, complete, shared) {
  completion.replaceChildren();
  completion.hidden = false;
  const line = document.createElement("p");
  if (completeList !== null && (completeList.length || studies.size)) {
    line.textContent = `${plural(completeList.length, "study is", "studies are")} complete.`;
    if (shared.size) {
      line.textContent += shared.size === 1
        ? " Recipients of its share are notified."
        : ` Recipients of the shares of ${plural(shared.size, "study", "studies")} are notified.`;
    }
    completion.append(line);
  }
  if (!studies.size) {
    if (!line.textContent) completion.hidden = true;
    return;
  }
  const list = document.createElement("ul");
  for (const study of studies.values()) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = studyUrl.replace(PLACEHOLDER, study.uuid);
    const more = study.paths.length - 1;
    link.textContent = more ? `Study of ${study.paths[0]} and ${plural(more, "other file", "other files")}` : `Study of ${study.paths[0]}`;
    item.append(link);
    if (completeList !== null && !complete.has(study.uuid)) item.append(" (still receiving images)");
    list.append(item);
  }
  completion.append(list);
  // The share form takes the studies of one facility at a time.
  const byFacility = new Map();
  for (const study of studies.values()) byFacility.set(study.facility, [...(byFacility.get(study.facility) || []), study.uuid]);
  for (const [facility, uuids] of byFacility) {
    const p = document.createElement("p");
    if (uuids.length > SHARE_LIMIT) {
      p.textContent = `To share more than ${SHARE_LIMIT} studies at once, choose them on the Studies page.`;
    } else {
      const share = document.createElement("a");
      share.className = "button primary";
      share.href = `${shareUrl}?${uuids.map((uuid) => `study=${encodeURIComponent(uuid)}`).join("&")}`;
      share.textContent = uuids.length === 1 ? "Share this study" : "Share these studies";
      p.append(share);
      if (byFacility.size > 1) p.append(` (${facilityName(facility)})`);
    }
    completion.append(p);
  }
}

function facilityName(slug) {
  const option = [...facilitySelect.options].find((o) => o.value === slug);
  return option ? option.textContent : slug;
}

// A file that does not carry the DICOM marker ("DICM" after a 128-byte preamble) is not sent:
// the server would refuse it, and a README or a disc's viewer program is no cause for alarm.
async function isDicom(file) {
  if (file.size < 132) return false;
  const marker = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  return String.fromCharCode(...marker) === "DICM";
}

async function send(item) {
  active += 1;
  item.result.textContent = "Sending";
  let dicom = true;
  try { dicom = await isDicom(item.file); } catch { dicom = true; } // unreadable here: let the server say
  if (!dicom) {
    settle(item, "skipped", NOT_DICOM);
    return;
  }
  if (item.file.size > maxBytes) {
    settle(item, "rejected", "larger than the upload limit");
    return;
  }
  const xhr = new XMLHttpRequest();
  const url = `${endpoint}?facility=${encodeURIComponent(item.facility)}`;
  xhr.open("POST", url);
  xhr.setRequestHeader("X-CSRFToken", csrf);
  xhr.setRequestHeader("Content-Type", "application/dicom");
  xhr.setRequestHeader("X-Filename", encodeURIComponent(item.path));
  xhr.upload.onprogress = (event) => {
    doneBytes += event.loaded - item.sent;
    item.sent = event.loaded;
    item.bar.value = event.loaded;
    render();
  };
  xhr.onload = () => {
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { body = {}; }
    // "unavailable" (503) means the server could not store it now: shown as not stored.
    const status = labels[body.status] ? body.status : "rejected";
    item.sopInstanceUid = body.sop_instance_uid;
    item.studyUuid = body.study_uuid;
    settle(item, status, body.status === "stored" ? "" : body.reason || `server answered ${xhr.status}`);
  };
  xhr.onerror = () => settle(item, "rejected", "the connection failed; try this file again");
  xhr.onabort = () => settle(item, "rejected", "the upload was interrupted; try this file again");
  xhr.ontimeout = xhr.onerror;
  xhr.send(item.file);
}

function pump() {
  while (active < CONCURRENCY && queue.length) send(queue.shift());
}

// Folders dropped on the page arrive as entries to walk.
function readEntry(entry, prefix) {
  return new Promise((resolve) => {
    if (entry.isFile) {
      entry.file((file) => resolve([{ file, path: prefix + file.name }]), () => resolve([]));
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      const all = [];
      const next = () => reader.readEntries(async (entries) => {
        if (!entries.length) {
          const nested = await Promise.all(all.map((e) => readEntry(e, `${prefix}${entry.name}/`)));
          resolve(nested.flat());
        } else {
          all.push(...entries);
          next();
        }
      }, () => resolve([]));
      next();
    } else {
      resolve([]);
    }
  });
}

const dropzone = document.getElementById("dropzone");
// Keyboard users open the file picker from the drop zone with Enter or Space.
dropzone.addEventListener("keydown", (event) => {
  if (event.target === dropzone && (event.key === "Enter" || event.key === " ")) {
    event.preventDefault();
    document.getElementById("pick-files").click();
  }
});
dropzone.addEventListener("dragover", (event) => { event.preventDefault(); dropzone.classList.add("over"); });
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", async (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  const entries = [...event.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
  if (entries.length) {
    const files = (await Promise.all(entries.map((e) => readEntry(e, "")))).flat();
    addFiles(files);
  } else {
    addFiles([...event.dataTransfer.files].map((file) => ({ file, path: file.name })));
  }
});
for (const id of ["pick-files", "pick-folder"]) {
  const input = document.getElementById(id);
  input.addEventListener("change", () => {
    addFiles([...input.files].map((file) => ({ file, path: file.webkitRelativePath || file.name })));
    input.value = "";
  });
}
// The page's controls answer from here on; a test (or a script) waits for this mark.
dropzone.dataset.ready = "true";
