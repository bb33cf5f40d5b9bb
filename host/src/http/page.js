// jobhost's status page: refreshes the tables from /status.json every 2 s.
//
// It builds the same rows and data-* marks as the server's page.rs (keep the column lists in
// step), only with textContent and dataset (never innerHTML: every name comes from the config
// or a plugin). It loads nothing else and runs under the page's strict CSP.
"use strict";

(function () {
  const EVERY_MS = 2000;

  const POOL_FIELDS = [
    "name", "plugin", "mode", "state", "workers", "workers_busy", "jobs_queued",
    "jobs_running", "jobs_in_flight", "jobs_done", "jobs_failed", "jobs_retried",
    "jobs_dropped", "crashes", "timeouts", "source", "source_lag",
  ];

  let refreshes = 0;

  function duration(secs) {
    const s = Number.isFinite(secs) && secs > 0 ? Math.floor(secs) : 0;
    const two = (n) => String(n).padStart(2, "0");
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + two(Math.floor((s % 3600) / 60)) + "m";
    return Math.floor(s / 86400) + "d" + two(Math.floor((s % 86400) / 3600)) + "h";
  }

  function jobAge(secs) {
    const s = Number.isFinite(secs) && secs > 0 ? secs : 0;
    return s < 59.95 ? s.toFixed(1) + "s" : duration(Math.max(s, 60));
  }

  function size(bytes) {
    const units = ["K", "M", "G", "T", "P"];
    if (bytes < 1024) return bytes + "B";
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1023.95 && unit + 1 < units.length) {
      value /= 1024;
      unit += 1;
    }
    return value.toFixed(1) + units[unit];
  }

  function stateClass(state) {
    return typeof state === "string" && /^[a-z-]+$/.test(state) ? "state-" + state : "state-other";
  }

  function orDash(value, format) {
    return value === null || value === undefined ? "-" : format(value);
  }

  function lastReload(r) {
    if (!r) return "none";
    return r.ok ? r.at + " ok" : r.at + " FAILED: " + r.message;
  }

  function setField(field, text) {
    const el = document.querySelector("header [data-field='" + field + "']");
    if (el) el.textContent = text;
  }

  function poolCells(p) {
    const src = p.source;
    return {
      name: p.name,
      plugin: p.plugin + "@" + p.plugin_version,
      mode: p.mode,
      state: p.state,
      workers: p.workers_running + "/" + p.workers_wanted,
      workers_busy: p.workers_busy,
      jobs_queued: p.jobs_queued,
      jobs_running: p.jobs_running,
      jobs_in_flight: p.jobs_in_flight,
      jobs_done: p.jobs_done,
      jobs_failed: p.jobs_failed,
      jobs_retried: p.jobs_retried,
      jobs_dropped: p.jobs_dropped,
      crashes: p.crashes,
      timeouts: p.timeouts,
      source: src ? src.kind + " " + src.state : "-",
      source_lag: src ? orDash(src.lag, String) : "-",
    };
  }

  function poolRow(p) {
    const tr = document.createElement("tr");
    tr.dataset.pool = p.name;
    const cells = poolCells(p);
    for (const field of POOL_FIELDS) {
      const td = document.createElement("td");
      td.dataset.pool = p.name;
      td.dataset.field = field;
      td.textContent = String(cells[field]);
      if (field === "state") td.className = "state " + stateClass(p.state);
      if (field === "source" && p.source) {
        td.title = p.source.reason ? p.source.address + ": " + p.source.reason : p.source.address;
      }
      tr.appendChild(td);
    }
    return tr;
  }

  function workerRow(w) {
    const tr = document.createElement("tr");
    tr.dataset.worker = String(w.pid);
    const cells = [
      ["pid", w.pid],
      ["pool", w.pool],
      ["generation", w.generation],
      ["state", w.state],
      ["job_age", orDash(w.job_age_secs, jobAge)],
      ["jobs_done", w.jobs_done],
      ["rss", orDash(w.rss_bytes, size)],
      ["own", orDash(w.own_bytes, size)],
      ["age", duration(w.age_secs)],
    ];
    for (const [field, value] of cells) {
      const td = document.createElement("td");
      td.dataset.field = field;
      td.textContent = String(value);
      if (field === "state") td.className = "state " + stateClass(w.state);
      tr.appendChild(td);
    }
    return tr;
  }

  function recentEvents(status) {
    const events = Array.isArray(status.recent) ? status.recent.slice() : [];
    const r = status.last_reload;
    if (r && !r.ok && !events.some((e) => e.kind === "reload-failed" && e.at === r.at)) {
      events.unshift({ at: r.at, kind: "reload-failed", pool: null, pid: null, reason: r.message });
    }
    return events;
  }

  function recentItem(e) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    const time = document.createElement("time");
    time.textContent = e.at;
    const kind = document.createElement("span");
    kind.className = "kind " + stateClass(e.kind);
    kind.textContent = e.kind;
    li.append(time, " ", kind);
    if (e.pool !== null && e.pool !== undefined) {
      const b = document.createElement("b");
      b.textContent = e.pool;
      li.append(" pool ", b);
    }
    if (e.pid !== null && e.pid !== undefined) {
      const b = document.createElement("b");
      b.textContent = String(e.pid);
      li.append(" pid ", b);
    }
    const reason = document.createElement("span");
    reason.className = "reason";
    reason.textContent = e.reason;
    li.append(": ", reason);
    return li;
  }

  function render(data) {
    const status = data.status;
    const workers = Array.isArray(data.workers) ? data.workers : [];
    setField("pid", String(status.pid));
    setField("version", status.version);
    setField("uptime", duration(status.uptime_secs));
    setField("generation", String(status.generation));
    setField("last_reload", lastReload(status.last_reload));
    setField("config", status.config);
    document.getElementById("pools-body").replaceChildren(...status.pools.map(poolRow));
    document.getElementById("workers-body").replaceChildren(...workers.map(workerRow));
    const events = recentEvents(status);
    document.getElementById("recent").replaceChildren(...events.map(recentItem));
    document.getElementById("recent-none").hidden = events.length > 0;
  }

  function clock(date) {
    const two = (n) => String(n).padStart(2, "0");
    return two(date.getHours()) + ":" + two(date.getMinutes()) + ":" + two(date.getSeconds());
  }

  async function refresh() {
    const banner = document.getElementById("banner");
    try {
      // From the origin, not the page's address: a page loaded as http://user:token@host/
      // has those credentials in its address, and fetch() refuses a URL with credentials
      // (relative ones resolved against it included). The session cookie authenticates it.
      const url = new URL("/status.json", window.location.origin);
      const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) {
        const text = (await response.text()).trim();
        throw new Error("HTTP " + response.status + (text ? ": " + text : ""));
      }
      render(await response.json());
      banner.hidden = true;
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      document.getElementById("updated").textContent = "updated " + clock(new Date());
    } catch (error) {
      banner.textContent = "master not answering (" + error.message + ")";
      banner.hidden = false;
    } finally {
      setTimeout(refresh, EVERY_MS);
    }
  }

  refresh();
})();
