// gpufleet console: a client of the server's API (the same routes the CLI uses). Every value shown
// comes from the API; user text is only ever set with textContent (never as HTML).
"use strict";

const TOKEN_KEY = "gpufleet.token";
const REASON_KEY = "gpufleet.loginReason";
const POLL_MS = 3000;
const STOPPABLE = new Set(["pending", "starting", "running"]);

let timers = [];        // the current page's polling timers
let aborts = [];        // the current page's open streams (logs -f)
let features = { gpus: undefined, metrics: undefined };  // routes the server has (false after a 404)

// ------------------------------------------------------------------ DOM helpers
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") e.textContent = String(v);
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = String(v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c) e.append(c);
  return e;
}

function say(message, isError) {
  const s = document.getElementById("status");
  s.textContent = message || "";
  s.classList.toggle("error", !!isError);
}

function age(ts) {
  if (!ts) return "-";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "-";
}

function gpuLabel(g) {
  return `${g.index}:${g.model || g.vendor || "gpu"}`;
}

// a stable colour per run: a hue from its name, light enough for dark text (contrast > 7:1)
function runColour(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hsl(${h % 360}, 70%, 84%)`;
}

// a form control with its label (the label holds only its text: its name for assistive technology)
function field(label, control) {
  return el("div", { class: "field" }, el("label", { for: control.id, text: label }), control);
}

function statusBadge(status) {
  return el("span", { class: `badge s-${status}`, text: status });
}

// ------------------------------------------------------------------ the API
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, options = {}) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${token()}`, ...(options.headers || {}) };
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) {
    const detail = await detailOf(r);
    logout(`The server refused the token: ${detail}`);
    throw new ApiError(401, detail);
  }
  if (!r.ok) throw new ApiError(r.status, await detailOf(r));
  return options.raw ? r : r.json();
}

async function detailOf(r) {
  try {
    const body = await r.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return `HTTP ${r.status}`;
  }
}

// a route another part of the server may not have yet: null when it answers 404
async function optional(path, feature) {
  if (features[feature] === false) return null;
  try {
    const body = await api(path);
    features[feature] = true;
    return body;
  } catch (e) {
    if (e.status === 404 && features[feature] !== true) { features[feature] = false; return null; }
    if (e.status === 404) return null;
    throw e;
  }
}

function logout(reason) {
  const had = token() !== null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (!had) return;  // another request's 401 came first: its reason shows
  if (reason) sessionStorage.setItem(REASON_KEY, reason);
  if (location.hash !== "#/login") location.hash = "#/login";
  else route();
}

// ------------------------------------------------------------------ pages
function clearPage() {
  timers.forEach(clearInterval);
  timers = [];
  aborts.forEach((a) => a.abort());
  aborts = [];
}

