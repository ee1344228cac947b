// The nix-farm dashboard: plain JavaScript, embedded in the coordinator.
// Follows the farm by server-sent events (/api/events: the overview;
// /api/build/<id>/events: one build and its live log); never reloads.
"use strict";

const state = {
  overview: null,
  skew: 0, // server clock minus ours, ms
  session: { admin: false },
  buildES: null,
  buildId: null,
  build: null,
};

// ───────────── helpers ─────────────

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + " " + u[i];
}

function dur(ms) {
  if (ms < 0) ms = 0;
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
  const hr = Math.floor(m / 60);
  if (hr < 48) return hr + "h " + String(m % 60).padStart(2, "0") + "m";
  return Math.floor(hr / 24) + "d " + (hr % 24) + "h";
}

function serverNow() { return Date.now() + state.skew; }
function ago(ms) { return ms ? dur(serverNow() - ms) + " ago" : "never"; }
function pct(v) { return v === null || v === undefined ? "–" : v.toFixed(1) + "%"; }
function pill(s) { return h("span", { class: "pill s-" + s.replace(/ /g, "-") }, s); }
function buildLink(id, text) { return h("a", { class: "build-link", href: "#/build/" + id }, text); }

function elapsed(startMs) {
  return h("span", { class: "elapsed", "data-start": startMs || "" }, startMs ? dur(serverNow() - startMs) : "–");
}

function tickElapsed() {
  for (const e of document.querySelectorAll(".elapsed[data-start]")) {
    const s = Number(e.dataset.start);
    if (s) e.textContent = dur(serverNow() - s);
  }
}

function bar(used, total, cls) {
  const f = total > 0 ? Math.min(1, used / total) : 0;
  const fill = h("span", { class: "fill" });
  // CSSOM, not a style attribute: the page's CSP allows no inline styles.
  fill.style.width = (f * 100).toFixed(1) + "%";
  return h("span", { class: "bar " + (cls || "") }, fill);
}

function table(id, head, rows, empty) {
  if (!rows.length) return h("p", { id: id, class: "muted empty" }, empty);
  return h("table", { id: id },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows));
}

function section(title, extra, ...body) {
  return h("section", { class: "card" }, h("h2", {}, title, extra ? h("span", { class: "count" }, extra) : null), body);
}

// ───────────── session and admin actions ─────────────

async function loadSession() {
  try {
    const r = await fetch("/api/session", { credentials: "same-origin" });
    state.session = await r.json();
  } catch (e) {
    state.session = { admin: false };
  }
  renderWho();
}

function renderWho() {
  const who = document.getElementById("who");
  who.replaceChildren();
  if (state.session.admin) {
    who.append(h("span", { class: "pill s-admin", title: state.session.who || "" }, "admin"), " ",
      h("button", { class: "small", onclick: logout }, "log out"));
  } else {
    who.append(h("span", { class: "muted", title: "run `farm dashboard` for an admin login link" }, "read-only"));
  }
}

async function logout() {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  await loadSession();
  render();
}

async function setDrain(name, draining) {
  const r = await fetch("/api/builders/" + encodeURIComponent(name) + "/drain", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf || "" },
    body: JSON.stringify({ draining: draining }),
  });
  if (!r.ok) alert("Refused: " + (await r.text()));
}

// ───────────── overview ─────────────

function summary(o) {
  const online = o.builders.filter((b) => b.state !== "offline").length;
  const slots = o.builders.filter((b) => b.state !== "offline").reduce((a, b) => a + b.slots, 0);
  const used = o.builders.reduce((a, b) => a + b.used, 0);
  const queued = o.queue.reduce((a, c) => a + c.runnable + c.waiting, 0);
  const hit = o.cache.hit_rate === null ? "–" : (o.cache.hit_rate * 100).toFixed(0) + "%";
  const tile = (label, value, sub, cls) =>
    h("div", { class: "tile " + (cls || "") }, h("div", { class: "v" }, value), h("div", { class: "l" }, label), sub ? h("div", { class: "sub" }, sub) : null);
  return h("div", { class: "tiles", id: "summary" },
    tile("builders online", online + " / " + o.builders.length, null, online < o.builders.length ? "warn" : "ok"),
    tile("slots used", used + " / " + slots, bar(used, slots)),
    tile("running", o.running.length),
    tile("queued", queued, o.queue.length ? o.queue.length + " class(es)" : null),
    tile("recent failures", o.failures.length, null, o.failures.length ? "bad" : "ok"),
    tile("cache", bytes(o.cache.nar_bytes), o.cache.paths + " paths · " + bytes(o.cache.stored_bytes) + " stored · hit rate " + hit));
}

