// Graft dashboard: plain JavaScript, no build step. Talks only to the public
// API; stays current through GET /api/v1/events/stream (read with fetch so
// that both a session cookie and a bearer token work). Everything a guest
// or the node wrote reaches the page through textContent, never as HTML.
"use strict";

const $ = (s) => document.querySelector(s);
const $$ = (s) => Array.from(document.querySelectorAll(s));
const S = {
  token: null, role: null, sandboxes: [], current: null, procs: [], sort: ["pid", 1],
  page: 0, modules: [], versions: [], lastSeq: null, events: [], canary: null,
  series: { reload: [], procs: [], mem: [] }, started: Date.now(), stream: null,
};
const PAGE = 100, MAX_EVENTS = 500, MAX_POINTS = 120;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids) if (k != null) e.append(k instanceof Node ? k : String(k));
  return e;
}

async function api(method, path, body) {
  const headers = {};
  if (S.token) headers.Authorization = "Bearer " + S.token;
  // The node refuses a mutating request that is not JSON (a form post from
  // another site cannot be), also when it has no body: a DELETE too.
  if (body !== undefined || method !== "GET") headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  return { status: r.status, ok: r.ok, data };
}

function bytes(n) {
  if (n == null) return "";
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

// ---- sign-in ----
async function start() {
  const probe = await api("GET", "/api/v1/sandboxes");
  if (probe.status === 401 || probe.status === 403) return showSignin();
  await enter();
}

function showSignin(message) {
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signout").hidden = true;
  $("#signin-error").textContent = message || "";
  $("#token").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  const r = await api("POST", "/api/v1/session", { token });
  if (r.status === 204 || r.ok) {
    S.token = null; // the session cookie carries it from now on
  } else if (r.status === 404 || r.status === 405) {
    S.token = token; // no session endpoint on this node: hold it in memory
  } else {
    return showSignin((r.data && r.data.error && r.data.error.message) || "sign-in refused (" + r.status + ")");
  }
  const check = await api("GET", "/api/v1/sandboxes");
  if (!check.ok) { S.token = null; return showSignin("the token was not accepted (" + check.status + ")"); }
  $("#token").value = "";
  await enter();
}

// Signing out starts the page afresh: the next sign-in (perhaps with a
// lesser token) gets a page built for its role, not one a previous role
// left behind.
async function signOut() {
  clearInterval(sampleTimer);
  clearTimeout(refreshTimer);
  const r = await api("DELETE", "/api/v1/session");
  if (!r.ok) { $("#who").textContent = "sign-out failed: " + errText(r); return; }
  if (S.stream) S.stream.abort();
  S.token = null;
  location.reload();
}

const RANK = { viewer: 0, operator: 1, admin: 2 };
async function enter() {
  const s = await api("GET", "/api/v1/session");
  S.role = s.ok && s.data ? s.data.role : "admin";
  $("#who").textContent = s.ok && s.data ? "signed in as " + s.data.role : "open node (no sign-in required)";
  $("#signout").hidden = !s.ok;
  // What the role may not use is removed, not just hidden: a viewer's page
  // holds no state inspector and no controls that could only be refused.
  const rank = RANK[S.role] ?? 0;
  for (const e of $$("[data-admin]")) if (rank < RANK.admin) e.remove();
  for (const e of $$("[data-operator]")) if (rank < RANK.operator) e.remove();
  $("#signin").hidden = true;
  $("#app").hidden = false;
  await refreshAll();
  follow();
  sampleTimer = setInterval(sample, 5000);
}
let sampleTimer = null;
const canWrite = () => (RANK[S.role] ?? 0) >= RANK.operator;

// ---- tabs ----
function showTab(name) {
  for (const b of $$(".tabs button")) b.setAttribute("aria-pressed", String(b.dataset.tab === name));
  for (const p of $$("[data-panel]")) p.hidden = p.dataset.panel !== name;
  if (name === "audit") loadAudit();
}

// ---- overview and sandboxes ----
let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshAll, 150);
}