function poll(fn, ms) {
  const tick = async () => {
    try {
      await fn();
      say(`Updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      if (e.status !== 401) say(e.message, true);
    }
  };
  tick();
  timers.push(setInterval(tick, ms || POLL_MS));
}

function setMain(title, ...children) {
  const main = document.getElementById("main");
  main.replaceChildren(el("h1", { text: title }), ...children);
  document.title = `${title} · gpufleet`;
  return main;
}

function loginPage() {
  document.getElementById("top").hidden = true;
  const reason = sessionStorage.getItem(REASON_KEY);
  sessionStorage.removeItem(REASON_KEY);
  const input = el("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true,
                              "aria-describedby": "token-help" });
  const problem = el("p", { id: "login-error", class: "error", role: "alert", text: reason || "" });
  const form = el("form", { class: "login", "aria-labelledby": "login-title" },
    el("h1", { id: "login-title", text: "Log in to gpufleet" }),
    el("label", { for: "token", text: "API token" }), input,
    el("p", { id: "token-help", class: "muted",
              text: "Your token from gpufleet user add, or the server's token file for admin. It is kept in this " +
                    "tab only (sessionStorage) and sent to this server's API." }),
    problem,
    el("button", { type: "submit", text: "Log in" }));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = input.value.trim();
    const r = await fetch("/api/me", { headers: { Accept: "application/json", Authorization: `Bearer ${value}` } });
    if (!r.ok) {
      problem.textContent = `Not logged in: ${await detailOf(r)}`;
      input.focus();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    location.hash = "#/fleets";
  });
  document.getElementById("main").replaceChildren(form);
  document.title = "Log in · gpufleet";
  input.focus();
}

async function showWho() {
  const me = await api("/api/me");
  const projects = me.projects.map((p) => `${p.name} (${p.role})`).join(", ") || "no project";
  document.getElementById("who").textContent = `${me.name} · ${me.role} · ${projects}`;
}

// -------------------------------------------- fleets: each host a row of its blocks by NUMA node
function fleetsPage() {
  const box = el("div", { id: "fleets" });
  const note = el("p", { class: "muted", id: "fleets-note" });
  setMain("Fleets", note, box);
  poll(async () => {
    const [fleets, runs, gpus] = await Promise.all([api("/api/fleets"), api("/api/runs"), optional("/api/gpus", "gpus")]);
    note.textContent = gpus ? "" : "Per-GPU metrics are not available from this server: blocks are shown from the " +
                                   "fleet and run lists.";
    box.replaceChildren(...(fleets.length ? fleets.map((f) => fleetView(f, runs, gpus)) :
      [el("p", { text: "No fleets. Create one with: gpufleet apply -f FLEET.yml" })]));
  });
}

// the run holding each block of each host: "fleet/num/block" -> run
function holders(runs) {
  const held = new Map();
  for (const r of runs) {
    if (!["starting", "running", "stopping"].includes(r.status)) continue;
    const nodes = r.nodes && r.nodes.length ? r.nodes : [{ instance_num: r.instance_num, blocks: r.blocks, gpus: r.gpus }];
    for (const n of nodes) for (const b of n.blocks || []) held.set(`${r.fleet}/${n.instance_num}/${b}`, { run: r, node: n });
  }
  return held;
}

function fleetView(fleet, runs, gpus) {
  const held = holders(runs);
  const section = el("section", { class: "fleet", "aria-label": `Fleet ${fleet.name}` },
    el("h2", {}, `${fleet.name} `, el("span", { class: "muted", text: `project ${fleet.project}` })));
  if (!fleet.instances.length) section.append(el("p", { class: "muted", text: "no instances" }));
  for (const inst of fleet.instances) {
    const rows = gpus ? gpus.filter((g) => g.fleet === fleet.name && g.host === inst.alias) : null;
    section.append(hostView(fleet, inst, held, rows));
  }
  return section;
}

function hostView(fleet, inst, held, rows) {
  const down = inst.status !== "ready";
  const info = el("div", { class: "hostinfo" },
    el("h3", { text: `${inst.num} ${inst.alias}` }),
    el("div", { class: "muted", text: `${inst.hostname}:${inst.port}` }),
    el("div", {}, statusBadge(inst.status), " ", `${inst.blocks_busy}/${inst.blocks_total} blocks busy`),
    inst.reason ? el("div", { class: down ? "flag" : "muted", text: inst.reason }) : null,
    el("div", { class: "muted", text: inst.resources || "" }));
  const groups = new Map();  // NUMA label -> block elements
  const put = (numa, block) => {
    if (!groups.has(numa)) groups.set(numa, []);
    groups.get(numa).push(block);
  };
  if (rows && rows.length) {
    const byBlock = new Map();
    for (const g of rows) {
      const key = g.block === null || g.block === undefined ? "none" : g.block;
      if (!byBlock.has(key)) byBlock.set(key, []);
      byBlock.get(key).push(g);
    }
    for (const [b, members] of [...byBlock.entries()].sort((x, y) => (x[0] === "none") - (y[0] === "none") || x[0] - y[0])) {
      const numas = new Set(members.map((g) => g.numa_node));
      const numa = numas.size === 1 ? [...numas][0] : "mixed";
      const h = held.get(`${fleet.name}/${inst.num}/${b}`);
      put(numa, blockView(b, h ? h.run : null, members.map(gpuView), members));
    }
  } else {
    for (let b = 0; b < inst.blocks_total; b++) {
      const h = held.get(`${fleet.name}/${inst.num}/${b}`);
      const gl = h ? (h.node.gpus || []).map((g) => el("div", { class: "gpu", text: `GPU ${gpuLabel(g)}` })) : [];
      put(null, blockView(b, h ? h.run : null, gl, null));
    }
  }
  const numas = [...groups.entries()].sort((x, y) => String(x[0]).localeCompare(String(y[0]), undefined, { numeric: true }))
    .map(([numa, blocks]) => el("div", { class: "numa", role: "group",
                                         "aria-label": numa === null ? "NUMA node unknown" : `NUMA node ${numa}` },
      el("span", { class: "label", text: numa === null ? "NUMA: unknown" : numa === "mixed" ? "NUMA: mixed" : `NUMA ${numa}` }),
      el("div", { class: "blocks" }, blocks)));
  return el("div", { class: `host${down ? " down" : ""}`, "data-host": inst.alias, "data-fleet": fleet.name,
                     "data-status": inst.status },
    info, el("div", { class: "numas" }, numas.length ? numas : el("span", { class: "muted", text: "no blocks" })));
}

// ``gpuRows``: the block's rows of /api/gpus (null without it); a run of a project the caller does
// not see is named by neither (the API leaves its name out): the block shows as busy
function blockView(index, run, gpuElements, gpuRows) {
  const named = (gpuRows || []).find((g) => g.run);
  const name = named ? named.run : run ? run.name : null;
  const user = named ? named.user : run ? run.user : null;
  const hidden = !name && (gpuRows || []).some((g) => g.status === "busy");
  const b = el("div", { class: "block", "data-block": index, "data-run": name || "" },
    el("strong", { text: index === "none" ? "no block" : `block ${index}` }), " ",
    name ? el("span", { class: "who" }, el("a", { href: `#/runs/${encodeURIComponent(name)}`, text: name }),
                                         user ? ` · ${user}` : "")
         : el("span", { class: "who muted", text: hidden ? "busy (a run of another project)" : "free" }),
    gpuElements);
  if (name) b.style.background = runColour(name);
  return b;
}

function gpuView(g) {
  const util = typeof g.utilization === "number" ? Math.max(0, Math.min(100, g.utilization)) : null;
  const mem = g.memory_used_mib !== null && g.memory_used_mib !== undefined && g.memory_total_mib
    ? ` · ${g.memory_used_mib}/${g.memory_total_mib} MiB` : "";
  const bar = el("div", { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
                          "aria-valuenow": util === null ? undefined : util,
                          "aria-label": `GPU ${g.index} utilization` }, el("span"));
  bar.firstChild.style.width = `${util || 0}%`;
  const flagged = ["outside", "unhealthy", "unreachable"].includes(g.status);
  return el("div", { class: `gpu ${g.status || ""}`, "data-gpu": g.index, "data-gpu-status": g.status || "" },
    el("div", { text: `GPU ${gpuLabel(g)} · ${util === null ? "n/a" : `${Math.round(util)}%`}${mem}` }),
    bar,
    flagged ? el("div", { class: "flag", text: `${g.status}${g.reason ? `: ${g.reason}` : ""}` }) : null);
}

// -------------------------------------------- runs and queue
function runsPage() {
  const all = el("input", { type: "checkbox", id: "show-all" });
  const body = el("tbody");
  const table = el("table", { id: "runs" },
    el("caption", { text: "Waiting runs show their place in the queue and why they wait." }),
    el("thead", {}, el("tr", {}, ["Name", "Status", "Place", "Why / message", "User", "Project", "Type", "Fleet",
                                   "Host", "GPUs", "Age", "Actions"].map((h) => el("th", { scope: "col", text: h })))),
    body);
  setMain("Runs and queue",
    el("div", { class: "filters" }, el("label", { for: "show-all", class: "inline" }, all, " Show finished runs")),
    el("div", { class: "scroll" }, table));
  const refresh = async () => {
    const runs = await api(`/api/runs${all.checked ? "?all=true" : ""}`);
    body.replaceChildren(...(runs.length ? runs.map(runRow) :
      [el("tr", {}, el("td", { colspan: 12, text: all.checked ? "No runs." : "No active runs." }))]));
  };
  all.addEventListener("change", () => refresh().catch((e) => say(e.message, true)));
  poll(refresh);
}

function runGpus(r) {
  if (r.nodes && r.nodes.length > 1) return r.nodes.map((n) => `${n.alias}: ${n.gpus.map(gpuLabel).join(", ")}`).join("; ");
  return r.gpus.map(gpuLabel).join(", ") || "-";
}

function runRow(r) {
  const stop = STOPPABLE.has(r.status)
    ? el("button", { type: "button", class: "danger", "data-stop": r.name, "aria-label": `Stop run ${r.name}`,
                     text: "Stop", onclick: (ev) => stopRun(r.name, ev.currentTarget) })
    : null;
  const hosts = r.nodes && r.nodes.length > 1 ? r.nodes.map((n) => n.alias).join(", ") : r.alias || "-";
  return el("tr", { "data-run": r.name, "data-status": r.status },
    el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(r.name)}`, text: r.name })),
    el("td", {}, statusBadge(r.status), r.exit_code ? ` (${r.exit_code})` : ""),
    el("td", { class: "position", text: r.status === "pending" && r.position ? `#${r.position}` : "" }),
    el("td", { class: "msg", text: r.message || "" }),
    el("td", { text: r.user || "-" }), el("td", { text: r.project }),
    el("td", { text: r.replica_of ? `replica of ${r.replica_of}` : r.type }),
    el("td", { text: r.fleet || "-" }), el("td", { text: hosts }), el("td", { text: runGpus(r) }),
    el("td", { text: age(r.created_at), title: when(r.created_at) }),
    el("td", {}, stop));
}

