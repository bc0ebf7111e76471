// The registry's dashboard: the fleet live from the gateway's event feed.
//
// Plain JavaScript, no build step, nothing fetched from elsewhere. Every
// worker-supplied string reaches the page as a text node or an attribute value
// (textContent, setAttribute), never as HTML.
//
// Live order: open the EventSource first, then read the list; updates are
// applied by worker id, and a record older (by `version`) than the one shown
// is dropped, so a snapshot that raced the feed cannot undo a newer change.
"use strict";

(() => {
  const API = "/api/v1";
  const STATS = ["total", "available", "online", "busy", "offline",
    "gpu_workers", "cpu_workers", "hybrid_workers"];
  const HEALTH_STALE_MS = 6000;
  const OPEN_WAIT_MS = 3000;

  const records = new Map(); // worker id -> record, as the gateway sends it
  const rows = new Map(); // worker id -> [tr, the record it shows]
  let loading = null; // while a list is read: {deleted: Set, touched: Set}
  let renderPending = false;
  let route = { view: "fleet", id: "" };
  let lastHealthAt = 0;
  let statsTimer = null;
  let workerTimer = null;
  let workerToken = 0;

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ DOM, safely

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function setText(id, value) {
    const node = $(id);
    if (node && node.textContent !== String(value)) node.textContent = String(value);
  }

  // ------------------------------------------------------------ the records

  const workerId = (r) => r.registration.worker_id;
  const isOffline = (r) => r.offline_reason != null || r.status === "offline";
  const maxTasks = (r) => Math.max(1, r.registration.max_concurrent_tasks || 1);
  const load = (r) => (isOffline(r) ? 0 : r.metrics.active_tasks / maxTasks(r));

  function statusText(r) {
    if (r.offline_reason != null) return `offline (${r.offline_reason})`;
    if (r.cordon) return `${r.status} (${r.cordon.drain ? "draining" : "cordoned"} by ${r.cordon.by})`;
    return String(r.status);
  }

  function availability(r) {
    if (r.available) return "yes";
    if (isOffline(r)) return "no";
    if (r.late) return "late";
    if (r.cordon) return r.cordon.drain ? "draining" : "cordoned";
    if (r.status === "online" && r.metrics.active_tasks >= maxTasks(r)) return "full";
    return "no";
  }

  function age(iso, now) {
    if (!iso) return "–";
    let s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
    if (s < 120) return `${s}s`;
    let m = Math.floor(s / 60);
    s %= 60;
    if (m < 120) return `${m}m ${s}s`;
    const h = Math.floor(m / 60);
    m %= 60;
    return h < 48 ? `${h}h ${m}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function instant(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  // Relevant to the counts: a change here asks for fresh stats.
  const statsKey = (r) => (r ? [r.status, r.available, r.offline_reason, r.late,
    r.registration.capability, Boolean(r.cordon)].join("|") : "");

  function applyUpdate(id, record) {
    if (loading) loading.touched.add(id);
    const before = records.get(id);
    if (record == null) {
      if (loading) loading.deleted.add(id);
      if (!before) return;
      records.delete(id);
    } else {
      if (before && (before.version || 0) >= (record.version || 0)) return;
      if (loading) loading.deleted.delete(id);
      records.set(id, record);
    }
    if (statsKey(before) !== statsKey(record)) refreshStatsSoon();
    if (route.view === "worker" && route.id === id) workerChanged();
    scheduleRender();
  }

  // The list is the truth as of its reading; the feed's changes since the list was asked
  // for are weighed by version (a record deleted and made again starts at version 1).
  function applyList(list) {
    const seen = new Set();
    for (const r of list) {
      const id = workerId(r);
      seen.add(id);
      if (loading.deleted.has(id)) continue;
      const cur = records.get(id);
      if (loading.touched.has(id) && cur && (cur.version || 0) >= (r.version || 0)) continue;
      records.set(id, r);
    }
    for (const id of [...records.keys()]) {
      if (!seen.has(id) && !loading.touched.has(id)) records.delete(id); // gone meanwhile
    }
  }

  async function getJSON(path) {
    const res = await fetch(API + path, { headers: { Accept: "application/json" } });
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        if (body && body.detail !== undefined) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON */ }
      const err = new Error(`${res.status} ${detail}`);
      err.status = res.status;
      throw err;
    }
    return res.json();
  }

  let loadRun = 0;
  async function loadFleet() {
    const run = ++loadRun;
    loading = { deleted: new Set(), touched: new Set() };
    try {
      const [list, stats] = await Promise.all([getJSON("/workers?include_offline=true"), getJSON("/workers/stats")]);
      if (run !== loadRun) return;
      applyList(list);
      setCounts(stats);
      $("fleet-error").hidden = true;
      document.body.dataset.loaded = "true";
    } catch (e) {
      if (run !== loadRun) return;
      showFleetError(`could not read the fleet: ${e.message}; trying again`);
      setTimeout(() => { if (run === loadRun) loadFleet(); }, 3000);
    } finally {
      if (run === loadRun) loading = null;
      scheduleRender();
    }
  }

  function showFleetError(text) {
    const p = $("fleet-error");
    p.textContent = text;
    p.hidden = false;
  }

  // ------------------------------------------------------------ counts and health

  function setCounts(stats) {
    if (!stats) return;
    for (const k of STATS) {
      if (stats[k] !== undefined) setText(`count-${k}`, stats[k]);
    }
  }

  // At most one stats request at a time, 300 ms after a change that moves a count; a
  // change while it is out asks again once it is back.
  let statsInFlight = false;
  let statsAgain = false;
  function refreshStatsSoon() {
    if (statsInFlight) statsAgain = true;
    if (statsTimer || statsInFlight) return;
    statsTimer = setTimeout(async () => {
      statsTimer = null;
      statsInFlight = true;
      try {
        setCounts(await getJSON("/workers/stats"));
      } catch (_) { /* the next health event brings them */ } finally {
        statsInFlight = false;
        if (statsAgain) {
          statsAgain = false;
          refreshStatsSoon();
        }
      }
    }, 300);
  }

  function setHealth(h) {
    lastHealthAt = Date.now();
    const box = $("health");
    box.dataset.status = h.status || "unknown";
    box.dataset.stale = "false";
    setText("health-status", h.status || "–");
    const a = h.active;
    setText("health-holder", a ? a.holder : "none");
    $("health-holder").title = a && a.host ? `on ${a.host}, pid ${a.pid}` : "";
    setText("health-reasons", (h.reasons || []).join("; "));
    setText("health-epoch", a && a.epoch != null ? a.epoch : "–");
    setText("health-since", a && a.since ? `${instant(a.since)} (${age(a.since, Date.now())} ago)` : "–");
    setText("health-lag", h.lag_s == null ? "–" : `${Number(h.lag_s).toFixed(2)} s`);
    setText("health-pending", h.pending == null ? "–" : h.pending);
    setText("health-brake", h.brake_engaged ? "ENGAGED" : "off");
    $("health-brake").dataset.engaged = String(Boolean(h.brake_engaged));
    setText("health-expiries", h.expiries_held == null ? "–" : h.expiries_held);
    setCounts(h.workers);
  }

  function checkHealthStale() {
    if (lastHealthAt && Date.now() - lastHealthAt > HEALTH_STALE_MS) {
      $("health").dataset.stale = "true";
      setText("health-status", `no word for ${age(new Date(lastHealthAt).toISOString(), Date.now())}`);
    }
  }

  async function loadHealth() {
    try { // 503 when nobody answers for the registry: its body is the health all the same
      const res = await fetch(`${API}/health`, { headers: { Accept: "application/json" } });
      if (res.ok || res.status === 503) setHealth(await res.json());
    } catch (_) { /* the feed brings it */ }
  }

  // ------------------------------------------------------------ the live feed

  function setFeed(state) {
    const node = $("feed-state");
    node.dataset.state = state;
    node.textContent = state;
    document.body.dataset.feed = state;
  }

  function connect() {
    const es = new EventSource(`${API}/events`);
    let opened = false;
    const fallback = setTimeout(() => { if (!opened) loadFleet(); }, OPEN_WAIT_MS);
    es.addEventListener("open", () => {
      opened = true;
      clearTimeout(fallback);
      setFeed("live");
      loadFleet(); // after every (re)connect: what happened while we were away
    });
    es.addEventListener("error", () => {
      if (es.readyState === EventSource.CLOSED) {
        setFeed("disconnected");
        setTimeout(connect, 3000);
      } else {
        setFeed("reconnecting");
      }
    });
    es.addEventListener("worker", (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      if (msg && typeof msg.worker_id === "string") applyUpdate(msg.worker_id, msg.record);
    });
    es.addEventListener("overflow", () => {
      setFeed("catching up"); // the gateway ends the feed; the reconnect reads the list again
    });
    es.addEventListener("health", (ev) => {
      try { setHealth(JSON.parse(ev.data)); } catch (_) { /* ignore a bad one */ }
    });
  }

  // ------------------------------------------------------------ the fleet table

  function readFilter() {
    const tags = $("filter-tag").value.split(",").map((t) => t.trim()).filter(Boolean).map((t) => {
      const i = t.indexOf("=");
      return i < 0 ? [t, null] : [t.slice(0, i).trim(), t.slice(i + 1).trim()];
    });
    return {
      capability: $("filter-capability").value,
      status: $("filter-status").value,
      contentType: $("filter-content-type").value,
      tags,
      sort: $("sort").value,
    };
  }

  function matches(r, f) {
    const reg = r.registration;
    if (f.capability && reg.capability !== f.capability) return false;
    const off = isOffline(r);
    switch (f.status) {
      case "": if (off) return false; break;
      case "all": break;
      case "available": if (!r.available) return false; break;
      case "offline": if (!off) return false; break;
      default: if (off || r.status !== f.status) return false;
    }
    if (f.contentType && !(reg.supported_content_types || []).includes(f.contentType)) return false;
    const tags = reg.tags || {};
    for (const [k, v] of f.tags) {
      if (!Object.prototype.hasOwnProperty.call(tags, k)) return false;
      if (v !== null && String(tags[k]) !== v) return false;
    }
    return true;
  }

  const byId = (a, b) => (workerId(a) < workerId(b) ? -1 : workerId(a) > workerId(b) ? 1 : 0);

  function sorter(sort) {
    if (sort === "id") return byId;
    const sign = sort === "load-asc" ? 1 : -1;
    return (a, b) => sign * (load(a) - load(b)) || byId(a, b);
  }

  function cell(col, ...children) {
    return el("td", { "data-col": col }, ...children);
  }

  function buildRow(r, now) {
    const reg = r.registration;
    const id = workerId(r);
    const m = r.metrics;
    const pct = Math.round(load(r) * 100);
    const link = el("a", { href: `#/workers/${encodeURIComponent(id)}` }, id);
    const bar = el("span", { class: "bar" }, el("span", { class: "fill" }));
    bar.firstChild.style.width = `${Math.min(100, pct)}%`;
    const types = (reg.supported_content_types || []).map((t) => el("span", { class: "chip" }, t));
    const tags = Object.entries(reg.tags || {}).map(([k, v]) => el("span", { class: "chip tag" }, `${k}=${v}`));
    const avail = availability(r);
    const tr = el("tr", {
      "data-worker-id": id,
      "data-status": isOffline(r) ? "offline" : r.status,
      "data-capability": reg.capability,
      "data-available": String(Boolean(r.available)),
      "data-late": String(Boolean(r.late)),
      "data-load": load(r).toFixed(4),
      "data-version": r.version,
    },
    cell("id", link),
    cell("name", reg.name),
    cell("capability", reg.capability),
    cell("status", el("span", { class: "badge", "data-status": isOffline(r) ? "offline" : r.status }, statusText(r))),
    cell("available", el("span", { class: "avail", "data-avail": avail }, avail)),
    cell("load", bar, ` ${pct}%`),
    cell("tasks", `${m.active_tasks}/${reg.max_concurrent_tasks}`),
    cell("content-types", ...types),
    cell("tags", ...tags),
    cell("heartbeat", age(r.last_heartbeat, now)));
    tr.title = `${reg.location.hostname} (${reg.location.ip_address}:${reg.location.port})`;
    return tr;
  }

  function rowFor(r, now) {
    const id = workerId(r);
    const cur = rows.get(id);
    if (cur && cur[1] === r) return cur[0];
    const tr = buildRow(r, now);
    if (cur) cur[0].replaceWith(tr);
    rows.set(id, [tr, r]);
    return tr;
  }

  function syncContentTypes() {
    const select = $("filter-content-type");
    const types = new Set();
    for (const r of records.values()) for (const t of r.registration.supported_content_types || []) types.add(t);
    const want = ["", ...[...types].sort()];
    const have = [...select.options].map((o) => o.value);
    if (want.join("\n") === have.join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(...want.map((t) => el("option", { value: t }, t || "any")));
    if (chosen && !types.has(chosen)) select.append(el("option", { value: chosen }, chosen));
    select.value = chosen;
  }

  function renderFleet() {
    const now = Date.now();
    const f = readFilter();
    const shown = [...records.values()].filter((r) => matches(r, f)).sort(sorter(f.sort));
    const tbody = $("worker-rows");
    const keep = new Set(shown.map(workerId));
    for (const [id, [tr]] of rows) {
      if (!keep.has(id)) {
        tr.remove();
        rows.delete(id);
      }
    }
    const trs = shown.map((r) => rowFor(r, now)); // changed rows are replaced in place
    let at = tbody.firstElementChild;
    for (const tr of trs) {
      if (tr === at) at = at.nextElementSibling;
      else tbody.insertBefore(tr, at);
    }
    $("fleet-empty").hidden = shown.length > 0 || !document.body.dataset.loaded;
    setText("shown", `${shown.length} of ${records.size} shown`);
    syncContentTypes();
  }

  function tickAges() {
    const now = Date.now();
    for (const [tr, r] of rows.values()) {
      const td = tr.lastElementChild;
      const text = age(r.last_heartbeat, now);
      if (td.textContent !== text) td.textContent = text;
    }
    if (route.view === "worker") {
      const r = records.get(route.id);
      if (r) setText("worker-age", `${age(r.last_heartbeat, now)} ago`);
    }
    checkHealthStale();
  }

  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    setTimeout(() => {
      renderPending = false;
      if (route.view === "fleet") renderFleet();
      else renderWorkerRecord();
    }, 50);
  }

  // ------------------------------------------------------------ one worker

  function parseRoute() {
    const m = /^#\/workers\/(.+)$/.exec(location.hash);
    if (!m) return { view: "fleet", id: "" };
    try {
      return { view: "worker", id: decodeURIComponent(m[1]) };
    } catch (_) {
      return { view: "worker", id: m[1] };
    }
  }

  function onRoute() {
    route = parseRoute();
    const worker = route.view === "worker";
    $("fleet-view").hidden = worker;
    $("worker-view").hidden = !worker;
    document.body.dataset.view = route.view;
    if (worker) {
      $("worker-view").dataset.workerId = route.id;
      setText("worker-title", `worker ${route.id}`);
      $("worker-record").replaceChildren();
      $("worker-explain").replaceChildren();
      setText("worker-state", "");
      $("worker-history").tBodies[0].replaceChildren();
      setText("worker-json", "");
      loadWorker(route.id);
    } else {
      scheduleRender();
    }
  }

  function showWorkerError(text) {
    const p = $("worker-error");
    p.textContent = text || "";
    p.hidden = !text;
  }

  async function loadWorker(id) {
    const token = ++workerToken;
    const [rec, explain, history] = await Promise.allSettled([
      getJSON(`/workers/${encodeURIComponent(id)}`),
      getJSON(`/workers/${encodeURIComponent(id)}/explain`),
      getJSON(`/workers/${encodeURIComponent(id)}/history?limit=50`),
    ]);
    if (token !== workerToken) return;
    if (rec.status === "fulfilled") {
      const cur = records.get(id);
      if (!cur || (cur.version || 0) < (rec.value.version || 0)) records.set(id, rec.value);
      showWorkerError("");
    } else {
      showWorkerError(rec.reason.status === 404 ? `no worker ${id} in the registry` : `could not read the worker: ${rec.reason.message}`);
    }
    renderWorkerRecord();
    if (explain.status === "fulfilled") {
      setText("worker-state", explain.value.state || "");
      $("worker-explain").replaceChildren(...(explain.value.lines || []).map((line) => el("li", {}, line)));
    }
    if (history.status === "fulfilled") {
      const trs = (history.value.events || []).map((e) => el("tr", { "data-seq": e.seq },
        el("td", {}, e.seq), el("td", {}, instant(e.stored_at)), el("td", {}, e.kind), el("td", {}, e.summary)));
      $("worker-history").tBodies[0].replaceChildren(...trs);
    }
    $("worker-view").dataset.loaded = "true";
  }

  function workerChanged() {
    scheduleRender();
    if (workerTimer) return;
    workerTimer = setTimeout(() => { // explain and history, at most every 2 s
      workerTimer = null;
      if (route.view === "worker") loadWorker(route.id);
    }, 2000);
  }

  function renderWorkerRecord() {
    const r = records.get(route.id);
    if (route.view !== "worker" || !r) return;
    const reg = r.registration;
    const hw = reg.hardware || {};
    const loc = reg.location || {};
    const m = r.metrics;
    const now = Date.now();
    const gpus = hw.gpu_count ? `${hw.gpu_count} × ${(hw.gpu_models || []).join(", ") || "GPU"}, ${hw.gpu_memory_gb} GiB` : "none";
    const fields = [
      ["name", reg.name],
      ["capability", reg.capability],
      ["status", statusText(r)],
      ["available", availability(r)],
      ["tasks", `${m.active_tasks}/${reg.max_concurrent_tasks} (${Math.round(load(r) * 100)}%)`],
      ["last heartbeat", el("span", {}, `${instant(r.last_heartbeat)}, `, el("span", { id: "worker-age" }, `${age(r.last_heartbeat, now)} ago`))],
      ["heartbeat every", `${r.heartbeat_interval_s} s`],
      ["registered", instant(r.registered_at)],
      ["offline since", r.offline_at ? `${instant(r.offline_at)} (${r.offline_reason || "offline"})` : "–"],
      ["version", r.version],
      ["host", `${loc.hostname} (${loc.ip_address}:${loc.port}${loc.is_remote ? ", remote" : ""})`],
      ["hardware", `${hw.cpu_cores} CPUs, ${hw.memory_gb} GiB memory, ${hw.disk_space_gb} GiB disk`],
      ["GPUs", gpus],
      ["usage", `cpu ${Math.round(m.cpu_usage_percent)}%, memory ${Math.round(m.memory_usage_percent)}%, gpu ${Math.round(m.gpu_usage_percent)}%`],
      ["tasks done", `${m.completed_tasks} completed, ${m.failed_tasks} failed, ${Number(m.avg_task_duration_seconds).toFixed(1)} s average`],
      ["content types", (reg.supported_content_types || []).join(", ") || "–"],
      ["tags", Object.entries(reg.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
    ];
    $("worker-record").replaceChildren(...fields.map(([k, v]) =>
      el("div", { "data-field": k }, el("dt", {}, k), el("dd", {}, v))));
    $("worker-view").dataset.status = isOffline(r) ? "offline" : r.status;
    setText("worker-title", `${reg.name} (${workerId(r)})`);
    setText("worker-json", JSON.stringify(r, null, 2));
  }

  // ------------------------------------------------------------ start

  function start() {
    for (const id of ["filter-capability", "filter-status", "filter-content-type", "sort"]) {
      $(id).addEventListener("change", scheduleRender);
    }
    $("filter-tag").addEventListener("input", scheduleRender);
    $("filters").addEventListener("submit", (ev) => ev.preventDefault());
    for (const b of document.querySelectorAll("button[data-sort]")) {
      b.addEventListener("click", () => {
        const sort = $("sort");
        const want = b.dataset.sort;
        sort.value = want === "load" && sort.value === "load" ? "load-asc" : want;
        scheduleRender();
      });
    }
    window.addEventListener("hashchange", onRoute);
    setFeed("connecting");
    connect(); // the feed first, then the list (on open)
    loadHealth();
    onRoute();
    setInterval(tickAges, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