async function refreshAll() {
  const r = await api("GET", "/api/v1/sandboxes");
  if (r.status === 401) return showSignin("session ended; sign in again");
  const list = Array.isArray(r.data) ? r.data : (r.data && r.data.sandboxes) || [];
  const infos = await Promise.all(list.map(async (s) => {
    const id = typeof s === "string" ? s : s.id;
    const i = await api("GET", "/api/v1/sandboxes/" + encodeURIComponent(id));
    return i.ok ? i.data : { id, status: "unknown" };
  }));
  S.sandboxes = infos;
  renderSandboxes();
  renderOverview();
  const pick = $("#sb-pick");
  const ids = infos.map((i) => i.id);
  if (pick.options.length !== ids.length || ids.some((id, n) => pick.options[n].value !== id)) {
    pick.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  }
  if (!S.current || !ids.includes(S.current)) S.current = ids[0] || null;
  if (S.current) { pick.value = S.current; await loadSandbox(); }
}

function renderSandboxes() {
  const rows = S.sandboxes.map((s) => el("tr", { class: s.id === S.current ? "selected" : "" },
    el("td", {}, el("button", { type: "button", onclick: () => selectSandbox(s.id, true) }, s.id)),
    el("td", { class: "health-" + s.status }, s.status),
    el("td", {}, s.process_count ?? ""), el("td", {}, bytes(s.memory_bytes)), el("td", {}, s.module_count ?? "")));
  $("#sandboxes tbody").replaceChildren(...rows);
}

function renderOverview() {
  const procs = S.sandboxes.reduce((a, s) => a + (s.process_count || 0), 0);
  const mem = S.sandboxes.reduce((a, s) => a + (s.memory_bytes || 0), 0);
  const minute = Date.now() - 60000;
  const reloads = S.events.filter((e) => e.kind === "reload" && e.at_ms >= minute).length;
  const up = Math.round((Date.now() - S.started) / 1000);
  const stats = [["Sandboxes", S.sandboxes.length], ["Processes", procs], ["Memory", bytes(mem)],
    ["Reloads / min", reloads], ["Watching for", up + " s"]];
  $("#overview").replaceChildren(...stats.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
}

async function selectSandbox(id, show) {
  const insp = $("#inspector"); // absent below admin
  if (S.current !== id && insp) {
    S.inspecting = null;
    insp.hidden = true;
    $("#insp-follow").checked = false;
    followInspector(false);
  }
  S.current = id;
  $("#sb-pick").value = id;
  S.page = 0;
  renderSandboxes();
  await loadSandbox();
  if (show) showTab("sandbox");
}

async function loadSandbox() {
  const id = S.current;
  if (!id) return;
  const base = "/api/v1/sandboxes/" + encodeURIComponent(id);
  $("#sb-name").textContent = id;
  const [p, m, t] = await Promise.all([api("GET", base + "/processes"), api("GET", base + "/modules"), api("GET", base + "/tree")]);
  S.procs = Array.isArray(p.data) ? p.data : [];
  S.modules = Array.isArray(m.data) ? m.data : [];
  renderProcs();
  renderModules();
  renderTree(t.ok ? t.data : null);
  fillEditorModules();
}

// ---- supervision tree ----
function renderTree(tree) {
  const box = $("#tree");
  if (!tree) { box.textContent = "no supervision tree"; return; }
  const byPid = new Map(tree.supervisors.map((s) => [s.pid, s]));
  const node = (sup) => el("ul", {}, ...sup.children.map((c) => {
    const sub = c.pid && byPid.get(c.pid);
    const crashed = !c.running;
    return el("li", { class: crashed ? "crashed" : "" },
      (crashed ? "✖ " : "● ") + c.id + " ", el("span", { class: "count" },
        `${c.module} ${c.pid || "(not running)"} · restarts ${c.restarts ?? 0} · crashes ${c.crashes}`), sub ? node(sub) : null);
  }));
  const roots = tree.roots.map((pid) => byPid.get(pid)).filter(Boolean);
  box.replaceChildren(...roots.map((r) => el("ul", {}, el("li", {}, "▣ " + (r.name || r.module) + " ",
    el("span", { class: "count" }, `${r.strategy} · ${r.recent_restarts} recent restart(s)`), node(r)))));
  if (!roots.length) box.textContent = "no supervisors";
}

// ---- process table ----
function renderProcs() {
  const q = $("#p-filter").value.trim().toLowerCase();
  const [key, dir] = S.sort;
  let rows = S.procs.filter((p) => !q || [p.pid, p.name, p.module, p.status].some((v) => v && String(v).toLowerCase().includes(q)));
  rows.sort((a, b) => {
    const x = a[key] ?? "", y = b[key] ?? "";
    return (typeof x === "number" ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true })) * dir;
  });
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  S.page = Math.min(S.page, pages - 1);
  $("#p-count").textContent = `${rows.length} process(es), page ${S.page + 1} of ${pages}`;
  $("#p-prev").disabled = S.page === 0;
  $("#p-next").disabled = S.page >= pages - 1;
  const admin = S.role === "admin";
  $("#procs tbody").replaceChildren(...rows.slice(S.page * PAGE, S.page * PAGE + PAGE).map((p) => el("tr", {},
    el("td", {}, p.pid), el("td", {}, p.name || ""), el("td", {}, p.module + " v" + p.version),
    el("td", {}, p.status), el("td", {}, p.mailbox_len), el("td", {}, bytes(p.memory_bytes)), el("td", {}, p.messages_handled),
    admin ? el("td", {}, el("button", { type: "button", onclick: () => inspect(p.pid) }, "Inspect")) : null)));
}