async function stopRun(name, button) {
  if (!window.confirm(`Stop run ${name}?`)) return;
  button.disabled = true;
  try {
    const r = await api(`/api/runs/${encodeURIComponent(name)}/stop`, { method: "POST" });
    say(`Run ${name}: ${r.status}`);
  } catch (e) {
    if (e.status !== 401) say(`Stopping ${name}: ${e.message}`, true);
    button.disabled = false;
  }
}

// -------------------------------------------- a run: plan, logs, metrics, events
function runPage(name) {
  const summary = el("dl", { class: "kv", id: "run-summary" });
  const spec = el("pre", { id: "run-spec" });
  const logs = el("pre", { id: "run-logs", "aria-live": "off", tabindex: 0, "aria-label": "Logs" });
  const charts = el("div", { class: "charts", id: "run-charts" });
  const events = el("tbody");
  const actions = el("div", { class: "filters" });
  setMain(`Run ${name}`, actions, summary,
    el("h2", { text: "Configuration" }), spec,
    el("h2", { text: "GPUs over its life" }), charts,
    el("h2", { text: "Logs" }), logs,
    el("h2", { text: "Events" }),
    el("div", { class: "scroll" }, el("table", { id: "run-events" },
      el("thead", {}, el("tr", {}, ["Time", "Kind", "Who", "Message"].map((h) => el("th", { scope: "col", text: h })))),
      events)));
  let logging = false;
  poll(async () => {
    const [r, evs, metrics] = await Promise.all([
      api(`/api/runs/${encodeURIComponent(name)}`),
      api(`/api/events?run=${encodeURIComponent(name)}`),
      optional(`/api/runs/${encodeURIComponent(name)}/metrics`, "metrics")]);
    const rows = [["Status", r.status + (r.exit_code ? ` (exit ${r.exit_code})` : "")],
      ["Place in queue", r.status === "pending" && r.position ? `#${r.position}` : ""],
      ["Message", r.message], ["User", r.user], ["Project", r.project], ["Type", r.type],
      ["Fleet", r.fleet], ["Host", r.nodes && r.nodes.length > 1 ? r.nodes.map((n) => n.alias).join(", ") : r.alias],
      ["GPUs", runGpus(r)], ["Blocks", (r.blocks || []).join(", ")], ["Priority", r.priority],
      ["Submitted", when(r.created_at)], ["Started", when(r.started_at)]];
    summary.replaceChildren(...rows.filter(([, v]) => v !== "" && v !== null && v !== undefined)
      .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { "data-field": k.toLowerCase(), text: v })]));
    spec.textContent = specText(r.spec);
    actions.replaceChildren(STOPPABLE.has(r.status)
      ? el("button", { type: "button", class: "danger", "data-stop": r.name, text: "Stop",
                       onclick: (ev) => stopRun(r.name, ev.currentTarget) }) : el("span"));
    events.replaceChildren(...evs.slice().reverse().map((e) => el("tr", {}, el("td", { text: when(e.ts) }),
      el("td", { text: e.kind }), el("td", { text: e.actor || "" }), el("td", { class: "msg", text: e.message }))));
    drawCharts(charts, metrics);
    if (!logging && r.status !== "pending") {
      logging = true;
      followLogs(name, logs, STOPPABLE.has(r.status) || r.status === "stopping");
    }
  });
}