// "SHA256:… alice@host" → "alice@host" (the fingerprint is in the tooltip).
function clientName(c) {
  if (!c) return "–";
  const i = c.indexOf(" ");
  return i > 0 ? c.slice(i + 1) : c;
}

function counts(pairs) {
  return pairs.filter(([n]) => n > 0).map(([n, l]) => n + " " + l).join(" · ");
}

function builderRows(o) {
  return o.builders.map((b) => {
    const feats = b.supported_features.concat(b.mandatory_features.map((f) => f + "!"));
    const memUsed = b.memory_bytes ? b.memory_bytes - b.memory_available_bytes : 0;
    let toggle = null;
    if (state.session.admin) {
      const draining = b.state === "draining";
      toggle = h("button", {
        class: "small drain" + (draining ? " on" : ""),
        "data-builder": b.name,
        onclick: () => setDrain(b.name, !draining),
      }, draining ? "undrain" : "drain");
    }
    return h("tr", { "data-builder": b.name, class: "b-" + b.state },
      h("td", { class: "name" }, b.name, h("div", { class: "sub" }, b.nix_version)),
      h("td", {}, pill(b.state)),
      h("td", { title: b.systems.join(", ") }, b.systems[0] || "–",
        b.systems.length > 1 ? h("span", { class: "muted" }, " +" + (b.systems.length - 1)) : null),
      h("td", { class: "feats" }, feats.length ? feats.join(", ") : "–"),
      h("td", { class: "slots" }, b.used + " / " + b.slots, bar(b.used, b.slots)),
      h("td", {}, b.load1.toFixed(2), h("span", { class: "muted" }, " · " + b.load5.toFixed(2)),
        b.cores ? h("div", { class: "sub" }, b.cores + " cores") : null),
      h("td", {}, bytes(b.memory_available_bytes) + " free",
        b.memory_bytes ? bar(memUsed, b.memory_bytes, "mem") : null),
      h("td", {}, bytes(b.disk_free_bytes) + " free"),
      h("td", { class: "psi" }, "cpu " + pct(b.cpu_pressure), h("br"), "mem " + pct(b.memory_pressure), h("br"), "io " + pct(b.io_pressure)),
      h("td", {}, ago(b.last_seen_ms)),
      state.session.admin ? h("td", {}, toggle) : null);
  });
}

function renderOverview(view) {
  const o = state.overview;
  if (!o) { view.replaceChildren(h("p", { class: "muted" }, "Waiting for the farm…")); return; }
  const bHead = ["builder", "state", "systems", "features", "slots", "load 1·5m", "memory", "disk", "pressure (PSI)", "last seen"];
  if (state.session.admin) bHead.push("admin");
  const running = o.running.map((b) =>
    h("tr", { "data-build": b.id },
      h("td", {}, buildLink(b.id, b.name), h("div", { class: "sub" }, b.id + (b.attempt > 1 ? " · attempt " + b.attempt : ""))),
      h("td", {}, b.builder || "–"),
      h("td", {}, b.system),
      h("td", {}, elapsed(b.started_ms))));
  const queue = o.queue.map((c) =>
    h("tr", {},
      h("td", {}, c.system),
      h("td", {}, c.features.length ? c.features.join(", ") : "–"),
      h("td", { class: "num" }, c.runnable),
      h("td", { class: "num" }, c.waiting),
      h("td", {}, c.runnable ? dur(c.oldest_runnable_secs * 1000) : "–"),
      h("td", { class: "why" }, c.why)));
  const subs = o.submissions.map((s) => {
    const done = s.built + s.cached + s.failed;
    return h("tr", {},
      h("td", {}, s.id, s.job ? h("div", { class: "sub" }, "job " + s.job) : null),
      h("td", { class: "client", title: s.client || "" }, clientName(s.client)),
      h("td", { class: "progress" }, bar(done, s.total, s.failed ? "bad" : ""),
        h("span", {}, " " + done + " / " + s.total)),
      h("td", {}, counts([[s.built, "built"], [s.cached, "cached"], [s.running, "running"], [s.pending, "pending"]]),
        s.failed ? h("span", { class: "badtext" }, (done > s.failed || s.running || s.pending ? " · " : "") + s.failed + " failed") : null),
      h("td", {}, ago(s.created_ms)));
  });
  const fails = o.failures.map((f) =>
    h("tr", { "data-build": f.id },
      h("td", {}, buildLink(f.id, f.name), h("div", { class: "sub" }, f.id)),
      h("td", {}, f.builder || "–"),
      h("td", { class: "err" }, f.error),
      h("td", {}, ago(f.finished_ms))));
  view.replaceChildren(
    summary(o),
    section("Builders", o.builders.length, table("builders", bHead, builderRows(o), "No builder has joined.")),
    h("div", { class: "cols" },
      section("Running", o.running.length, table("running", ["build", "builder", "system", "elapsed"], running, "Nothing is running.")),
      section("Queue", null, table("queue", ["system", "features", "runnable", "waiting", "oldest", "why the head waits"], queue, "The queue is empty."))),
    h("div", { class: "cols" },
      section("Submissions", o.submissions.length, table("submissions", ["submission", "client", "progress", "builds", "started"], subs, "No submission in progress.")),
      section("Recent failures", o.failures.length, table("failures", ["build", "builder", "error", "when"], fails, "No recent failure."))));
}

