// jobqueue dashboard: refreshes server-rendered parts of a page in place, draws the overview's
// charts, and sends actions to the API. Plain JavaScript, no dependencies, no build step.
//
// Refreshing fetches the same page again and swaps every element marked data-live for its new
// version, so the HTML (and its escaping) is made in one place: the server. Actions POST JSON to
// the API endpoints (/jobs/{id}/cancel, ...); with tokens on, the browser's session cookie
// authenticates them and the server checks that they come from this origin.
"use strict";

(function () {
  const page = document.body.dataset.page;
  const REFRESH_MS = 2000;

  function flash(text, bad) {
    const box = document.getElementById("flash");
    if (!box) return;
    const div = document.createElement("div");
    div.textContent = text;
    if (bad) div.className = "bad";
    box.appendChild(div);
    setTimeout(() => div.remove(), 5000);
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    } else if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(path, init);
    let json = null;
    try { json = await resp.json(); } catch (_) { /* an empty answer */ }
    return { ok: resp.ok, status: resp.status, json };
  }

  // ---------------------------------------------------------------------------------------------
  // In-place refresh of data-live sections.

  let refreshing = false;
  async function refreshLive() {
    if (refreshing) return;
    refreshing = true;
    try {
      const resp = await fetch(location.href, { credentials: "same-origin" });
      if (resp.status === 401) { location.reload(); return; }
      if (!resp.ok) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const picked = new Set([...document.querySelectorAll("input.pick:checked")].map((c) => c.value));
      for (const old of document.querySelectorAll("[data-live]")) {
        const fresh = doc.getElementById(old.id);
        if (fresh) old.replaceWith(document.adoptNode(fresh));
      }
      for (const c of document.querySelectorAll("input.pick")) c.checked = picked.has(c.value);
      updatePicked();
    } catch (_) {
      // The server is restarting or the network is gone: the next tick tries again.
    } finally {
      refreshing = false;
    }
  }

  function autoRefresh() {
    if (page === "overview" || page === "queues") return true;
    if (page === "job") {
      const live = document.getElementById("job-live");
      return live && live.dataset.finished !== "true";
    }
    if (page === "jobs") {
      const box = document.getElementById("autorefresh");
      return box && box.checked;
    }
    return false;
  }

  // ---------------------------------------------------------------------------------------------
  // Actions.

  async function act(action, target) {
    const paths = {
      cancel: (id) => `/jobs/${encodeURIComponent(id)}/cancel`,
      retry: (id) => `/jobs/${encodeURIComponent(id)}/retry`,
      pause: (q) => `/queues/${encodeURIComponent(q)}/pause`,
      resume: (q) => `/queues/${encodeURIComponent(q)}/resume`,
    };
    return api("POST", paths[action](target));
  }

  function describe(r) {
    return r.json && r.json.message ? r.json.message : `HTTP ${r.status}`;
  }

  document.addEventListener("click", async (ev) => {
    const el = ev.target.closest("button");
    if (!el) return;
    if (el.dataset.action) {
      el.disabled = true;
      const target = el.dataset.id || el.dataset.queue;
      const r = await act(el.dataset.action, target);
      if (r.ok) flash(`${el.dataset.action}: done`);
      else flash(`${el.dataset.action} refused: ${describe(r)}`, true);
      await refreshLive();
    } else if (el.dataset.bulk) {
      const ids = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
      if (ids.length === 0) { flash("Select jobs first", true); return; }
      el.disabled = true;
      let ok = 0;
      const refused = [];
      for (const id of ids) {
        const r = await act(el.dataset.bulk, id);
        if (r.ok) ok++; else refused.push(`${id.slice(0, 8)}: ${describe(r)}`);
      }
      flash(`${el.dataset.bulk}: ${ok} of ${ids.length} jobs` + (refused.length ? `; ${refused.join("; ")}` : ""), refused.length > 0);
      for (const c of document.querySelectorAll("input.pick")) c.checked = false;
      el.disabled = false;
      await refreshLive();
    } else if (el.dataset.copy) {
      const text = document.getElementById(el.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        flash("Copied");
      } catch (_) {
        // No clipboard permission (plain HTTP on another host): select it for the user to copy.
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(el.dataset.copy));
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        flash("Selected: press Ctrl+C to copy");
      }
    } else if (el.id === "logout") {
      await api("DELETE", "/ui/session");
      location.href = "/ui";
    }
  });

  function updatePicked() {
    const n = document.querySelectorAll("input.pick:checked").length;
    const out = document.getElementById("picked");
    if (out) out.textContent = n ? `${n} selected` : "";
  }

  document.addEventListener("change", (ev) => {
    if (ev.target.id === "pick-all") {
      for (const c of document.querySelectorAll("input.pick")) c.checked = ev.target.checked;
    }
    if (ev.target.id === "autorefresh") {
      localStorage.setItem("jobqueue.autorefresh", ev.target.checked ? "1" : "0");
    }
    updatePicked();
  });

  // ---------------------------------------------------------------------------------------------
  // Sign-in and the scope badge.

  const login = document.getElementById("login");
  if (login) {
    login.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const r = await api("POST", "/ui/session", { token: document.getElementById("token").value });
      if (r.ok) location.reload();
      else document.getElementById("login-error").textContent = describe(r);
    });
  }

  async function whoami() {
    const out = document.getElementById("whoami");
    if (!out) return;
    const r = await api("GET", "/whoami");
    if (r.ok && r.json) {
      out.textContent = r.json.auth ? `scope: ${r.json.scopes.join(", ")}` : "open (no tokens configured)";
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Charts: hand-drawn SVG polylines, one card per queue.

  const SVG = "http://www.w3.org/2000/svg";
  const W = 300, H = 56;

  // One path per series; a gap (null: nothing claimed in that bucket) lifts the pen, and a point
  // alone between gaps gets a short tick so that it shows.
  function line(svg, values, max, cls) {
    const n = values.length;
    let d = "";
    let run = 0;
    values.forEach((v, i) => {
      if (v === null || v === undefined) {
        if (run === 1) d += "h3 ";
        run = 0;
        return;
      }
      const x = (i / Math.max(n - 1, 1)) * W;
      const y = H - 2 - (max > 0 ? (v / max) * (H - 6) : 0);
      d += `${run ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)} `;
      run++;
    });
    if (run === 1) d += "h-3 ";
    if (!d) return;
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d.trim());
    path.setAttribute("class", cls);
    svg.appendChild(path);
  }

  function chart(kind, title, series, format) {
    const wrap = document.createElement("div");
    wrap.className = "chart";
    wrap.dataset.kind = kind;
    const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
    const max = all.length ? Math.max(...all) : 0;
    const label = document.createElement("div");
    label.className = "label";
    const name = document.createElement("span");
    name.textContent = title;
    const now = document.createElement("span");
    for (const s of series) {
      const last = [...s.values].reverse().find((v) => v !== null && v !== undefined);
      const b = document.createElement("b");
      b.className = s.key;
      b.textContent = ` ${s.name} ${last === undefined ? "–" : format(last)}`;
      now.appendChild(b);
    }
    label.append(name, now);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${title}, last 15 minutes, peak ${format(max)}`);
    const axis = document.createElementNS(SVG, "line");
    axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(W));
    axis.setAttribute("y1", String(H - 1)); axis.setAttribute("y2", String(H - 1));
    axis.setAttribute("class", "axis");
    svg.appendChild(axis);
    for (const s of series) line(svg, s.values, max, s.cls);
    wrap.append(label, svg);
    return wrap;
  }

  function seconds(v) {
    if (v < 1) return `${Math.round(v * 1000)} ms`;
    if (v < 60) return `${v.toFixed(1)} s`;
    return `${Math.round(v / 60)} min`;
  }

  async function drawCharts() {
    const box = document.getElementById("charts");
    if (!box) return;
    const r = await api("GET", "/stats/history");
    if (!r.ok || !r.json) return;
    const h = r.json;
    const inst = document.getElementById("wait-instance");
    if (inst) inst.textContent = h.instance;
    const cards = [];
    for (const q of h.queues) {
      const card = document.createElement("div");
      card.className = "chart-card";
      card.dataset.queue = q.queue;
      const title = document.createElement("h3");
      title.textContent = q.queue;
      const perSec = (xs) => xs.map((n) => n / h.bucket_secs);
      card.append(
        title,
        chart("finished", "finished per second", [
          { name: "all", key: "key1", cls: "s1", values: perSec(q.finished) },
          { name: "failed", key: "error", cls: "bad", values: perSec(q.failed) },
        ], (v) => `${v.toFixed(1)}/s`),
        chart("wait", "wait", [
          { name: "p50", key: "key1", cls: "s1", values: q.wait_p50_secs },
          { name: "p95", key: "key2", cls: "s2", values: q.wait_p95_secs },
        ], seconds),
      );
      cards.push(card);
    }
    if (cards.length === 0) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = "Nothing finished or claimed in the last 15 minutes.";
      cards.push(p);
    }
    box.replaceChildren(...cards);
  }

  // ---------------------------------------------------------------------------------------------

  if (page !== "login" && page !== "error") whoami();
  const box = document.getElementById("autorefresh");
  if (box) box.checked = localStorage.getItem("jobqueue.autorefresh") === "1";
  if (page === "overview") drawCharts();
  setInterval(() => {
    if (document.hidden) return;
    if (autoRefresh()) refreshLive();
    if (page === "overview") drawCharts();
  }, REFRESH_MS);
})();
