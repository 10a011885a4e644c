// The lookalike page: plain script, no build step. Every view is a function of the address
// (?view=search&id=42, ?view=browse&label=bag, ...), so a result can be shared and reloaded.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
};

/** Calls the API; throws an Error whose message is the server's `error`. */
async function api(path, options = {}) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) {
    const e = new Error(body.error || `HTTP ${r.status}`);
    e.kind = body.kind;
    e.status = r.status;
    throw e;
  }
  return body;
}

const params = () => new URLSearchParams(location.search);
function go(query, replace = false) {
  const url = "/?" + new URLSearchParams(query).toString();
  if (replace) history.replaceState(null, "", url); else history.pushState(null, "", url);
  route();
}
window.addEventListener("popstate", route);

/** Links inside the page navigate without reloading. */
document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a[href^='/?']");
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0) return;
  ev.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});

/** The file name of a source path or URL (the whole source is the card's title). */
const basename = (source) => source ? source.split(/[\\/]/).filter(Boolean).pop() ?? source : null;

function card(item, href) {
  const meta = el("div", { class: "meta" },
    el("div", { class: "label", text: item.label ?? "(no label)" }),
    item.distance !== undefined ? el("div", { class: "distance", text: `distance ${item.distance.toFixed(4)}` }) : null,
    el("div", { class: "source", title: item.source ?? "", text: basename(item.source) ?? `#${item.id}` }));
  const alt = `${item.label ?? "image"} ${item.id}`;
  return el("li", { "data-id": item.id },
    el("a", { class: "card", href, title: "Search by this image" },
      el("img", { src: `${item.thumb}?size=256`, alt, loading: "lazy", width: 150, height: 150 }), meta));
}

const searchHref = (id) => {
  const p = params();
  const q = { view: "search", id };
  if (p.get("k")) q.k = p.get("k");
  if (p.get("label")) q.label = p.get("label");
  return "/?" + new URLSearchParams(q).toString();
};

// ---- header and labels --------------------------------------------------------------------

async function loadSummary() {
  try {
    const s = await api("/api/stats");
    const m = s.model;
    $("#summary").textContent =
      `${s.images} images · model v${m.version} ${m.extractor}${m.config ? " " + m.config : ""} (${m.dim}-d, ${m.metric})`;
    $("#dup-max").placeholder = m.duplicate_distance;
    const sel = $("#train-extractor");
    if (!sel.options.length) {
      sel.append(el("option", { value: "auto", text: "auto (chosen for these images)" }));
      for (const x of s.extractors) sel.append(el("option", { value: x, text: x }));
      sel.value = "auto";
    }
  } catch (e) {
    $("#summary").textContent = `cannot reach the database: ${e.message}`;
  }
}

async function loadLabels() {
  const { labels } = await api("/api/labels");
  const list = $("#labels");
  const filter = $("#label-filter");
  const current = params().get("label") ?? "";
  list.replaceChildren(...labels.map((l) => el("li", {},
    el("a", { href: "/?" + new URLSearchParams({ view: "browse", label: l.label }),
              "aria-current": params().get("view") === "browse" && current === l.label ? "true" : "false" },
      el("span", { text: l.label }), el("span", { class: "muted", text: String(l.count) })))));
  filter.replaceChildren(el("option", { value: "", text: "any" }),
    ...labels.map((l) => el("option", { value: l.label, text: l.label })));
  filter.value = params().get("view") === "search" ? current : "";
}

// ---- search ---------------------------------------------------------------------------------

function queryOptions() {
  const p = params();
  const k = Number(p.get("k") || $("#k").value || 12);
  const label = p.get("label");
  return { k, labels: label ? [label] : undefined };
}

function showHits(result, status) {
  const hits = result.hits;
  $("#hits").replaceChildren(...hits.map((h) => card(h, searchHref(h.id))));
  status.textContent = hits.length ? `${hits.length} nearest, best first` : (result.note || "no images to compare with yet");
}

async function search() {
  const p = params();
  const status = $("#search-status");
  $("#k").value = p.get("k") || $("#k").value;
  const id = p.get("id");
  const upload = p.get("upload");
  if (!id && !upload) {
    $("#query").replaceChildren();
    $("#hits").replaceChildren();
    status.textContent = "Search by an image: drop it on the box, paste it, or pick a file.";
    return;
  }
  const body = { ...queryOptions() };
  let picture;
  if (id) {
    body.id = Number(id);
    picture = `/api/thumbs/${id}?size=256`;
  } else {
    body.upload = upload;
    picture = `/api/uploads/${upload}`;
  }
  $("#query").replaceChildren(el("img", { src: picture, alt: "query image" }),
    el("span", { class: "muted", text: id ? `stored image #${id}` : "uploaded image" }));
  status.textContent = "searching...";
  try {
    showHits(await api("/api/query", { method: "POST", headers: { "content-type": "application/json" },
                                        body: JSON.stringify(body) }), status);
  } catch (e) {
    $("#hits").replaceChildren();
    status.textContent = e.message;
    status.className = "muted error";
    return;
  }
  status.className = "muted";
}