// ───────────── build page ─────────────

function renderBuild(view) {
  const b = state.build;
  const top = b ? [
    h("h1", {}, b.name, " ", pill(b.state)),
    h("dl", { class: "facts" },
      h("dt", {}, "build"), h("dd", {}, b.id + (b.attempt > 1 ? " (attempt " + b.attempt + ")" : "")),
      h("dt", {}, "derivation"), h("dd", { class: "mono" }, b.drv_path),
      h("dt", {}, "system"), h("dd", {}, b.system + (b.features.length ? " · " + b.features.join(", ") : "")),
      h("dt", {}, "builder"), h("dd", {}, b.builder || "–"),
      h("dt", {}, b.finished_ms ? "took" : "elapsed"),
      h("dd", {}, b.finished_ms && b.started_ms ? dur(b.finished_ms - b.started_ms) : b.state === "running" ? elapsed(b.started_ms) : "–"),
      b.error ? [h("dt", {}, "error"), h("dd", { class: "err" }, b.error)] : null,
      h("dt", {}, b.state === "built" || b.state === "cached" ? "outputs" : "outputs (once built)"),
      h("dd", { id: "outputs", class: "mono" },
        Object.keys(b.outputs).length
          ? Object.entries(b.outputs).map(([k, v]) => h("div", {}, h("span", { class: "muted" }, k + ": "), v))
          : "–")),
  ] : [h("h1", {}, state.buildId)];
  let log = document.getElementById("log");
  if (!log) {
    log = h("pre", { id: "log", class: "log" });
  }
  const logState = document.getElementById("log-state") || h("span", { id: "log-state", class: "muted" }, "following…");
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/" }, "← overview")),
    h("section", { class: "card" }, top),
    h("section", { class: "card" }, h("h2", {}, "Log ", logState), log));
}

function openBuild(id) {
  if (state.buildES) state.buildES.close();
  state.buildId = id;
  state.build = null;
  const old = document.getElementById("log");
  if (old) old.remove();
  const es = new EventSource("/api/build/" + encodeURIComponent(id) + "/events");
  state.buildES = es;
  es.addEventListener("reset", () => {
    const log = document.getElementById("log");
    if (log) log.textContent = "";
  });
  es.addEventListener("build", (e) => {
    const d = JSON.parse(e.data);
    state.skew = d.now_ms - Date.now();
    state.build = d;
    if (route().build === id) render();
  });
  es.addEventListener("log", (e) => {
    const log = document.getElementById("log");
    if (!log) return;
    const follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(document.createTextNode(JSON.parse(e.data)));
    if (follow) log.scrollTop = log.scrollHeight;
  });
  es.addEventListener("ended", () => {
    const s = document.getElementById("log-state");
    if (s) s.textContent = "complete";
  });
  es.addEventListener("end", () => {
    es.close();
    const s = document.getElementById("log-state");
    if (s) s.textContent = "complete";
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED && state.buildES === es) {
      const s = document.getElementById("log-state");
      if (s) s.textContent = "not available";
    }
  };
}

// ───────────── routing ─────────────

function route() {
  const m = location.hash.match(/^#\/build\/([^/]+)$/) || location.pathname.match(/^\/build\/([^/]+)$/);
  return m ? { build: decodeURIComponent(m[1]) } : { build: null };
}

function render() {
  const view = document.getElementById("view");
  const r = route();
  document.body.dataset.page = r.build ? "build" : "overview";
  if (r.build) {
    if (state.buildId !== r.build) openBuild(r.build);
    renderBuild(view);
  } else {
    if (state.buildES) { state.buildES.close(); state.buildES = null; state.buildId = null; }
    renderOverview(view);
  }
}

function connect() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/events");
  es.addEventListener("overview", (e) => {
    const d = JSON.parse(e.data);
    state.skew = d.now_ms - Date.now();
    state.overview = d;
    live.textContent = "live";
    live.className = "live on";
    if (!route().build) render();
  });
  es.onerror = () => {
    live.textContent = "reconnecting…";
    live.className = "live off";
  };
}

window.addEventListener("hashchange", render);
setInterval(tickElapsed, 1000);
loadSession().then(render);
connect();