// The inspector shows one process's state as of its last read, says when
// that was, and reads it again on Refresh, on every event of its sandbox
// (a reload, crash or restart changes states), and every 2 s with Follow.
// Reads are state reads, which the node audits: hence no silent polling.
let inspectGen = 0;
async function inspect(pid, quiet) {
  const sandbox = quiet ? S.inspecting.sandbox : S.current;
  S.inspecting = { sandbox, pid };
  const gen = ++inspectGen;
  let r;
  try {
    r = await api("GET", `/api/v1/sandboxes/${encodeURIComponent(sandbox)}/processes/${encodeURIComponent(pid)}/state`);
  } catch (err) {
    r = { ok: false, status: 0, data: { error: { message: "the node did not answer" } } };
  }
  // Only the newest read may paint: an older answer arriving late is dropped.
  if (gen !== inspectGen || !S.inspecting || S.inspecting.pid !== pid || S.inspecting.sandbox !== sandbox) return;
  $("#inspector").hidden = false;
  $("#insp-pid").textContent = pid;
  const at = new Date().toLocaleTimeString();
  if (r.ok) {
    $("#insp-state").textContent = JSON.stringify(r.data, null, 2);
    $("#insp-at").textContent = "read at " + at;
  } else {
    $("#insp-at").textContent = `${at}: ${r.status === 404 ? "the process is gone" : "read failed"} (${(r.data && r.data.error && r.data.error.message) || r.status}); the state above is older`;
  }
  if (!quiet) $("#insp-state").focus();
}

// Re-reads are coalesced: at most one in flight and one queued behind it,
// at least 1 s apart, so a flood of events (a crash loop, a batch reload, a
// replay after reconnecting) costs a few audited reads, not one per event.
let reinspecting = false, reinspectQueued = false;
async function reinspect() {
  const insp = $("#inspector"); // absent below admin
  if (!S.inspecting || !insp || insp.hidden) return;
  if (reinspecting) { reinspectQueued = true; return; }
  reinspecting = true;
  try {
    await inspect(S.inspecting.pid, true);
    await new Promise((ok) => setTimeout(ok, 1000));
  } finally {
    reinspecting = false;
  }
  if (reinspectQueued) { reinspectQueued = false; reinspect(); }
}

let inspectTimer = null;
function followInspector(on) {
  clearInterval(inspectTimer);
  inspectTimer = on ? setInterval(() => { if (!document.hidden) reinspect(); }, 2000) : null;
}

// ---- modules, versions, diff, rollback ----
function renderModules() {
  $("#modules tbody").replaceChildren(...S.modules.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", {}, m.kind), el("td", {}, "v" + m.version), el("td", {}, (m.kept || []).join(", ")),
    el("td", {}, el("button", { type: "button", onclick: () => loadVersions(m.name) }, "Versions")))));
}

async function loadVersions(module) {
  const r = await api("GET", `/api/v1/sandboxes/${encodeURIComponent(S.current)}/modules/${encodeURIComponent(module)}/versions`);
  if (!r.ok) return;
  S.versions = r.data;
  S.vModule = module;
  $("#versions").hidden = false;
  $("#v-module").textContent = module;
  $("#v-list").replaceChildren(...S.versions.map((v) => el("li", {}, `v${v.version} ${v.current ? "(current) " : ""}`,
    new Date(v.loaded_at_ms).toLocaleTimeString() + " ",
    v.current || !canWrite() ? null : el("button", { type: "button", onclick: () => rollback(module, v.version) }, "Roll back to v" + v.version))));
  const opts = () => S.versions.map((v) => el("option", { value: v.version }, "v" + v.version));
  $("#diff-a").replaceChildren(...opts());
  $("#diff-b").replaceChildren(...opts());
  if (S.versions.length > 1) $("#diff-a").value = S.versions[S.versions.length - 2].version;
  $("#diff-b").value = S.versions[S.versions.length - 1].version;
  renderDiff();
}

