// segsweep dashboard: plain JS over the JSON API. Every name from the store is set with
// textContent (never innerHTML): run names and tags are data, not markup.
"use strict";

const $ = (id) => document.getElementById(id);
let mlflowUrl = "";

async function api(path) {
  const res = await fetch(path);
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function showError(err) {
  $("error").hidden = false;
  $("error").textContent = String(err.message || err);
}

function cell(tr, text, tag = "td") {
  const el = document.createElement(tag);
  el.textContent = text;
  tr.appendChild(el);
  return el;
}

function fillTable(table, header, rows) {
  table.replaceChildren();
  const head = document.createElement("tr");
  header.forEach((h) => cell(head, h, "th"));
  table.appendChild(head);
  rows.forEach((values) => {
    const tr = document.createElement("tr");
    values.forEach((v) => cell(tr, v));
    table.appendChild(tr);
  });
}

const pct = (v) => (v === null || v === undefined ? "n/a" : (100 * v).toFixed(1));
const ratioLabel = (r) => {
  const inv = 1 / Number(r);
  return Math.abs(inv - Math.round(inv)) < 1e-6 && inv > 1 ? `1/${Math.round(inv)}` : String(r);
};

// Links into MLflow's Model training view, made by the server (mlflow_view.py); none while
// the UI's address is unset (a local store: `segsweep dashboard --mlflow-url URL`).
function mlflowLink(href) {
  if (!href) return null;
  const a = document.createElement("a");
  a.href = href;
  a.textContent = "MLflow";
  a.target = "_blank";
  a.rel = "noopener";
  return a;
}

// An experiment may hold several sweeps (specs sharing it, or one started anew): all of them
// count unless one is chosen. The choice is offered only where there is one to make.
function fillSweeps(sweeps, chosen) {
  const select = $("sweep");
  select.replaceChildren();
  const all = document.createElement("option");
  all.value = "";
  all.textContent = `all ${sweeps.length} sweeps`;
  select.appendChild(all);
  sweeps.forEach((s) => {
    const opt = document.createElement("option");
    opt.value = s.id;
    opt.textContent = `${s.name}, started ${s.started} (${s.id.slice(0, 8)})`;
    select.appendChild(opt);
  });
  select.value = chosen;
  $("sweep-label").hidden = sweeps.length < 2;
}

async function loadExperiment(sameSweep = false) {
  const name = $("experiment").value;
  const value = $("value").value;
  if (!name) return;
  $("error").hidden = true;
  $("run-section").hidden = true;
  const sweep = sameSweep === true ? $("sweep").value : "";
  const q = `experiment=${encodeURIComponent(name)}&value=${value}` +
    (sweep ? `&sweep=${encodeURIComponent(sweep)}` : "");
  try {
    const curve = await api(`/api/curve?${q}`);
    $("rule").textContent = [`${curve.rule_text}; ${curve.n_runs} runs`, ...curve.notes].join(". Note: ");
    $("curve").src = `/api/curve.png?${q}&t=${Date.now()}`;
    const ratios = [...new Set(curve.summary.map((s) => s.label_ratio))].sort((a, b) => a - b);
    const methods = [...new Set(curve.summary.map((s) => s.method))];
    methods.sort((a, b) => (a === "supervised" ? -1 : b === "supervised" ? 1 : a.localeCompare(b)));
    const rows = methods.map((m) => [m, ...ratios.map((r) => {
      const s = curve.summary.find((x) => x.method === m && x.label_ratio === r);
      if (!s) return "-";
      const pub = s.published === null ? "" : ` [published ${pct(s.published)}, ${s.published_backbone}]`;
      return `${pct(s.mean)} ± ${pct(s.std)} (n=${s.n})${pub}`;
    })]);
    fillTable($("table"), ["method", ...ratios.map(ratioLabel)], rows);
    fillTable($("differences"), ["method", "label ratio", "difference", "95% CI", "p", "pairing"],
      curve.differences.map((d) => [d.method, ratioLabel(d.label_ratio), `${pct(d.mean_diff)}`,
        d.ci_low === null ? "n/a" : `[${pct(d.ci_low)}, ${pct(d.ci_high)}]`,
        d.p_value === null ? "n/a" : d.p_value.toFixed(3), `${d.paired ? "paired" : "unpaired"}, n=${d.n}`]));
  } catch (err) {
    $("curve").removeAttribute("src");
    fillTable($("table"), [], []);
    fillTable($("differences"), [], []);
    $("rule").textContent = String(err.message || err);
  }
  let runs = { runs: [], sweeps: [] };
  try {
    runs = await api(`/api/runs?${q}`);
  } catch (err) { // e.g. the store went away: said, and nothing of the last experiment stays
    showError(err);
  }
  fillSweeps(runs.sweeps, sweep);
  document.body.dataset.shown = q; // what the page now shows (read by the browser test)
  const table = $("runs");
  table.replaceChildren();
  const head = document.createElement("tr");
  ["run", "method", "ratio", "seed", "phase", "status", "val/mIoU last", "tune/mIoU best", "counted", ""].forEach((h) => cell(head, h, "th"));
  table.appendChild(head);
  runs.runs.forEach((r) => {
    const tr = document.createElement("tr");
    tr.className = "clickable";
    cell(tr, r.name);
    cell(tr, r.method);
    cell(tr, r.label_ratio ? ratioLabel(r.label_ratio) : "");
    cell(tr, r.seed);
    cell(tr, r.phase);
    cell(tr, r.segsweep_status || r.status);
    cell(tr, pct(r.val_mIoU_last));
    cell(tr, pct(r.tune_mIoU_best));
    const mark = cell(tr, r.counted ? "\u2713" : "");
    if (r.counted) { tr.classList.add("counted"); mark.title = "the run the curve counts for its cell and seed"; }
    const links = cell(tr, "");
    const link = mlflowLink(r.mlflow_link);
    if (link) links.appendChild(link);
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") loadRun(r.id); });
    table.appendChild(tr);
  });
}

function lineChart(title, points) {
  const w = 300, h = 160, pad = 28;
  const box = document.createElement("div");
  box.className = "chart";
  const label = document.createElement("div");
  label.className = "title";
  label.textContent = title;
  box.appendChild(label);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - 2 * pad);
  const sy = (y) => h - pad - (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0)) * (h - 2 * pad);
  const path = document.createElementNS(ns, "polyline");
  path.setAttribute("points", points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "));
  path.setAttribute("fill", "none");
  path.setAttribute("stroke", "#1f77b4");
  path.setAttribute("stroke-width", "1.5");
  svg.appendChild(path);
  [[y1, pad], [y0, h - pad]].forEach(([v, y]) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 2);
    t.setAttribute("y", y);
    t.setAttribute("font-size", "9");
    t.textContent = v.toPrecision(3);
    svg.appendChild(t);
  });
  const t = document.createElementNS(ns, "text");
  t.setAttribute("x", w - pad);
  t.setAttribute("y", h - 4);
  t.setAttribute("font-size", "9");
  t.setAttribute("text-anchor", "end");
  t.textContent = `step ${x1}`;
  svg.appendChild(t);
  box.appendChild(svg);
  return box;
}