function specText(spec) {
  // the run's configuration as submitted, in the order a reader looks for
  const first = ["type", "name", "image", "resources", "commands", "env", "ports", "max_duration", "priority"];
  const keys = [...first.filter((k) => k in spec), ...Object.keys(spec).filter((k) => !first.includes(k)).sort()];
  const out = {};
  for (const k of keys) out[k] = spec[k];
  return JSON.stringify(pruned(out), null, 2) || "{}";
}

// without the fields left unset (null, empty): what the user wrote or the server filled in
function pruned(v) {
  if (Array.isArray(v)) return v.length ? v.map(pruned) : undefined;
  if (v && typeof v === "object") {
    const o = {};
    for (const [k, x] of Object.entries(v)) {
      const p = pruned(x);
      if (p !== undefined) o[k] = p;
    }
    return Object.keys(o).length ? o : undefined;
  }
  return v === null ? undefined : v;
}

async function followLogs(name, pre, follow) {
  const ctl = new AbortController();
  aborts.push(ctl);
  try {
    const r = await api(`/api/runs/${encodeURIComponent(name)}/logs?follow=${follow}`, { raw: true, signal: ctl.signal,
                                                                                          headers: { Accept: "text/plain" } });
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    pre.textContent = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(document.createTextNode(decoder.decode(value, { stream: true })));
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  } catch (e) {
    if (e.name !== "AbortError" && e.status !== 401) pre.append(document.createTextNode(`\n[logs: ${e.message}]`));
  }
}