async function rollback(module, version) {
  const r = await api("POST", `/api/v1/sandboxes/${encodeURIComponent(S.current)}/modules/${encodeURIComponent(module)}/rollback`, { version });
  const st = $("#v-status");
  st.className = r.ok ? "ok" : "error";
  st.textContent = r.ok ? `rolled ${module} back to v${version}` : "rollback failed: " + errText(r);
  await loadVersions(module);
}

// Longest common subsequence over lines; bounded so a huge module cannot
// freeze the page (past the bound the two sides are shown unaligned).
function diffLines(a, b) {
  if (a.length * b.length > 4e6) return { rows: a.map((l, i) => [l, b[i] ?? "", "del"]).concat(b.slice(a.length).map((l) => ["", l, "add"])) };
  const n = a.length, m = b.length, L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--)
    L[i][j] = a[i] === b[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const rows = [];
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { rows.push([a[i++], b[j++], ""]); }
    else if (j < m && (i >= n || L[i][j + 1] >= L[i + 1][j])) rows.push(["", b[j++], "add"]);
    else rows.push([a[i++], "", "del"]);
  }
  return { rows };
}

function renderDiff() {
  const va = S.versions.find((v) => String(v.version) === $("#diff-a").value);
  const vb = S.versions.find((v) => String(v.version) === $("#diff-b").value);
  if (!va || !vb) return;
  const { rows } = diffLines(va.source.split("\n"), vb.source.split("\n"));
  const cells = [];
  for (const [l, r, k] of rows) {
    cells.push(el("div", { class: k === "del" ? "del" : "" }, l), el("div", { class: k === "add" ? "add" : "" }, r));
  }
  $("#diff").replaceChildren(...cells);
}

// ---- live editor ----
let dryTimer = null, dryRun = 0;
function fillEditorModules() {
  if (!canWrite()) return;
  const sel = $("#ed-module");
  const names = S.modules.map((m) => m.name);
  if (sel.options.length === names.length && names.every((n, i) => sel.options[i].value === n)) return;
  const keep = sel.value;
  sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
  if (names.includes(keep)) sel.value = keep;
  if (!keep || !names.includes(keep)) loadSource();
}

async function loadSource() {
  const module = $("#ed-module").value;
  if (!module) return;
  const r = await api("GET", `/api/v1/sandboxes/${encodeURIComponent(S.current)}/modules/${encodeURIComponent(module)}/versions`);
  const cur = r.ok ? r.data.find((v) => v.current) : null;
  $("#ed-source").value = cur ? cur.source : "";
  gutter([]);
  $("#ed-status").textContent = cur ? `${module} v${cur.version}: edit to dry-run` : "";
  $("#ed-diags").replaceChildren();
}

function gutter(errLines) {
  const n = $("#ed-source").value.split("\n").length;
  const bad = new Set(errLines);
  const g = $("#ed-gutter");
  g.replaceChildren(...Array.from({ length: n }, (_, i) => el("div", { class: bad.has(i + 1) ? "err" : "" }, i + 1)));
  $("#ed-source").style.height = Math.max(384, n * 1.4 * 13.6 + 16) + "px";
}

function errText(r) {
  return (r.data && r.data.error && r.data.error.message) || "HTTP " + r.status;
}

async function reloadBody(dry) {
  const body = { modules: { [$("#ed-module").value]: $("#ed-source").value } };
  if (dry) body.dry_run = true;
  const canary = Number($("#ed-canary").value);
  if (!dry && canary > 0) body.canary_ms = canary;
  return api("POST", `/api/v1/sandboxes/${encodeURIComponent(S.current)}/reload`, body);
}

function showResult(r, dry) {
  const diags = (r.data && r.data.error && r.data.error.diagnostics) || [];
  const one = r.data && r.data.error && r.data.error.line ? [r.data.error] : [];
  const all = diags.length ? diags : one;
  gutter(all.map((d) => d.line));
  $("#ed-diags").replaceChildren(...all.map((d) => el("li", {}, `line ${d.line}:${d.column}: ${d.message}\n${d.frame || ""}`)));
  const st = $("#ed-status");
  if (r.ok) {
    const n = r.data.processes_migrated;
    st.className = "ok";
    st.textContent = dry
      ? (r.data.status === "unchanged" ? "no change" : `dry run ok: would migrate ${n} process${n === 1 ? "" : "es"}`)
      : `applied: ${r.data.modules.map((m) => `${m.name} v${m.from} → v${m.to}`).join(", ") || r.data.status}, ${n} migrated`;
  } else {
    st.className = "error";
    st.textContent = (dry ? "dry run failed: " : "not applied: ") + errText(r);
  }
}

