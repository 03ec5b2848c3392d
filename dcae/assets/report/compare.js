"use strict";
// The comparison page: a viewer whose panels share one zoom/pan state, and a sortable, paged table.
// User text (file and model names) only ever goes through textContent.
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const rows = DATA.rows.map((row, index) => Object.assign({ index: index }, row));
  const state = { key: "index", dir: 1, page: 0, selected: 0, scale: 1, x: 0, y: 0 };
  const VIEW = 320;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(value, digits) { return value === null || value === undefined ? "n/a" : value.toFixed(digits); }
  function sortValue(row, key) {
    if (key === "index") return row.index;
    if (key === "name") return row.name;
    const [m, metric] = key.split(":");
    const v = (row.metrics[+m] || {})[metric];
    return v === null || v === undefined ? NaN : v;
  }

  // --- viewer --------------------------------------------------------------------------------------------------------
  function applyTransform() {
    const t = "translate(" + state.x + "px, " + state.y + "px) scale(" + state.scale + ")";
    for (const img of document.querySelectorAll("#viewer img")) img.style.transform = t;
    document.getElementById("zoom-level").textContent = "zoom " + state.scale.toFixed(2) + "x";
  }
  function fit(img) {  // the whole image fits the panel at zoom 1
    const w = img.naturalWidth || VIEW, h = img.naturalHeight || VIEW;
    const base = Math.min(VIEW / w, VIEW / h);
    for (const other of document.querySelectorAll("#viewer img")) { other.width = w * base; other.height = h * base; }
  }
  function zoomAt(factor, cx, cy) {
    const scale = Math.min(64, Math.max(1, state.scale * factor));
    const f = scale / state.scale;
    state.x = cx - (cx - state.x) * f;
    state.y = cy - (cy - state.y) * f;
    state.scale = scale;
    if (scale === 1) { state.x = 0; state.y = 0; }
    applyTransform();
  }
  function resetZoom() { state.scale = 1; state.x = 0; state.y = 0; applyTransform(); }
  function panel(src, caption, kind) {
    const figure = el("figure", { class: "panel", "data-kind": kind });
    const viewport = el("div", { class: "viewport" });
    const img = el("img", { src: src, alt: caption, draggable: "false" });
    viewport.appendChild(img);
    figure.appendChild(viewport);
    figure.appendChild(el("figcaption", {}, caption));
    viewport.addEventListener("wheel", (event) => {
      event.preventDefault();
      const box = viewport.getBoundingClientRect();
      zoomAt(event.deltaY < 0 ? 1.25 : 0.8, event.clientX - box.left, event.clientY - box.top);
    }, { passive: false });
    let drag = null;
    viewport.addEventListener("pointerdown", (event) => {
      drag = { x: event.clientX - state.x, y: event.clientY - state.y };
      if (viewport.setPointerCapture) viewport.setPointerCapture(event.pointerId);
    });
    viewport.addEventListener("pointermove", (event) => {
      if (!drag) return;
      state.x = event.clientX - drag.x; state.y = event.clientY - drag.y;
      applyTransform();
    });
    viewport.addEventListener("pointerup", () => { drag = null; });
    viewport.addEventListener("dblclick", resetZoom);
    return figure;
  }
  function show(index) {
    const row = rows[index];
    if (!row) return;
    state.selected = index;
    document.getElementById("viewer-name").textContent = row.name;
    const viewer = document.getElementById("viewer");
    viewer.replaceChildren();
    const original = panel(row.original, "original: " + row.name, "original");
    viewer.appendChild(original);
    DATA.models.forEach((model, m) => {
      const metrics = row.metrics[m] || {};
      const caption = model + ": PSNR " + fmt(metrics.psnr, 2) + " dB, SSIM " + fmt(metrics.ssim, 4) +
        ", LPIPS " + fmt(metrics.lpips, 4);
      viewer.appendChild(panel(row.recon[m], caption, "reconstruction"));
    });
    DATA.models.forEach((model, m) => viewer.appendChild(panel(row.error[m], "error map: " + model, "error")));
    const first = original.querySelector("img");
    const onload = () => { fit(first); applyTransform(); };
    if (first.complete && first.naturalWidth) onload(); else first.addEventListener("load", onload);
    applyTransform();
    renderTable();
  }

  // --- table ---------------------------------------------------------------------------------------------------------
  function columns() {
    const cols = [{ key: "index", label: "#" }, { key: "thumb", label: "image" }, { key: "name", label: "file" }];
    DATA.models.forEach((model, m) => DATA.metrics.forEach((metric) =>
      cols.push({ key: m + ":" + metric.key, label: model + " " + metric.label, better: metric.better })));
    return cols;
  }
  function sorted() {
    const out = rows.slice();
    out.sort((a, b) => {
      const va = sortValue(a, state.key), vb = sortValue(b, state.key);
      if (typeof va === "string") return state.dir * va.localeCompare(vb);
      if (Number.isNaN(va) !== Number.isNaN(vb)) return Number.isNaN(va) ? 1 : -1;  // n/a last
      return state.dir * ((va - vb) || (a.index - b.index));
    });
    return out;
  }
  function renderTable() {
    const table = document.getElementById("images");
    table.replaceChildren();
    const head = el("tr");
    for (const col of columns()) {
      const th = el("th", { "data-key": col.key }, col.label);
      if (col.key === state.key) th.className = state.dir > 0 ? "sorted-asc" : "sorted-desc";
      if (col.key !== "thumb") th.addEventListener("click", () => {
        state.dir = state.key === col.key ? -state.dir : (col.better === "higher" ? -1 : 1);
        state.key = col.key; state.page = 0; renderTable();
      });
      head.appendChild(th);
    }
    const thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
    const all = sorted();
    const pages = Math.max(1, Math.ceil(all.length / DATA.page_size));
    state.page = Math.min(state.page, pages - 1);
    const body = el("tbody");
    for (const row of all.slice(state.page * DATA.page_size, (state.page + 1) * DATA.page_size)) {
      const tr = el("tr", { "data-index": String(row.index) });
      if (row.index === state.selected) tr.className = "selected";
      tr.appendChild(el("td", { class: "num" }, String(row.index + 1)));
      const cell = el("td"); cell.appendChild(el("img", { class: "thumb", src: row.thumb, alt: row.name, loading: "lazy" }));
      tr.appendChild(cell);
      tr.appendChild(el("td", { class: "name" }, row.name));
      DATA.models.forEach((model, m) => DATA.metrics.forEach((metric) =>
        tr.appendChild(el("td", { class: "num" }, fmt((row.metrics[m] || {})[metric.key], metric.key === "psnr" ? 2 : 4)))));
      tr.addEventListener("click", () => { show(row.index); window.scrollTo(0, 0); });
      body.appendChild(tr);
    }
    table.appendChild(body);
    document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " + pages +
      " (" + all.length + " images)";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }

  document.getElementById("prev").addEventListener("click", () => { state.page -= 1; renderTable(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; renderTable(); });
  document.getElementById("zoom-in").addEventListener("click", () => zoomAt(1.5, VIEW / 2, VIEW / 2));
  document.getElementById("zoom-out").addEventListener("click", () => zoomAt(1 / 1.5, VIEW / 2, VIEW / 2));
  document.getElementById("zoom-reset").addEventListener("click", resetZoom);
  show(0);
  if (!rows.length) renderTable();
})();