async function searchFile(file) {
  if (!file) return;
  const status = $("#search-status");
  status.className = "muted";
  status.textContent = `uploading ${file.name || "image"}...`;
  const form = new FormData();
  form.append("image", file, file.name || "pasted");
  const { k, labels } = queryOptions();
  form.append("k", String(k));
  if (labels) form.append("labels", JSON.stringify(labels));
  try {
    const result = await api("/api/query", { method: "POST", body: form });
    const q = { view: "search", upload: result.upload, k };
    if (labels) q.label = labels[0];
    history.pushState(null, "", "/?" + new URLSearchParams(q));
    $("#query").replaceChildren(el("img", { src: URL.createObjectURL(file), alt: "query image" }),
      el("span", { class: "muted", text: file.name || "pasted image" }));
    showHits(result, status);
  } catch (e) {
    status.textContent = e.message;
    status.className = "muted error";
  }
}

const drop = $("#search-form");
drop.addEventListener("submit", (ev) => ev.preventDefault());
$("#file").addEventListener("change", (ev) => searchFile(ev.target.files[0]));
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  searchFile(ev.dataTransfer.files[0]);
});
document.addEventListener("paste", (ev) => {
  const item = [...(ev.clipboardData?.items ?? [])].find((i) => i.type.startsWith("image/"));
  if (!item) return;
  if (params().get("view") !== "search") go({ view: "search" });
  searchFile(item.getAsFile());
});
const requery = () => {
  const p = params();
  p.set("k", $("#k").value);
  const label = $("#label-filter").value;
  if (label) p.set("label", label); else p.delete("label");
  if (p.get("id") || p.get("upload")) go(Object.fromEntries(p), true);
  else history.replaceState(null, "", "/?" + p);
};
$("#k").addEventListener("change", requery);
$("#label-filter").addEventListener("change", requery);

// ---- browse ---------------------------------------------------------------------------------

async function browse() {
  const p = params();
  const label = p.get("label");
  const cursor = p.get("cursor");
  $("#browse-title").textContent = label ? `Label ${label}` : "All images";
  const q = new URLSearchParams();
  if (label) q.set("label", label);
  if (cursor) q.set("cursor", cursor);
  const page = await api("/api/browse?" + q);
  $("#browse").replaceChildren(...page.items.map((i) => card(i, searchHref(i.id))));
  const next = $("#browse-next");
  next.hidden = page.next === null;
  if (page.next !== null) {
    const n = { view: "browse", cursor: page.next };
    if (label) n.label = label;
    next.href = "/?" + new URLSearchParams(n);
  }
}

// ---- duplicates -----------------------------------------------------------------------------

async function duplicates() {
  const max = params().get("max");
  if (max) $("#dup-max").value = max;
  const status = $("#dup-status");
  status.textContent = "grouping near-identical images...";
  const q = max ? "?max_distance=" + encodeURIComponent(max) : "";
  try {
    const d = await api("/api/duplicates" + q);
    status.textContent = `${d.groups.length} groups within distance ${d.max_distance}`;
    $("#groups").replaceChildren(...d.groups.map((g) =>
      el("ol", { class: "group grid", "aria-label": `group of ${g.members.length}` },
        ...g.members.map((m) => card(m, searchHref(m.id))))));
  } catch (e) {
    status.textContent = e.message;
  }
}
$("#dup-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const max = $("#dup-max").value;
  go(max ? { view: "duplicates", max } : { view: "duplicates" });
});

// ---- models and training --------------------------------------------------------------------

const pct = (x) => `${(x * 100).toFixed(1)} %`;

async function models() {
  const m = await api("/api/models");
  $("#models tbody").replaceChildren(...m.models.map((v) => {
    const acc = v.metrics ? `${pct(v.metrics.before.accuracy_at_1)} → ${pct(v.metrics.after.accuracy_at_1)}` : "—";
    const use = v.active ? el("span", { text: "active" })
      : el("button", { type: "button", "data-version": v.version, text: `Use v${v.version}` });
    return el("tr", { class: v.active ? "active" : "" },
      el("td", { text: `v${v.version}` }), el("td", { text: `${v.extractor}${v.config ? " " + v.config : ""}` }),
      el("td", { text: `${v.dim}-d ${v.metric}` }), el("td", { text: acc }), el("td", {}, use));
  }));
  const job = params().get("job");
  if (job && follow.job !== job) followJob(job);
}
$("#models").addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-version]");
  if (!b) return;
  b.disabled = true;
  b.textContent = "switching...";
  try {
    await api(`/api/models/${b.dataset.version}/use`, { method: "POST" });
  } catch (e) {
    alert(e.message);
  }
  await Promise.all([models(), loadSummary()]);
});

$("#train-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { extractor: $("#train-extractor").value, epochs: Number($("#train-epochs").value) };
  if ($("#train-config").value) body.config = $("#train-config").value;
  if ($("#train-minutes").value) body.minutes = Number($("#train-minutes").value);
  if ($("#train-activate").value) body.activate = $("#train-activate").value;
  try {
    const { job } = await api("/api/train", { method: "POST", headers: { "content-type": "application/json" },
                                              body: JSON.stringify(body) });
    history.replaceState(null, "", "/?" + new URLSearchParams({ view: "models", job }));
    followJob(job);
  } catch (e) {
    $("#train-live").hidden = false;
    $("#train-status").textContent = e.message;
    $("#train-status").className = "error";
  }
});
$("#train-cancel").addEventListener("click", async () => {
  const job = params().get("job");
  if (job) await api(`/api/train/${job}`, { method: "DELETE" }).catch(() => {});
});