function drawCharts(box, metrics) {
  if (!metrics) {
    box.replaceChildren(el("p", { class: "muted", text: "GPU metrics are not available from this server." }));
    return;
  }
  if (!metrics.series || !metrics.series.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No samples yet." }));
    return;
  }
  const totals = new Map((metrics.latest || []).map((l) => [`${l.host}/${l.index}`, l.memory_total_mib]));
  const models = new Map((metrics.gpus || []).map((g) => [`${g.host}/${g.index}`, g.model]));
  box.replaceChildren(...metrics.series.map((s) => chart(s, totals.get(`${s.host}/${s.index}`),
                                                          models.get(`${s.host}/${s.index}`))));
}

function chart(series, totalMib, model) {
  const W = 420, H = 160, L = 34, R = 40, T = 10, B = 22;
  const pts = series.points || [];
  const t0 = pts.length ? pts[0][0] : 0, t1 = pts.length ? pts[pts.length - 1][0] : 1;
  const memMax = totalMib || Math.max(1, ...pts.map((p) => p[2] || 0));
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0) * (W - L - R);
  const y = (v, max) => T + (1 - Math.max(0, Math.min(1, (v || 0) / max))) * (H - T - B);
  const line = (i, max) => pts.filter((p) => p[i] !== null && p[i] !== undefined)
    .map((p, k) => `${k ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[i], max).toFixed(1)}`).join(" ");
  const title = `${series.host} GPU ${series.index}${model ? ` (${model})` : ""}`;
  const last = pts.length ? pts[pts.length - 1] : null;
  const desc = last ? `Utilization ${last[1] === null ? "n/a" : `${Math.round(last[1])}%`}, memory ` +
                      `${last[2] === null ? "n/a" : `${last[2]} MiB`} of ${totalMib || "?"} MiB, at the last sample`
                    : "no samples";
  return el("figure", { class: "chart", "data-gpu": `${series.host}/${series.index}` },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${desc}` },
      svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      svg("text", { x: 2, y: T + 8, text: "100%" }), svg("text", { x: 2, y: H - B, text: "0%" }),
      svg("text", { x: W - R + 2, y: T + 8, text: `${Math.round(memMax / 1024)}G` }),
      svg("text", { x: L, y: H - 6, text: when(t0) }),
      svg("text", { x: W - R, y: H - 6, "text-anchor": "end", text: new Date(t1 * 1000).toLocaleTimeString() }),
      svg("path", { class: "util", d: line(1, 100) }),
      svg("path", { class: "mem", d: line(2, memMax) })),
    el("figcaption", { class: "legend", text: `${title} — solid: utilization %, dashed: memory. ${desc}.` }));
}

// -------------------------------------------- events
function eventsPage() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const kind = el("select", { id: "ev-kind" }, el("option", { value: "", text: "any" }));
  const run = el("input", { id: "ev-run", type: "search", value: q.get("run") || "" });
  const fleet = el("input", { id: "ev-fleet", type: "search", value: q.get("fleet") || "" });
  const text = el("input", { id: "ev-text", type: "search", value: q.get("text") || "" });
  const body = el("tbody");
  const count = el("caption");
  setMain("Events",
    el("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      field("Kind", kind), field("Run", run), field("Fleet", fleet), field("Text", text)),
    el("div", { class: "scroll" }, el("table", { id: "events" }, count,
      el("thead", {}, el("tr", {}, ["Time", "Kind", "Run", "Fleet", "Host", "Project", "Who", "Message"]
        .map((h) => el("th", { scope: "col", text: h })))), body)));
  let all = [];
  const render = () => {
    const k = kind.value, r = run.value.trim(), f = fleet.value.trim(), t = text.value.trim().toLowerCase();
    const shown = all.filter((e) => (!k || e.kind === k) && (!r || (e.run || "").includes(r)) &&
      (!f || (e.fleet || "").includes(f)) && (!t || e.message.toLowerCase().includes(t))).reverse();
    count.textContent = `${shown.length} of ${all.length} events (newest first)`;
    body.replaceChildren(...shown.map((e) => el("tr", { "data-event": e.id, "data-kind": e.kind },
      el("td", { text: when(e.ts) }), el("td", { text: e.kind }), el("td", {}, e.run ?
        el("a", { href: `#/runs/${encodeURIComponent(e.run)}`, text: e.run }) : ""),
      el("td", { text: e.fleet || "" }), el("td", { text: e.host || "" }), el("td", { text: e.project || "" }),
      el("td", { text: e.actor || "" }), el("td", { class: "msg", text: e.message }))));
  };
  for (const input of [kind, run, fleet, text]) input.addEventListener("input", render);
  poll(async () => {
    all = await api("/api/events?limit=2000");
    const kinds = [...new Set(all.map((e) => e.kind))].sort();
    const chosen = kind.value;
    kind.replaceChildren(el("option", { value: "", text: "any" }), ...kinds.map((k) => el("option", { value: k, text: k })));
    kind.value = kinds.includes(chosen) ? chosen : "";
    render();
  }, 5000);
}

// ------------------------------------------------------------------ routing
async function route() {
  clearPage();
  const hash = location.hash || "#/fleets";
  const path = hash.slice(1).split("?")[0];
  if (!token() || path === "/login") {
    if (token() && path === "/login") { location.hash = "#/fleets"; return; }
    if (path !== "/login") { location.hash = "#/login"; return; }
    loginPage();
    return;
  }
  document.getElementById("top").hidden = false;
  const page = path.split("/")[1] || "fleets";
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  showWho().catch((e) => { if (e.status !== 401) say(e.message, true); });
  const m = path.match(/^\/runs\/(.+)$/);
  if (m) runPage(decodeURIComponent(m[1]));
  else if (page === "runs") runsPage();
  else if (page === "events") eventsPage();
  else fleetsPage();
  document.getElementById("main").focus({ preventScroll: true });
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", () => logout("Logged out."));
  window.addEventListener("hashchange", route);
  route();
});