function onEdit() {
  gutter([]);
  clearTimeout(dryTimer);
  dryTimer = setTimeout(async () => {
    const mine = ++dryRun;
    $("#ed-status").className = "";
    $("#ed-status").textContent = "checking…";
    const r = await reloadBody(true);
    if (mine === dryRun) showResult(r, true);
  }, 500);
}

async function apply() {
  clearTimeout(dryTimer);
  dryRun++;
  const r = await reloadBody(false);
  showResult(r, false);
  const canary = Number($("#ed-canary").value);
  if (r.ok && canary > 0) startCanary($("#ed-module").value, canary);
}

function startCanary(module, ms) {
  S.canary = { module, until: Date.now() + ms, sandbox: S.current };
  tickCanary();
}

function tickCanary(verdict) {
  const box = $("#canary");
  if (!S.canary) { box.hidden = true; return; }
  if (verdict) { box.textContent = `canary for ${S.canary.module}: ${verdict}`; S.canary = null; setTimeout(() => { box.hidden = true; }, 10000); return; }
  const left = Math.max(0, S.canary.until - Date.now());
  box.hidden = false;
  box.textContent = `canary watching ${S.canary.module}: ${(left / 1000).toFixed(0)} s left`;
  if (left > 0) setTimeout(() => tickCanary(), 1000);
}

// ---- events (live) ----
function eventFilterMatches(e) {
  const sb = $("#ev-sandbox").value.trim(), kind = $("#ev-kind").value.trim();
  return (!sb || e.sandbox === sb) && (!kind || kind.split(/[ ,]+/).includes(e.kind));
}

function renderEvents() {
  const shown = S.events.filter(eventFilterMatches).slice(-200).reverse();
  $("#events").replaceChildren(...shown.map((e) => el("li", {},
    el("time", {}, new Date(e.at_ms).toLocaleTimeString()), el("span", { class: "kind k-" + e.kind }, e.kind),
    e.sandbox + " ", summary(e))));
}

function summary(e) {
  const d = e.detail || {};
  if (d.modules && Array.isArray(d.modules)) return d.modules.map((m) => m.name ? `${m.name} v${m.from}→v${m.to}` : m).join(", ") + (d.error ? " — " + d.error : "");
  if (d.process) return `${d.process} (${d.module || ""}) ${typeof d.reason === "string" ? d.reason : JSON.stringify(d.reason)}`;
  if (e.kind === "gap") return d.reset ? `event log restarted (no event ${d.after} here)` : `missed events ${d.after + 1}–${d.up_to}`;
  return JSON.stringify(d).slice(0, 200);
}

function onEvent(e) {
  S.events.push(e);
  if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
  if (e.kind === "reload" || e.kind === "rollback" || e.kind === "canary_rollback") {
    const t = (e.detail.report || e.detail).timings;
    if (t) point("reload", (t.compile_us + t.swap_us) / 1000);
  }
  if (S.canary && e.sandbox === S.canary.sandbox && (e.kind === "canary_passed" || e.kind === "canary_rollback")) {
    tickCanary(e.kind === "canary_passed" ? "passed" : "rolled back");
  }
  renderEvents();
  if (e.kind !== "log_dropped") refreshSoon();
  if (S.inspecting && e.sandbox === S.inspecting.sandbox && e.kind !== "log_dropped") reinspect();
}

