/* The property managers' page: plain JS, no build step, nothing loaded from outside.
 *
 * Logs in (POST /api/v1/auth/login) and keeps the token in sessionStorage; every API call sends it as
 * `Authorization: Bearer`. The incidents' live stream (GET /api/v1/incidents/stream) takes its credential
 * from that header only, which EventSource cannot send: it is read with fetch() and a stream reader, and
 * resumed after the last event id (`?after=`) when the connection drops.
 *
 * Views follow the URL (history API): /app/board, /app/site, /app/overview, /app/devices/<id>.
 */
"use strict";

(function () {
  const TOKEN_KEY = "sc.token";
  const ME_KEY = "sc.me";
  const LANG_KEY = "sc.lang";
  const URGENCY_ORDER = { P1: 0, P2: 1, P3: 2, P4: 3 };
  const RECONNECT_MS = 2000;

  const I18N = {
    zh: {
      title: "智慧社区物业告警",
      "nav.board": "告警", "nav.site": "设备分布", "nav.overview": "统计",
      logout: "退出",
      "login.title": "登录", "login.username": "用户名", "login.password": "密码", "login.submit": "登录",
      "login.failed": "用户名或密码错误", "login.locked": "登录失败次数过多，请稍后再试",
      "board.title": "实时告警", "board.showResolved": "显示已解除", "board.empty": "暂无告警",
      "board.count": (n) => `共 ${n} 条`,
      "site.title": "设备分布",
      "site.unplaced": (ids) => `无坐标的设备：${ids}`,
      "site.none": "范围内没有设备",
      "state.online": "在线", "state.offline": "离线", "state.unknown": "未上报", "state.incident": "有告警",
      "live.live": "实时", "live.connecting": "连接中…", "live.off": "未连接",
      "incident.ack": "确认", "incident.acked": (by, at) => `已确认 ${at}（${by}）`,
      "incident.resolved": "已解除", "incident.open": "未解除", "incident.occurrences": (n) => `${n} 次`,
      "incident.opened": "发生于", "incident.device": "设备",
      "device.back": "← 返回设备分布", "device.notFound": "未找到该设备",
      "device.notFoundHint": "设备不存在，或不在您的管辖范围内。",
      "device.readings": "读数", "device.field": "字段", "device.range": "时间范围",
      "device.incidents": "告警记录", "device.noIncidents": "无告警记录",
      "device.noNumeric": "该设备类型没有数值字段",
      "device.noData": "此时间范围内没有读数",
      "device.unavailable": "读数暂时无法获取（时序数据库不可用）",
      "fact.type": "类型", "fact.community": "社区", "fact.grid": "网格", "fact.building": "楼栋",
      "fact.address": "地址", "fact.lifecycle": "状态", "fact.online": "在线状态", "fact.lastSeen": "最近上报",
      "fact.unit": "责任单位", "fact.open": "未解除告警",
      "overview.title": "统计", "overview.by": "分组", "overview.community": "社区", "overview.grid": "网格",
      "overview.group": "分组", "overview.devices": "设备", "overview.open": "未解除告警",
      "overview.total": "合计", "overview.building": "楼栋", "overview.type": "设备类型",
      "overview.unacked": "未确认", "overview.acked": "已确认", "overview.resolved": "24小时内解除",
      yes: "是", no: "否", none: "—",
      "error.forbidden": "没有权限", "error.generic": "出错了：",
    },
    en: {
      title: "Smart community alerts",
      "nav.board": "Alerts", "nav.site": "Site", "nav.overview": "Overview",
      logout: "Log out",
      "login.title": "Log in", "login.username": "Username", "login.password": "Password", "login.submit": "Log in",
      "login.failed": "Wrong username or password", "login.locked": "Too many failed logins: try again later",
      "board.title": "Live alerts", "board.showResolved": "Show resolved", "board.empty": "No alerts",
      "board.count": (n) => `${n} in all`,
      "site.title": "Site",
      "site.unplaced": (ids) => `Devices without coordinates: ${ids}`,
      "site.none": "No devices in your scope",
      "state.online": "Online", "state.offline": "Offline", "state.unknown": "No status yet", "state.incident": "Open alert",
      "live.live": "Live", "live.connecting": "Connecting…", "live.off": "Not connected",
      "incident.ack": "Acknowledge", "incident.acked": (by, at) => `Acknowledged ${at} (${by})`,
      "incident.resolved": "Resolved", "incident.open": "Open", "incident.occurrences": (n) => `${n}×`,
      "incident.opened": "Opened", "incident.device": "Device",
      "device.back": "← Back to the site", "device.notFound": "Device not found",
      "device.notFoundHint": "It does not exist, or it is outside your communities.",
      "device.readings": "Readings", "device.field": "Field", "device.range": "Range",
      "device.incidents": "Incident history", "device.noIncidents": "No incidents",
      "device.noNumeric": "This device type has no numeric fields",
      "device.noData": "No readings in this range",
      "device.unavailable": "Readings are unavailable right now (the time-series database does not answer)",
      "fact.type": "Type", "fact.community": "Community", "fact.grid": "Grid", "fact.building": "Building",
      "fact.address": "Address", "fact.lifecycle": "Lifecycle", "fact.online": "Online", "fact.lastSeen": "Last seen",
      "fact.unit": "Responsible unit", "fact.open": "Open alerts",
      "overview.title": "Overview", "overview.by": "Group by", "overview.community": "Community", "overview.grid": "Grid",
      "overview.group": "Group", "overview.devices": "Devices", "overview.open": "Open alerts",
      "overview.total": "Total", "overview.building": "Building", "overview.type": "Device type",
      "overview.unacked": "Unacknowledged", "overview.acked": "Acknowledged", "overview.resolved": "Resolved (24 h)",
      yes: "yes", no: "no", none: "—",
      "error.forbidden": "Not allowed", "error.generic": "Something went wrong: ",
    },
  };

  const $ = (sel) => document.querySelector(sel);
  const state = {
    lang: localStorage.getItem(LANG_KEY) === "en" ? "en" : "zh",
    token: sessionStorage.getItem(TOKEN_KEY),
    me: JSON.parse(sessionStorage.getItem(ME_KEY) || "null"),
    incidents: new Map(), // incident_id -> incident (the board)
    fresh: new Set(),
    stream: null, // AbortController of the live stream
    cursor: null, // the last event id seen
    live: "off",
    device: null, // { status, readings, field }
    view: null,
  };

  function t(key, ...args) {
    const v = I18N[state.lang][key] ?? I18N.zh[key] ?? key;
    return typeof v === "function" ? v(...args) : v;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    // the SVG namespace, taken from the page's own <svg> (no URL written here)
    const node = document.createElementNS($("#chart").namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmtTime(iso) {
    if (!iso) return t("none");
    const d = new Date(iso);
    return d.toLocaleString(state.lang === "zh" ? "zh-CN" : "en-GB", { hour12: false });
  }

  function showError(message) {
    const p = $("#error");
    p.textContent = message || "";
    p.hidden = !message;
  }

  // -- the API -------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    if (options.json !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method: options.method || "GET",
      headers,
      body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
      signal: options.signal,
    });
    if (resp.status === 204) return null;
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      body = null;
    }
    if (!resp.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : resp.statusText;
      if (resp.status === 401 && state.token) {
        loggedOut();
      }
      throw new ApiError(resp.status, detail);
    }
    return body;
  }

  // -- language ------------------------------------------------------------------------------------

  function applyLanguage() {
    document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
    for (const node of document.querySelectorAll("[data-i18n]")) {
      node.textContent = t(node.dataset.i18n);
    }
    $("#lang-toggle").textContent = state.lang === "zh" ? "EN" : "中文";
    document.title = t("title");
    setLive(state.live);
    if (state.token) render();
  }

  // -- log in and out ------------------------------------------------------------------------------

  async function login(event) {
    event.preventDefault();
    const error = $("#login-error");
    error.hidden = true;
    const username = $("#username").value.trim();
    const password = $("#password").value;
    try {
      const session = await api("/api/v1/auth/login", { method: "POST", json: { username, password } });
      state.token = session.access_token;
      sessionStorage.setItem(TOKEN_KEY, state.token);
      state.me = await api("/api/v1/me");
      sessionStorage.setItem(ME_KEY, JSON.stringify(state.me));
      $("#password").value = "";
      const wanted = location.pathname.startsWith("/app/") && location.pathname !== "/app/login";
      navigate(wanted ? location.pathname : "/app/board", !wanted);
    } catch (exc) {
      error.textContent = exc.status === 429 ? t("login.locked") : exc.status === 401 ? t("login.failed") : String(exc.message);
      error.hidden = false;
    }
  }

  async function logout() {
    try {
      await api("/api/v1/auth/logout", { method: "POST" });
    } catch (_) {
      // the session is dropped here whatever the API said
    }
    loggedOut();
    history.replaceState(null, "", "/app/login");
  }

  function loggedOut() {
    state.token = null;
    state.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ME_KEY);
    stopStream();
    state.incidents.clear();
    render();
  }

  function canAck() {
    return state.me && (state.me.role === "manager" || state.me.role === "admin");
  }

  // -- navigation ----------------------------------------------------------------------------------

  function navigate(path, replace) {
    if (replace) history.replaceState(null, "", path);
    else history.pushState(null, "", path);
    route();
  }

  function route() {
    if (!state.token) {
      state.view = "login";
      render();
      return;
    }
    const path = location.pathname.replace(/\/+$/, "");
    const device = path.match(/^\/app\/devices\/(.+)$/);
    if (device) {
      state.view = "device";
      loadDevice(decodeURIComponent(device[1]));
    } else if (path === "/app/site") {
      state.view = "site";
      loadSite();
    } else if (path === "/app/overview") {
      state.view = "overview";
      loadOverview();
    } else {
      state.view = "board";
      if (path !== "/app/board") history.replaceState(null, "", "/app/board");
    }
    startStream();
    render();
  }

  function render() {
    const loggedIn = Boolean(state.token);
    $("#nav").hidden = !loggedIn;
    $("#logout").hidden = !loggedIn;
    $("#live-status").hidden = !loggedIn;
    $("#who").textContent = loggedIn && state.me ? `${state.me.name} · ${state.me.role}` : "";
    const view = loggedIn ? state.view || "board" : "login";
    for (const section of document.querySelectorAll(".view")) {
      section.hidden = section.id !== `view-${view}`;
    }
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("active", a.dataset.view === view);
    }
    if (view === "board") renderBoard();
    if (view === "site") renderSite();
    if (view === "device") renderDevice();
    if (view === "overview") renderOverview();
  }

  // -- the board and its live stream ---------------------------------------------------------------

  function newer(incoming, existing) {
    return !existing || !(incoming.updated_at < existing.updated_at);
  }

  function upsert(incident, fresh) {
    const existing = state.incidents.get(incident.incident_id);
    if (!newer(incident, existing)) return;
    state.incidents.set(incident.incident_id, incident);
    if (fresh) state.fresh.add(incident.incident_id);
  }

  async function loadIncidents() {
    const status = $("#show-resolved").checked ? "all" : "open";
    const page = await api(`/api/v1/incidents?status=${status}&limit=500`);
    const keep = new Map(state.incidents);
    state.incidents.clear();
    for (const inc of page.incidents) {
      const old = keep.get(inc.incident_id);
      state.incidents.set(inc.incident_id, old && !newer(inc, old) ? old : inc);
    }
  }

  function setLive(s) {
    state.live = s;
    const node = $("#live-status");
    node.dataset.state = s;
    node.textContent = t(`live.${s}`);
  }

  function stopStream() {
    if (state.stream) state.stream.abort();
    state.stream = null;
    setLive("off");
  }

  function startStream() {
    if (state.stream || !state.token) return;
    const controller = new AbortController();
    state.stream = controller;
    runStream(controller);
  }

  async function runStream(controller) {
    let first = true;
    while (!controller.signal.aborted && state.token) {
      setLive("connecting");
      try {
        const after = state.cursor === null ? "" : `?after=${state.cursor}`;
        const resp = await fetch(`/api/v1/incidents/stream${after}`, {
          headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
          signal: controller.signal,
          cache: "no-store",
        });
        if (resp.status === 401) {
          loggedOut();
          return;
        }
        if (!resp.ok || !resp.body) throw new Error(`stream: ${resp.status}`);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            handleEvent(block);
          }
          if (first) {
            // connected: the board is loaded now, so nothing changed in between is missed
            first = false;
            setLive("live");
            try {
              await loadIncidents();
              render();
            } catch (exc) {
              if (exc.status !== 401) showError(t("error.generic") + exc.message);
            }
          } else if (state.live !== "live") {
            setLive("live");
          }
        }
      } catch (exc) {
        if (controller.signal.aborted) return;
      }
      if (controller.signal.aborted) return;
      setLive("connecting");
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }

  function handleEvent(block) {
    let event = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      const start = line.match(/^: incident changes after (\d+)$/);
      if (start && state.cursor === null) state.cursor = Number(start[1]);
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (id !== null && /^\d+$/.test(id)) state.cursor = Number(id);
    if (event !== "incident" || !data.length) return;
    let change;
    try {
      change = JSON.parse(data.join("\n"));
    } catch (_) {
      return;
    }
    const inc = change.incident;
    if (!inc || !inc.incident_id) return;
    upsert(inc, change.event_type === "opened");
    if (state.view === "board") renderBoard();
    if (state.view === "device" && state.device && inc.device && inc.device.id === state.device.id) {
      state.device.incidents.set(inc.incident_id, inc);
      renderDeviceIncidents();
    }
    if (state.view === "site" && state.site) loadSite();
  }

  function sortIncidents(list) {
    return list.sort(
      (a, b) =>
        (a.status === "open" ? 0 : 1) - (b.status === "open" ? 0 : 1) ||
        (a.acknowledged_at ? 1 : 0) - (b.acknowledged_at ? 1 : 0) ||
        URGENCY_ORDER[a.urgency] - URGENCY_ORDER[b.urgency] ||
        (b.opened_at > a.opened_at ? 1 : b.opened_at < a.opened_at ? -1 : 0)
    );
  }

  function incidentItem(inc, compact) {
    const open = inc.status === "open";
    const classes = ["incident", `u-${inc.urgency}`];
    if (inc.acknowledged_at) classes.push("acked");
    if (!open) classes.push("resolved");
    if (state.fresh.has(inc.incident_id)) classes.push("fresh");
    const deviceId = inc.device && inc.device.id;
    const place = [inc.location.community, inc.location.grid_code, inc.location.building, inc.location.address]
      .filter(Boolean)
      .join(" · ");
    let action;
    if (!open) {
      action = el("span", { class: "muted" }, t("incident.resolved"));
    } else if (inc.acknowledged_at) {
      action = el("span", { class: "ack-state" }, t("incident.acked", inc.acknowledged_by || "", fmtTime(inc.acknowledged_at)));
    } else if (canAck()) {
      action = el(
        "button",
        { type: "button", class: "ack-button", onclick: (e) => acknowledge(inc.incident_id, e.currentTarget) },
        t("incident.ack")
      );
    } else {
      action = el("span", { class: "muted" }, t("incident.open"));
    }
    return el(
      "li",
      {
        class: classes.join(" "),
        "data-incident-id": inc.incident_id,
        "data-urgency": inc.urgency,
        "data-status": inc.status,
        "data-acknowledged": inc.acknowledged_at ? "true" : "false",
      },
      el("span", { class: `badge u-${inc.urgency}` }, inc.urgency),
      el(
        "div",
        {},
        el("div", { class: "title" }, inc.title),
        compact ? null : el("div", { class: "meta" }, inc.description),
        el(
          "div",
          { class: "meta" },
          `${inc.incident_id} · ${t("incident.opened")} ${fmtTime(inc.opened_at)}`,
          inc.occurrences > 1 ? ` · ${t("incident.occurrences", inc.occurrences)}` : "",
          deviceId && !compact ? " · " : "",
          deviceId && !compact
            ? el("a", { href: `/app/devices/${encodeURIComponent(deviceId)}`, class: "device-link" }, `${t("incident.device")} ${deviceId}`)
            : null,
          place ? ` · ${place}` : ""
        )
      ),
      el("div", { class: "actions" }, action)
    );
  }

  function renderBoard() {
    const showResolved = $("#show-resolved").checked;
    const list = sortIncidents([...state.incidents.values()].filter((i) => showResolved || i.status === "open"));
    const ul = $("#incident-list");
    ul.replaceChildren(...list.map((inc) => incidentItem(inc, false)));
    state.fresh.clear();
    $("#board-empty").hidden = list.length > 0;
    $("#board-count").textContent = t("board.count", list.length);
  }

  async function acknowledge(incidentId, button) {
    if (button) button.disabled = true;
    try {
      const inc = await api(`/api/v1/incidents/${encodeURIComponent(incidentId)}/ack`, { method: "POST" });
      upsert(inc, false);
      if (state.device && state.device.incidents.has(incidentId)) state.device.incidents.set(incidentId, inc);
      render();
    } catch (exc) {
      if (button) button.disabled = false;
      showError(t("error.generic") + exc.message);
    }
  }

  // -- the site: devices by lat/lon ----------------------------------------------------------------

  async function allDeviceStatus() {
    const items = [];
    for (let offset = 0; ; offset += 1000) {
      const page = await api(`/api/v1/device-status?limit=1000&offset=${offset}`);
      items.push(...page.items);
      if (items.length >= page.total || !page.items.length) return items;
    }
  }

  async function loadSite() {
    try {
      state.site = await allDeviceStatus();
      if (state.view === "site") renderSite();
    } catch (exc) {
      if (exc.status !== 401) showError(t("error.generic") + exc.message);
    }
  }

  function deviceState(d) {
    if (d.open_incidents > 0) return "incident";
    if (d.online === true) return "online";
    if (d.online === false) return "offline";
    return "unknown";
  }

  function renderSite() {
    const map = $("#site-map");
    map.replaceChildren();
    const devices = state.site || [];
    const placed = devices.filter((d) => typeof d.lat === "number" && typeof d.lon === "number");
    const unplaced = devices.filter((d) => !placed.includes(d));
    $("#site-unplaced").textContent = !devices.length
      ? t("site.none")
      : unplaced.length
        ? t("site.unplaced", unplaced.map((d) => d.device_id).join(", "))
        : "";
    const W = 1000, H = 600, PAD = 40;
    for (let i = 1; i < 10; i++) map.append(svg("line", { class: "grid-line", x1: (W * i) / 10, y1: 0, x2: (W * i) / 10, y2: H }));
    for (let i = 1; i < 6; i++) map.append(svg("line", { class: "grid-line", x1: 0, y1: (H * i) / 6, x2: W, y2: (H * i) / 6 }));
    if (!placed.length) return;
    const lats = placed.map((d) => d.lat), lons = placed.map((d) => d.lon);
    const midLat = (Math.min(...lats) + Math.max(...lats)) / 2;
    const k = Math.cos((midLat * Math.PI) / 180) || 1; // a degree of longitude is shorter than one of latitude
    const xs = placed.map((d) => d.lon * k), ys = placed.map((d) => d.lat);
    const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
    const span = Math.max(maxX - minX, maxY - minY, 1e-5);
    const scale = Math.min((W - 2 * PAD) / span, (H - 2 * PAD) / span);
    const ox = (W - (maxX - minX) * scale) / 2, oy = (H - (maxY - minY) * scale) / 2;
    // the open incidents first drawn last, on top
    const order = [...placed].sort((a, b) => (deviceState(a) === "incident") - (deviceState(b) === "incident"));
    for (const d of order) {
      const x = ox + (d.lon * k - minX) * scale;
      const y = H - (oy + (d.lat - minY) * scale);
      const s = deviceState(d);
      const link = svg("a", { href: `/app/devices/${encodeURIComponent(d.device_id)}`, class: "device-link", "data-device-id": d.device_id, "data-state": s });
      const dot = svg("circle", { class: `device state-${s}`, cx: x.toFixed(1), cy: y.toFixed(1), r: s === "incident" ? 10 : 7 });
      dot.append(svg("title", {}, `${d.device_id} · ${d.device_type} · ${t(`state.${s}`)}`));
      link.append(dot, svg("text", { class: "label", x: (x + 12).toFixed(1), y: (y + 4).toFixed(1) }, d.device_id));
      map.append(link);
    }
  }

  // -- a device: facts, readings chart, incident history -------------------------------------------

  async function loadDevice(id) {
    state.device = { id, status: null, notFound: false, readings: null, message: null, field: null, incidents: new Map() };
    renderDevice();
    const current = state.device;
    try {
      current.status = await api(`/api/v1/device-status/${encodeURIComponent(id)}`);
    } catch (exc) {
      if (exc.status === 404) current.notFound = true;
      else if (exc.status !== 401) showError(t("error.generic") + exc.message);
      if (state.device === current) renderDevice();
      return;
    }
    if (state.device !== current) return;
    renderDevice();
    await Promise.all([loadReadings(current), loadDeviceIncidents(current)]);
  }

  async function loadReadings(current) {
    const range = $("#range-picker").value;
    const field = current.field ? `&field=${encodeURIComponent(current.field)}` : "";
    current.message = null;
    try {
      const r = await api(`/api/v1/devices/${encodeURIComponent(current.id)}/readings?since=${range}&points=200${field}`);
      if (!current.fields) {
        current.fields = Object.entries(r.fields)
          .filter(([, f]) => f.kind === "float" || f.kind === "integer")
          .map(([name, f]) => ({ name, unit: f.unit }));
      }
      if (!current.field) {
        current.field = current.fields.length ? current.fields[0].name : null;
      }
      current.readings = r;
    } catch (exc) {
      current.readings = null;
      current.message = exc.status === 503 || exc.status === 502 ? t("device.unavailable") : t("error.generic") + exc.message;
    }
    if (state.device === current) renderDevice();
  }

  async function loadDeviceIncidents(current) {
    const s = current.status;
    const q = new URLSearchParams({ status: "all", limit: "1000", commissioning: "true", type: s.device_type });
    if (s.community) q.set("community", s.community);
    try {
      const page = await api(`/api/v1/incidents?${q}`);
      for (const inc of page.incidents) {
        if (inc.device && inc.device.id === current.id) current.incidents.set(inc.incident_id, inc);
      }
    } catch (exc) {
      if (exc.status !== 401) showError(t("error.generic") + exc.message);
    }
    if (state.device === current) renderDeviceIncidents();
  }

  function renderDevice() {
    const d = state.device;
    if (!d) return;
    $("#device-not-found").hidden = !d.notFound;
    $("#device-body").hidden = !d.status;
    if (!d.status) return;
    const s = d.status;
    $("#device-title").textContent = `${s.device_id} · ${s.device_type}`;
    const online = s.online === true ? t("state.online") : s.online === false ? t("state.offline") : t("state.unknown");
    const facts = [
      ["fact.type", s.device_type],
      ["fact.community", s.community],
      ["fact.grid", s.grid_code],
      ["fact.building", s.building],
      ["fact.address", s.address],
      ["fact.lifecycle", s.lifecycle],
      ["fact.online", online],
      ["fact.lastSeen", fmtTime(s.last_seen)],
      ["fact.unit", s.responsible_unit],
      ["fact.open", s.open_incidents],
    ];
    $("#device-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, t(k)), el("dd", {}, v ?? t("none"))]));
    const picker = $("#field-picker");
    const fields = d.fields || [];
    picker.replaceChildren(...fields.map((f) => el("option", { value: f.name, selected: f.name === d.field }, f.unit ? `${f.name} (${f.unit})` : f.name)));
    picker.disabled = !fields.length;
    renderChart();
    renderDeviceIncidents();
  }

  function renderChart() {
    const d = state.device;
    const chart = $("#chart");
    chart.replaceChildren();
    const msg = $("#chart-message");
    let message = d.message;
    const r = d.readings;
    const points = r && d.field ? r.points.filter((p) => typeof p[d.field] === "number") : [];
    if (!message && r && !(d.fields || []).length) message = t("device.noNumeric");
    else if (!message && r && !points.length) message = t("device.noData");
    msg.textContent = message || "";
    msg.hidden = !message;
    chart.hidden = Boolean(message) || !r;
    if (message || !r) return;
    const W = 800, H = 260, L = 60, R = 15, T = 15, B = 35;
    const times = points.map((p) => Date.parse(p.time));
    const values = points.map((p) => p[d.field]);
    const t0 = Date.parse(r.since), t1 = Date.parse(r.until);
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { lo -= 1; hi += 1; }
    const x = (tm) => L + ((tm - t0) / Math.max(t1 - t0, 1)) * (W - L - R);
    const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    chart.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    for (let i = 0; i <= 4; i++) {
      const v = lo + ((hi - lo) * i) / 4;
      chart.append(svg("text", { class: "tick", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, Number(v.toPrecision(4)).toString()));
    }
    for (let i = 0; i <= 4; i++) {
      const tm = t0 + ((t1 - t0) * i) / 4;
      const label = new Date(tm).toLocaleString(state.lang === "zh" ? "zh-CN" : "en-GB", { month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false });
      chart.append(svg("text", { class: "tick", x: x(tm), y: H - B + 18, "text-anchor": "middle" }, label));
    }
    const unit = (d.fields || []).find((f) => f.name === d.field);
    chart.append(svg("text", { class: "tick", x: L + 4, y: T + 10 }, unit && unit.unit ? `${d.field} (${unit.unit})` : d.field));
    const pts = points.map((p, i) => `${x(times[i]).toFixed(1)},${y(values[i]).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: "series", points: pts, "data-points": points.length, "data-field": d.field }));
    if (points.length < 40) for (let i = 0; i < points.length; i++) chart.append(svg("circle", { class: "pt", cx: x(times[i]).toFixed(1), cy: y(values[i]).toFixed(1), r: 2.5 }));
  }

  function renderDeviceIncidents() {
    const d = state.device;
    if (!d) return;
    const list = sortIncidents([...d.incidents.values()]);
    $("#device-incidents").replaceChildren(...list.map((inc) => incidentItem(inc, true)));
    $("#device-incidents-empty").hidden = list.length > 0;
  }

  // -- overview: counts per community or grid ------------------------------------------------------

  async function loadOverview() {
    try {
      state.overview = await api(`/api/v1/overview?by=${$("#overview-by").value}`);
      if (state.view === "overview") renderOverview();
    } catch (exc) {
      if (exc.status !== 401) showError(t("error.generic") + exc.message);
    }
  }

  function overviewCells(label, row) {
    const u = row.incidents.by_urgency;
    return [
      el("td", {}, label),
      el("td", {}, row.devices.total),
      el("td", {}, row.devices.online),
      el("td", {}, row.devices.offline),
      el("td", {}, row.devices.unknown),
      el("td", {}, row.incidents.open),
      ...["P1", "P2", "P3", "P4"].map((p) => el("td", { class: `u-${p}` }, u[p] || 0)),
      ...["unacknowledged", "acknowledged", "resolved"].map((k) =>
        el("td", { "data-status": k }, (row.incidents.by_status || {})[k] || 0)
      ),
    ];
  }

  function renderOverview() {
    const o = state.overview;
    const body = $("#overview-table tbody");
    const foot = $("#overview-table tfoot");
    if (!o) {
      body.replaceChildren();
      foot.replaceChildren();
      return;
    }
    body.replaceChildren(
      ...o.rows.map((row) => {
        const label = Object.values(row.key).map((v) => v ?? t("none")).join(" / ");
        return el("tr", { "data-key": label }, ...overviewCells(label, row));
      })
    );
    foot.replaceChildren(el("tr", {}, ...overviewCells(t("overview.total"), o.totals)));
  }

  // -- start -----------------------------------------------------------------------------------------

  function start() {
    $("#login-form").addEventListener("submit", login);
    $("#logout").addEventListener("click", logout);
    $("#lang-toggle").addEventListener("click", () => {
      state.lang = state.lang === "zh" ? "en" : "zh";
      localStorage.setItem(LANG_KEY, state.lang);
      applyLanguage();
    });
    $("#show-resolved").addEventListener("change", async () => {
      try {
        await loadIncidents();
      } catch (exc) {
        if (exc.status !== 401) showError(t("error.generic") + exc.message);
      }
      renderBoard();
    });
    $("#field-picker").addEventListener("change", (e) => {
      if (!state.device) return;
      state.device.field = e.target.value;
      loadReadings(state.device);
    });
    $("#range-picker").addEventListener("change", () => state.device && loadReadings(state.device));
    $("#overview-by").addEventListener("change", loadOverview);
    // links inside the page change the view without reloading it
    document.addEventListener("click", (e) => {
      const a = e.target.closest && e.target.closest("a[href^='/app/']");
      if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
      e.preventDefault();
      showError("");
      navigate(a.getAttribute("href"));
    });
    window.addEventListener("popstate", route);
    applyLanguage();
    route();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
