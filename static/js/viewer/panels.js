// The side panels beside the images: the measurements of the image shown (each with Delete) and
// the DICOM tag browser (the image's header, fetched when the panel is open, with a filter).
// The page (main.js) says when the image changes; the panels fetch and draw themselves.

export class MeasurePanel {
  constructor(el) {
    this.el = el;
    this.list = el.querySelector("#measure-list");
    this.empty = el.querySelector("#measure-empty");
    this.signature = "";
    this.vp = null;
    this.list.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-id]");
      if (button && this.vp) this.vp.measureDelete(Number(button.dataset.id));
    });
  }

  // Rewritten only when the list changed: a draw happens on every drag step.
  show(vp) {
    this.vp = vp;
    const items = vp.measureList();
    const signature = `${vp.position}|${vp.index}|${items.map((m) => `${m.id}:${m.text}`).join("|")}`;
    if (signature === this.signature) return;
    this.signature = signature;
    this.list.replaceChildren(
      ...items.map((m) => {
        const li = document.createElement("li");
        const text = document.createElement("span");
        text.textContent = m.text;
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.id = String(m.id);
        button.textContent = "Delete";
        button.setAttribute("aria-label", "Delete");
        button.title = `Delete: ${m.text}`;
        li.append(text, button);
        return li;
      }),
    );
    this.empty.hidden = items.length > 0;
  }
}

export class TagPanel {
  // `urlOf(image)` is the tag endpoint's address for a stack image.
  constructor(el, urlOf) {
    this.el = el;
    this.urlOf = urlOf;
    this.body = el.querySelector("tbody");
    this.filter = el.querySelector("#tag-filter");
    this.status = el.querySelector("#tag-status");
    this.url = "";
    this.cache = new Map(); // url -> rows, for as long as the page is open
    this.filter.addEventListener("input", () => this.applyFilter());
  }

  get open() {
    return !this.el.hidden;
  }

  async show(image) {
    if (!this.open) return;
    const url = image ? this.urlOf(image) : "";
    if (url === this.url) return;
    this.url = url;
    if (!url) {
      this.body.replaceChildren();
      this.status.textContent = "No image.";
      return;
    }
    let rows = this.cache.get(url);
    if (!rows) {
      this.status.textContent = "Loading…";
      try {
        const response = await fetch(url, { credentials: "same-origin" });
        const data = await response.json().catch(() => ({}));
        if (!response.ok) throw new Error(data.error || `The server answered ${response.status}.`);
        rows = data.tags;
        this.cache.set(url, rows);
      } catch (error) {
        if (this.url === url) this.status.textContent = `The tags could not be loaded: ${error.message}`;
        return;
      }
    }
    if (this.url !== url) return; // another image was chosen meanwhile
    this.body.replaceChildren(
      ...rows.map((row) => {
        const tr = document.createElement("tr");
        for (const key of ["tag", "keyword", "vr", "value"]) {
          const td = document.createElement("td");
          td.textContent = row[key];
          tr.append(td);
        }
        tr.dataset.search = `${row.tag} ${row.keyword} ${row.vr} ${row.value}`.toLowerCase();
        return tr;
      }),
    );
    this.applyFilter();
  }

  applyFilter() {
    const words = this.filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const tr of this.body.children) {
      tr.hidden = !words.every((w) => tr.dataset.search.includes(w));
      if (!tr.hidden) shown += 1;
    }
    const total = this.body.children.length;
    if (total) this.status.textContent = words.length ? `${shown} of ${total} elements` : `${total} elements`;
  }
}