// Reads the SSE stream with fetch (so a bearer token works too), resuming
// from the last id after a drop.
async function follow() {
  for (;;) {
    const ctl = new AbortController();
    S.stream = ctl;
    const headers = { Accept: "text/event-stream" };
    if (S.token) headers.Authorization = "Bearer " + S.token;
    if (S.lastSeq != null) headers["Last-Event-ID"] = String(S.lastSeq);
    try {
      const r = await fetch("/api/v1/events/stream" + (S.lastSeq == null ? "?tail=200" : ""), { headers, signal: ctl.signal, credentials: "same-origin" });
      if (r.status === 401) { $("#live").textContent = "signed out"; return; }
      if (!r.ok || !r.body) throw new Error("stream " + r.status);
      $("#live").textContent = "live";
      $("#live").classList.add("on");
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let id = null, type = "message", data = "";
          for (const line of frame.split("\n")) {
            if (line.startsWith("id:")) id = line.slice(3).trim();
            else if (line.startsWith("event:")) type = line.slice(6).trim();
            else if (line.startsWith("data:")) data += line.slice(5).trim();
          }
          if (id != null) S.lastSeq = Number(id);
          if (!data) continue;
          const obj = JSON.parse(data);
          if (type === "gap") onEvent({ seq: S.lastSeq, sandbox: "", at_ms: Date.now(), kind: "gap", detail: obj });
          else onEvent(obj);
        }
      }
    } catch (err) {
      if (ctl.signal.aborted) return;
    }
    $("#live").textContent = "reconnecting";
    $("#live").classList.remove("on");
    await new Promise((res) => setTimeout(res, 1000));
  }
}

// ---- charts ----
function point(series, v) {
  const s = S.series[series];
  s.push([Date.now(), v]);
  if (s.length > MAX_POINTS) s.shift();
  drawCharts();
}

function sample() {
  point("procs", S.sandboxes.reduce((a, s) => a + (s.process_count || 0), 0));
  point("mem", S.sandboxes.reduce((a, s) => a + (s.memory_bytes || 0), 0) / 1048576);
  renderOverview();
  refreshSoon();
}

function draw(svg, pts) {
  if (!pts.length) { svg.replaceChildren(); return; }
  const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
  const max = Math.max(...pts.map((p) => p[1]), 1e-9);
  const xy = pts.map(([t, v]) => `${(5 + (t - t0) / (t1 - t0) * 290).toFixed(1)},${(95 - v / max * 80).toFixed(1)}`);
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", xy.join(" "));
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "5"); label.setAttribute("y", "10");
  label.textContent = "max " + (max >= 100 ? max.toFixed(0) : max.toFixed(2)) + " · last " + pts[pts.length - 1][1].toFixed(2);
  svg.replaceChildren(line, label);
}

function drawCharts() {
  draw($("#chart-reload"), S.series.reload);
  draw($("#chart-procs"), S.series.procs);
  draw($("#chart-mem"), S.series.mem);
}

// ---- audit ----
async function loadAudit() {
  const r = await api("GET", "/api/v1/audit");
  const note = $("#au-note");
  if (r.status === 404) { note.textContent = "this node keeps no audit log (no /api/v1/audit)"; return; }
  if (!r.ok) { note.textContent = "audit log unavailable: " + errText(r); return; }
  note.textContent = "";
  const rows = Array.isArray(r.data) ? r.data : (r.data && r.data.entries) || [];
  $("#audit tbody").replaceChildren(...rows.slice(-500).reverse().map((a) => el("tr", {},
    el("td", {}, a.at_ms ? new Date(a.at_ms).toLocaleString() : ""), el("td", {}, a.token_id || a.who || ""),
    el("td", {}, a.action || a.method || ""), el("td", {}, a.target || a.path || ""), el("td", {}, a.result ?? a.status ?? ""))));
}

// ---- wiring ----
document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", signOut);
  for (const b of $$(".tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#sb-pick").addEventListener("change", (e) => selectSandbox(e.target.value, false));
  $("#p-filter").addEventListener("input", () => { S.page = 0; renderProcs(); });
  $("#p-prev").addEventListener("click", () => { S.page--; renderProcs(); });
  $("#p-next").addEventListener("click", () => { S.page++; renderProcs(); });
  for (const b of $$("[data-sort]")) b.addEventListener("click", () => {
    S.sort = [b.dataset.sort, S.sort[0] === b.dataset.sort ? -S.sort[1] : 1];
    renderProcs();
  });
  $("#insp-refresh").addEventListener("click", reinspect);
  $("#insp-follow").addEventListener("change", (e) => followInspector(e.target.checked));
  $("#diff-a").addEventListener("change", renderDiff);
  $("#diff-b").addEventListener("change", renderDiff);
  $("#ed-module").addEventListener("change", loadSource);
  $("#ed-source").addEventListener("input", onEdit);
  $("#ed-apply").addEventListener("click", apply);
  $("#ev-sandbox").addEventListener("input", renderEvents);
  $("#ev-kind").addEventListener("input", renderEvents);
  $("#au-refresh").addEventListener("click", loadAudit);
  start();
});