const follow = { job: null, source: null, points: [] };

function followJob(job) {
  if (follow.source) follow.source.close();
  follow.job = String(job);
  follow.points = [];
  drawCurve();
  $("#train-live").hidden = false;
  $("#train-start").disabled = true;
  $("#train-cancel").hidden = false;
  const status = $("#train-status");
  status.className = "";
  delete status.dataset.state;
  status.textContent = `job ${job}: starting...`;
  const source = new EventSource(`/api/train/${job}/events`);
  follow.source = source;
  const on = (name, f) => source.addEventListener(name, (e) => f(JSON.parse(e.data)));
  on("start", (d) => { status.textContent = `job ${job}: training ${d.extractor} for ${d.epochs} epochs...`; });
  on("progress", (d) => {
    $("#train-progress").value = ((d.epoch - 1) * d.steps + d.step) / (d.epochs * d.steps);
    status.textContent = `epoch ${d.epoch}/${d.epochs} · step ${d.step}/${d.steps} · loss ${d.loss.toFixed(4)} · ` +
      `${Math.round(d.pairs_per_second)} pairs/s · ${Math.round(d.images_per_second)} images/s · ETA ${Math.round(d.eta_seconds)} s`;
  });
  on("phase", (d) => {
    status.textContent = d.phase === "embedding"
      ? `embedding every image with the new model: ${d.embedded}/${d.total}`
      : d.phase === "features"
        ? `pretrained features of the training images: ${d.embedded}/${d.total}`
        : "evaluating on the held-out split...";
  });
  on("evaluation", (d) => {
    follow.points.push(d);
    drawCurve();
  });
  const finish = () => {
    source.close();
    follow.source = null;
    $("#train-start").disabled = false;
    $("#train-cancel").hidden = true;
  };
  on("done", (d) => {
    finish();
    $("#train-progress").value = 1;
    status.textContent = `model v${d.version} (${d.extractor} ${d.config}) trained, ${d.decision}; mAP@10 ` +
      `${pct(d.before.map_at_10)} → ${pct(d.after.map_at_10)}` + (d.chosen ? ` (auto: ${d.chosen})` : "");
    status.dataset.state = "done";
    models();
    loadSummary();
  });
  on("failed", (d) => {
    finish();
    status.textContent = d.error;
    status.className = "error";
    status.dataset.state = "failed";
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) finish();
  };
}

/** The held-out accuracy@1 after each epoch (epoch 0: before training). */
function drawCurve() {
  const svg = $("#curve");
  const pts = follow.points;
  const W = 400, H = 200, L = 40, B = 24, T = 10, R = 10;
  const maxEpoch = Math.max(1, ...pts.map((p) => p.epoch));
  const ys = pts.map((p) => p.accuracy_at_1);
  const lo = Math.max(0, Math.floor((Math.min(1, ...ys) - 0.02) * 20) / 20);
  const hi = Math.min(1, Math.ceil((Math.max(0, ...ys) + 0.02) * 20) / 20);
  const x = (e) => L + (W - L - R) * e / maxEpoch;
  const y = (a) => H - B - (H - B - T) * (a - lo) / Math.max(hi - lo, 1e-9);
  const ns = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const parts = [
    s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }),
    s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }),
    s("text", { x: 2, y: y(hi) + 4, "font-size": 10 }, pct(hi)),
    s("text", { x: 2, y: y(lo) + 4, "font-size": 10 }, pct(lo)),
    s("text", { x: W - R, y: H - 6, "font-size": 10, "text-anchor": "end" }, `epoch ${maxEpoch}`),
    s("text", { x: L + 4, y: H - 6, "font-size": 10 }, "held-out accuracy@1 by epoch"),
  ];
  if (pts.length) {
    parts.push(s("polyline", { points: pts.map((p) => `${x(p.epoch)},${y(p.accuracy_at_1)}`).join(" "),
                               fill: "none", stroke: "#2457c5", "stroke-width": 2 }));
    for (const p of pts) parts.push(s("circle", { cx: x(p.epoch), cy: y(p.accuracy_at_1), r: 3, fill: "#2457c5",
                                                  class: "point" }));
  }
  svg.replaceChildren(...parts);
}

// ---- routing --------------------------------------------------------------------------------

const views = { search, browse, duplicates, models };
async function route() {
  const view = views[params().get("view")] ? params().get("view") : "search";
  for (const name of Object.keys(views)) $(`#view-${name}`).hidden = name !== view;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.title = `lookalike · ${view}`;
  loadLabels().catch(() => {});
  try {
    await views[view]();
  } catch (e) {
    const status = $(`#view-${view} [aria-live]`) ?? $("#summary");
    status.textContent = e.message;
  }
}

loadSummary();
route();
