/* Perspective dashboard: polls the JSON API and fills the page. The operator token is kept
 * in sessionStorage (this tab only) and sent as a bearer token; it is never put in a URL.
 * All text goes through textContent, so names and messages from participants cannot inject
 * markup. */
(function () {
  "use strict";
  const API = "/api/v1";
  const KEY = "perspectiveToken";
  const body = document.body;
  const page = body.dataset.page;
  const pollMs = Number(body.dataset.pollMs) || 3000;
  const samples = [];  // client-side samples of cumulative totals, for rate charts

  const token = () => sessionStorage.getItem(KEY);
  const $ = id => document.getElementById(id);
  const fmtInt = n => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en");
  const fmtLoss = v => (v === null || v === undefined) ? "–" : Number(v).toFixed(4);
  const fmtTime = s => s ? new Date(s).toLocaleTimeString() : "–";
  const fmtBytes = n => {
    if (n === null || n === undefined) { return "–"; }
    const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0; let v = Number(n);
    while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
    return v.toFixed(i ? 1 : 0) + " " + u[i];
  };

  function banner(msg) { const b = $("banner"); b.textContent = msg || ""; b.hidden = !msg; }

  async function api(path, opts) {
    opts = opts || {};
    const headers = Object.assign({"Accept": "application/json"}, opts.headers || {});
    if (token()) { headers["Authorization"] = "Bearer " + token(); }
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; }
    const res = await fetch(API + path, {
      method: opts.method || "GET", headers,
      body: opts.json !== undefined ? JSON.stringify(opts.json) : undefined,
    });
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error((data && data.detail ? JSON.stringify(data.detail) : res.statusText));
      err.status = res.status; throw err;
    }
    return data;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td"); td.textContent = text === undefined ? "" : String(text);
    if (cls) { td.className = cls; }
    tr.appendChild(td); return td;
  }
  function fillTable(id, rows, build) {
    const tbody = document.querySelector("#" + id + " tbody");
    const frag = document.createDocumentFragment();
    rows.forEach((row, i) => { const tr = document.createElement("tr"); build(tr, row, i); frag.appendChild(tr); });
    tbody.replaceChildren(frag);
  }
  function stateCell(tr, state) { return cell(tr, state, "state-" + state); }
  function link(td, href, text) {
    const a = document.createElement("a"); a.href = href; a.textContent = text; td.replaceChildren(a);
  }
  function legend(id, items) {
    const el = $(id); if (!el) { return; }
    el.replaceChildren(...items.map(([color, text]) => {
      const s = document.createElement("span"); const i = document.createElement("i");
      i.style.background = color; s.append(i, document.createTextNode(text)); return s;
    }));
  }

  // ------------------------------------------------------------------ login
  async function refreshLogin() {
    const state = $("login-state");
    const clear = $("token-clear");
    body.classList.remove("is-operator");
    if (!token()) { state.textContent = "read-only"; state.className = ""; clear.hidden = true; return; }
    clear.hidden = false;
    try {
      await api("/tokens");  // operator-only: tells whether the token is an operator's
      state.textContent = "operator"; state.className = "operator"; body.classList.add("is-operator");
    } catch (e) {
      state.textContent = e.status === 403 ? "read token" : "token refused"; state.className = "";
    }
  }
  $("token-save").addEventListener("click", async () => {
    const v = $("token-input").value.trim();
    if (v) { sessionStorage.setItem(KEY, v); }
    $("token-input").value = "";
    await refreshLogin(); await tick();
  });
  $("token-clear").addEventListener("click", async () => {
    sessionStorage.removeItem(KEY); await refreshLogin(); await tick();
  });

  // ------------------------------------------------------------------ status
  async function loadStatus() {
    const s = await api("/status");
    $("st-stage").textContent = s.stage ? s.stage + (s.stage_job_state ? " (" + s.stage_job_state + ")" : "") : "–";
    $("st-version").textContent = s.global_version === null ? "–" : "v" + s.global_version;
    $("st-tokens").textContent = fmtInt(s.tokens_trained);
    $("st-val").textContent = fmtLoss(s.latest_val_loss);
    $("st-online").textContent = s.participants_online + " / " + Object.values(s.participants).reduce((a, b) => a + b, 0);
    $("st-updated").textContent = new Date().toLocaleTimeString();
    samples.push({t: Date.now() / 1000, up: s.bytes_up, down: s.bytes_down,
                  tokens: s.tokens_trained, busy: s.busy_participants, online: s.participants_online});
    if (samples.length > 600) { samples.shift(); }
    return s;
  }

  // ------------------------------------------------------------------ pages
  const t0 = Date.now() / 1000;
  const rel = s => s - t0;
  const secs = x => (Math.abs(x) < 10 ? x.toFixed(1) : x.toFixed(0)) + "s";

  function rates(key) {
    const out = [];
    for (let i = 1; i < samples.length; i++) {
      const dt = samples[i].t - samples[i - 1].t;
      if (dt > 0) { out.push([rel(samples[i].t), (samples[i][key] - samples[i - 1][key]) / dt]); }
    }
    return out;
  }

  async function overview() {
    const h = await api("/metrics/history");
    const vs = h.versions;
    const train = vs.filter(v => v.train_loss !== null).map(v => [v.version, v.train_loss]);
    const val = vs.filter(v => v.val_loss !== null).map(v => [v.version, v.val_loss]);
    drawLineChart($("chart-loss"), [{name: "train", color: "#2f6fde", points: train},
                                    {name: "val", color: "#e07b00", points: val}],
                  {xLabel: x => "v" + Math.round(x), yLabel: y => y.toFixed(2)});
    const last = vs.length ? vs[vs.length - 1] : null;
    legend("legend-loss", [["#2f6fde", "train " + fmtLoss(last && last.train_loss)],
                           ["#e07b00", "val " + fmtLoss(last && last.val_loss)],
                           ["#999", vs.length + " versions, stages: " + [...new Set(vs.map(v => v.stage))].join(", ")]]);
    drawLineChart($("chart-tokens"), [{name: "tokens", color: "#1e8e3e", points: vs.map(v => [v.version, v.tokens_cumulative])}],
                  {xLabel: x => "v" + Math.round(x), yLabel: fmtInt});
    legend("legend-tokens", [["#1e8e3e", fmtInt(last ? last.tokens_cumulative : 0) + " tokens applied"]]);
    const util = samples.filter(s => s.online > 0).map(s => [rel(s.t), s.busy / s.online]);
    const tps = rates("tokens");
    drawLineChart($("chart-rate"), [{name: "tokens/s", color: "#7a3fd1", points: tps},
                                    {name: "utilisation", color: "#999", points: util.map(p => [p[0], p[1] * Math.max(1, ...tps.map(q => q[1]))])}],
                  {xLabel: secs, yLabel: fmtInt});
    legend("legend-rate", [["#7a3fd1", (h.tokens_per_s === null ? "–" : fmtInt(Math.round(h.tokens_per_s))) + " tokens/s (server window)"],
                           ["#999", "utilisation " + (util.length ? Math.round(100 * util[util.length - 1][1]) + "%" : "–") + " (scaled)"]]);
    drawLineChart($("chart-bytes"), [{name: "up", color: "#2f6fde", points: samples.map(s => [rel(s.t), s.up])},
                                     {name: "down", color: "#e07b00", points: samples.map(s => [rel(s.t), s.down])}],
                  {xLabel: secs, yLabel: fmtBytes});
    const s = samples[samples.length - 1];
    legend("legend-bytes", [["#2f6fde", "up " + fmtBytes(s && s.up)], ["#e07b00", "down " + fmtBytes(s && s.down)]]);
    fillTable("versions-table", vs.slice(-15).reverse(), (tr, v) => {
      cell(tr, "v" + v.version); cell(tr, v.stage || ""); cell(tr, fmtTime(v.created_at));
      cell(tr, fmtLoss(v.val_loss), "num"); cell(tr, fmtLoss(v.train_loss), "num"); cell(tr, fmtInt(v.tokens_applied), "num");
    });
  }

  async function participants() {
    const [page, board] = await Promise.all([api("/participants?limit=1000"), api("/participants/leaderboard?limit=20")]);
    fillTable("participants-table", page.items, (tr, p) => {
      cell(tr, p.id); link(cell(tr, ""), "/participants/" + p.id, p.name); stateCell(tr, p.state);
      cell(tr, p.device || ""); cell(tr, p.tokens_per_s === null ? "–" : Math.round(p.tokens_per_s), "num");
      cell(tr, p.units_done, "num"); cell(tr, p.units_rejected, "num"); cell(tr, fmtInt(p.credit), "num");
      cell(tr, fmtBytes(p.bytes_up), "num"); cell(tr, fmtBytes(p.bytes_down), "num"); cell(tr, fmtTime(p.last_seen));
    });
    fillTable("leaderboard-table", board, (tr, p, i) => {
      cell(tr, i + 1); link(cell(tr, ""), "/participants/" + p.id, p.name);
      cell(tr, fmtInt(p.credit), "num"); cell(tr, p.units_done, "num");
    });
  }

  async function participant() {
    const id = body.dataset.participantId;
    const [p, units, results] = await Promise.all([
      api("/participants/" + id), api("/units?limit=50&participant_id=" + id), api("/results?limit=50&participant_id=" + id)]);
    $("p-title").textContent = p.name + " (#" + p.id + ")";
    const facts = [["state", p.state], ["node id", p.node_id], ["device", p.device], ["threads", p.threads],
      ["columns held", p.columns.join(", ") || "none"], ["units in flight", p.units_in_flight],
      ["units done", p.units_done], ["units rejected", p.units_rejected], ["credit (tokens)", fmtInt(p.credit)],
      ["throughput", p.tokens_per_s === null ? "–" : Math.round(p.tokens_per_s) + " tokens/s"],
      ["bytes up / down", fmtBytes(p.bytes_up) + " / " + fmtBytes(p.bytes_down)], ["last seen", fmtTime(p.last_seen)]];
    $("p-facts").replaceChildren(...facts.flatMap(([k, v]) => {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v === null || v === undefined ? "–" : String(v);
      return [dt, dd];
    }));
    fillTable("p-reasons", Object.entries(p.rejected_by_reason), (tr, [r, n]) => { cell(tr, r); cell(tr, n, "num"); });
    fillTable("p-units", units.items, (tr, u) => {
      cell(tr, u.unit_id.slice(0, 8)); cell(tr, u.stage); cell(tr, "v" + u.base_version); cell(tr, u.columns.join(","));
      stateCell(tr, u.state); cell(tr, u.state_reason || ""); cell(tr, fmtTime(u.created_at));
    });
    fillTable("p-results", results.items, (tr, r) => {
      cell(tr, r.unit_id.slice(0, 8)); stateCell(tr, r.state); cell(tr, r.reject_reason || "");
      cell(tr, fmtInt(r.tokens), "num"); cell(tr, fmtLoss(r.train_loss), "num"); cell(tr, fmtLoss(r.val_loss), "num");
      cell(tr, fmtTime(r.received_at));
    });
  }

  const ACTIONS = {queued: ["start", "cancel"], running: ["pause", "cancel"], paused: ["resume", "cancel"], failed: ["retry"]};
  async function act(jobId, action) {
    const b = $("banner");
    try { await api("/stage-jobs/" + jobId + "/" + action, {method: "POST", json: {reason: "dashboard"}}); delete b.dataset.sticky; banner(""); }
    catch (e) { b.dataset.sticky = "1"; banner("Could not " + action + " job " + jobId + ": " + e.message); }
    await tick();
  }
  async function stages() {
    const jobs = await api("/stage-jobs?limit=100");
    fillTable("jobs-table", jobs.items, (tr, j) => {
      tr.dataset.jobId = j.id;
      cell(tr, j.id); cell(tr, j.stage); stateCell(tr, j.state).dataset.testid = "job-state";
      cell(tr, j.reason || ""); cell(tr, JSON.stringify(j.progress)); cell(tr, fmtTime(j.updated_at));
      const td = cell(tr, "");
      if (body.classList.contains("is-operator")) {
        for (const a of ACTIONS[j.state] || []) {
          const b = document.createElement("button"); b.type = "button"; b.textContent = a;
          b.dataset.action = a; b.addEventListener("click", () => act(j.id, a)); td.appendChild(b);
        }
      }
    });
  }
  const form = $("new-job");
  if (form) {
    form.addEventListener("submit", async ev => {
      ev.preventDefault();
      let config;
      try { config = JSON.parse(form.config.value || "{}"); } catch (e) { banner("config is not valid JSON: " + e.message); return; }
      try { await api("/stage-jobs", {method: "POST", json: {stage: form.stage.value, config, start: form.start.checked}}); banner(""); }
      catch (e) { banner("Could not queue the job: " + e.message); }
      await tick();
    });
  }

  async function rejected() {
    const page = await api("/results?state=rejected&limit=200");
    fillTable("rejected-table", page.items, (tr, r) => {
      cell(tr, fmtTime(r.received_at)); link(cell(tr, ""), "/participants/" + r.participant_id, "#" + r.participant_id);
      cell(tr, r.unit_id.slice(0, 8)); cell(tr, r.reject_reason, "state-rejected"); cell(tr, r.reject_detail || ""); cell(tr, "v" + r.base_version);
    });
  }

  async function events() {
    const head = await api("/events?limit=1");
    const page = await api("/events?limit=200&offset=" + Math.max(0, head.total - 200));
    fillTable("events-table", page.items.slice().reverse(), (tr, e) => {
      cell(tr, e.id); cell(tr, fmtTime(e.ts)); cell(tr, e.kind); cell(tr, e.participant_id === null ? "" : "#" + e.participant_id); cell(tr, e.message);
    });
  }

  const PAGES = {overview, participants, participant, stages, rejected, events};
  let busy = false;
  async function tick() {
    if (busy) { return; }
    busy = true;
    try {
      await loadStatus();
      if (PAGES[page]) { await PAGES[page](); }
      if (!$("banner").dataset.sticky) { banner(""); }
    } catch (e) {
      banner(e.status === 401 || e.status === 403 ? "This coordinator needs a token to read: paste one above. (" + e.message + ")" : "Update failed: " + e.message);
    } finally { busy = false; }
  }
  refreshLogin().then(tick);
  setInterval(tick, pollMs);
})();