async function loadRun(id) {
  const run = await api(`/api/run?id=${encodeURIComponent(id)}`);
  $("run-section").hidden = false;
  $("run-title").textContent = run.name || run.id;
  const p = run.params;
  $("run-meta").textContent = `${p.method || ""} · label ratio ${p.label_ratio || ""} · seed ${p.seed || ""} · ${run.status} · ${run.id}`;
  const link = mlflowLink(run.mlflow_link);
  if (link) { $("run-meta").append(" · "); $("run-meta").appendChild(link); }
  const charts = $("charts");
  charts.replaceChildren();
  Object.entries(run.history).forEach(([key, pts]) => {
    if (pts.length > 0) charts.appendChild(lineChart(key, pts));
  });
  const panels = run.images.filter((i) => i.key.includes("panels"));
  // A method that makes no pseudo masks logs no panels: no empty panel is shown for it.
  $("panels-section").hidden = panels.length === 0;
  const slider = $("panel-step");
  slider.max = Math.max(0, panels.length - 1);
  slider.value = slider.max;
  const show = () => {
    const item = panels[Number(slider.value)];
    if (!item) { $("panel").removeAttribute("src"); $("panel-step-label").textContent = "no panels"; return; }
    $("panel").src = item.url;
    $("panel-step-label").textContent = `step ${item.step}`;
  };
  slider.oninput = show;
  show();
  $("run-section").scrollIntoView();
}

async function init() {
  try {
    const info = await api("/api/experiments");
    mlflowUrl = info.mlflow_url;
    $("store").textContent = `store: ${info.store} · MLflow UI: ${mlflowUrl || "unset (segsweep dashboard --mlflow-url URL)"}`;
    const select = $("experiment");
    info.experiments.filter((e) => e.name !== "Default").forEach((e) => {
      const opt = document.createElement("option");
      opt.value = e.name;
      opt.textContent = e.name;
      select.appendChild(opt);
    });
    const wanted = new URLSearchParams(location.search).get("experiment");
    if (wanted) select.value = wanted;
    select.onchange = () => loadExperiment(false);
    $("value").onchange = () => loadExperiment(true);
    $("sweep").onchange = () => loadExperiment(true);
    await loadExperiment();
    document.body.dataset.ready = "1";
  } catch (err) {
    showError(err);
    document.body.dataset.ready = "error";
  }
}

init();
