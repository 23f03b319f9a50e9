/* Live analytics dashboard and admin panel for the API rate limiter.
 *
 * No build step and no libraries beyond the vendored Socket.IO client. Every value that came
 * from the server is put in the page with textContent / createElement, never as HTML.
 * The admin token lives in sessionStorage only (this tab), never in localStorage or the URL.
 */
(function () {
  'use strict';

  const TOKEN_KEY = 'ratelimiter.adminToken';
  const POLL_MS = 4000;          // without a live socket
  const LIVE_REFRESH_MS = 15000; // with a live socket: the series still comes from /api/analytics
  const PER_PAGE = 10;
  const MAX_EVENTS = 50;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const config = JSON.parse(document.getElementById('dashboard-config').textContent);
  const tiers = config.tiers || Object.keys(config.tier_limits);

  const state = {
    minutes: 60,
    series: [],
    usersPage: 1,
    usersTotal: 0,
    keysPage: 1,
    keysCount: 0,
    events: [],
    eventIds: new Set(),
    socket: null,
    live: false,
    pollTimer: null,
    refreshTimer: null,
    lastDecisions: null,
    pausedUntil: 0,
    messageSource: null,
  };

  // --- small DOM helpers -------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, options, children) {
    const node = document.createElement(tag);
    const opts = options || {};
    if (opts.className) node.className = opts.className;
    if (opts.text !== undefined && opts.text !== null) node.textContent = String(opts.text);
    if (opts.title) node.title = String(opts.title);
    Object.entries(opts.attrs || {}).forEach(([name, value]) => node.setAttribute(name, String(value)));
    (children || []).forEach((child) => node.append(child));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    Object.entries(attrs || {}).forEach(([name, value]) => node.setAttribute(name, String(value)));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function cell(text, className) {
    return el('td', { text: text === null || text === undefined || text === '' ? '–' : text, className });
  }

  function emptyRow(tbody, columns, text) {
    tbody.replaceChildren(el('tr', {}, [el('td', { text, className: 'muted', attrs: { colspan: columns } })]));
  }

  // --- formatting --------------------------------------------------------------------------

  const numberFormat = new Intl.NumberFormat();

  function fmtNumber(value) {
    return numberFormat.format(Number(value) || 0);
  }

  function fmtTime(iso) {
    if (!iso) return '–';
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString([], { hour12: false });
  }

  function pad2(value) {
    return String(value).padStart(2, '0');
  }

  function fmtDateTime(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const day = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
    return `${day} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function fmtClock(date) {
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false });
  }

  function fmtUptime(seconds) {
    let rest = Math.max(0, Math.floor(Number(seconds) || 0));
    const days = Math.floor(rest / 86400);
    rest %= 86400;
    const hours = Math.floor(rest / 3600);
    rest %= 3600;
    const minutes = Math.floor(rest / 60);
    const parts = days ? [`${days}d`, `${hours}h`] : hours ? [`${hours}h`, `${minutes}m`] : [`${minutes}m`, `${rest % 60}s`];
    return parts.join(' ');
  }

  function fmtShare(limited, total) {
    return total ? `${((limited / total) * 100).toFixed(1)}%` : '0%';
  }

  function fmtDetails(details) {
    if (!details || typeof details !== 'object') return details ? String(details) : '';
    return Object.entries(details)
      .filter(([, value]) => value !== null && value !== undefined && value !== '')
      .map(([name, value]) => `${name}=${typeof value === 'object' ? JSON.stringify(value) : value}`)
      .join(' ');
  }

  // --- messages ----------------------------------------------------------------------------

  function showMessage(text, kind, source) {
    state.messageSource = source || 'user';
    $('message-text').textContent = text;
    $('message').className = `message ${kind === 'ok' ? 'message-ok' : 'message-error'}`;
    $('message').hidden = false;
  }

  function hideMessage() {
    $('message').hidden = true;
  }

  function describeError(error, what) {
    if (!(error instanceof ApiError)) return `${what}: the server could not be reached (${error.message}).`;
    if (error.status === 401) return `${what}: the admin token was refused (401 ${error.code}).`;
    if (error.status === 429) {
      const wait = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : '';
      return `${what}: rate limited (429 ${error.code}).${wait}`;
    }
    return `${what}: ${error.message} (${error.status} ${error.code}).`;
  }

  // --- API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  function getToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || '';
    } catch (error) {
      return '';
    }
  }

  function setToken(token) {
    window.sessionStorage.setItem(TOKEN_KEY, token);
  }

  function clearToken() {
    window.sessionStorage.removeItem(TOKEN_KEY);
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Accept: 'application/json' };
    const token = opts.token !== undefined ? opts.token : opts.admin ? getToken() : '';
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method: opts.method || 'GET', headers, cache: 'no-store', credentials: 'same-origin' };
    if (opts.body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(opts.body);
    }
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const data = body || {};
      const retryAfter = data.retry_after || Number(response.headers.get('Retry-After')) || 0;
      throw new ApiError(response.status, data.error || `http_${response.status}`,
        data.message || response.statusText || 'Request failed', retryAfter);
    }
    return body;
  }

  // --- connection status -------------------------------------------------------------------

  function setConnection(text, kind) {
    const pill = $('connection');
    pill.textContent = text;
    pill.className = `pill pill-${kind}`;
  }

  function showMode() {
    if (state.live) setConnection('live · socket.io', 'ok');
    else setConnection(`polling every ${POLL_MS / 1000} s`, 'info');
  }

  // --- analytics rendering -----------------------------------------------------------------

  function renderTotals(data) {
    const allowed = data.totals.allowed;
    const limited = data.totals.limited;
    $('total-allowed').textContent = fmtNumber(allowed);
    $('total-limited').textContent = fmtNumber(limited);
    $('limited-share').textContent = fmtShare(limited, allowed + limited);
    $('range-label-allowed').textContent = `last ${data.minutes} min`;
  }

  function renderMetrics(metrics, store, health) {
    $('m-requests').textContent = fmtNumber(metrics.requests_total);
    $('m-limited').textContent = fmtNumber(metrics.rate_limited_total);
    $('m-ip-refused').textContent = fmtNumber(metrics.ip_refused_total);
    const shadow = Object.entries(metrics.shadow_refusals || {});
    $('m-shadow').textContent = shadow.length
      ? shadow.map(([name, count]) => `${name}: ${fmtNumber(count)}`).join(', ') : '0';
    $('m-latency').textContent = `${Number(metrics.avg_response_ms || 0).toFixed(1)} ms`;
    $('m-uptime').textContent = fmtUptime(metrics.uptime_seconds);
    if (store) $('m-store').textContent = store;
    if (health) {
      const pill = $('m-health');
      pill.textContent = health === 'ok' ? 'healthy' : health;
      pill.className = `pill ${health === 'ok' ? 'pill-ok' : 'pill-bad'}`;
    }
  }

  function renderByTier(byTier) {
    const tbody = $('by-tier');
    const names = tiers.concat(Object.keys(byTier).filter((name) => !tiers.includes(name)));
    tbody.replaceChildren(...names.map((name) => {
      const counts = byTier[name] || { allowed: 0, limited: 0 };
      const total = counts.allowed + counts.limited;
      const bar = el('span', { className: 'share-bar' }, [
        el('span', { className: 'share-fill', attrs: { style: `width:${total ? (counts.limited / total) * 100 : 0}%` } }),
      ]);
      const share = el('td', {}, [bar, el('span', { className: 'muted', text: ` ${fmtShare(counts.limited, total)}` })]);
      return el('tr', {}, [
        el('th', { text: name, attrs: { scope: 'row' } }),
        cell(config.tier_limits[name] === undefined ? '–' : fmtNumber(config.tier_limits[name]), 'num'),
        cell(fmtNumber(counts.allowed), 'num'),
        cell(fmtNumber(counts.limited), 'num'),
        share,
      ]);
    }));
  }

  function niceStep(max, ticks) {
    const raw = Math.max(1, max) / ticks;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
    return Math.max(1, step);
  }

  function renderChart() {
    const series = state.series;
    const box = $('chart');
    const width = Math.max(280, box.clientWidth || 600);
    const height = width < 500 ? 200 : 260;
    const pad = { left: 48, right: 12, top: 12, bottom: 38 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const peak = Math.max(0, ...series.map((b) => b.allowed + b.limited));
    const step = niceStep(peak, 4);
    const top = Math.max(step, Math.ceil(peak / step) * step);
    const y = (value) => pad.top + plotH - (value / top) * plotH;
    const allowedSum = series.reduce((sum, b) => sum + b.allowed, 0);
    const limitedSum = series.reduce((sum, b) => sum + b.limited, 0);
    const chart = svg('svg', {
      viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
      'aria-label': `Requests per minute over the last ${series.length} minutes: ${allowedSum} allowed, ${limitedSum} limited`,
    });
    for (let value = 0; value <= top; value += step) {
      chart.append(svg('line', { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: 'grid' }));
      chart.append(svg('text', { x: pad.left - 6, y: y(value) + 4, class: 'axis', 'text-anchor': 'end' }, fmtNumber(value)));
    }
    const slot = plotW / Math.max(1, series.length);
    const barW = Math.max(1, slot * 0.78);
    const labelEvery = Math.max(1, Math.ceil(56 / slot));
    series.forEach((bucket, i) => {
      const x = pad.left + i * slot + (slot - barW) / 2;
      const group = svg('g', {});
      group.append(svg('title', {}, `${fmtClock(new Date(bucket.t))}: ${bucket.allowed} allowed, ${bucket.limited} limited`));
      if (bucket.allowed) {
        group.append(svg('rect', { x, width: barW, y: y(bucket.allowed), height: y(0) - y(bucket.allowed), class: 'bar-ok' }));
      }
      if (bucket.limited) {
        const total = bucket.allowed + bucket.limited;
        group.append(svg('rect', { x, width: barW, y: y(total), height: y(bucket.allowed) - y(total), class: 'bar-bad' }));
      }
      group.append(svg('rect', { x: pad.left + i * slot, width: slot, y: pad.top, height: plotH, class: 'hit' }));
      chart.append(group);
      if ((series.length - 1 - i) % labelEvery === 0) {
        chart.append(svg('text', { x: pad.left + i * slot + slot / 2, y: height - pad.bottom + 16, class: 'axis',
          'text-anchor': 'middle' }, fmtClock(new Date(bucket.t))));
      }
    });
    chart.append(svg('line', { x1: pad.left, x2: width - pad.right, y1: y(0), y2: y(0), class: 'baseline' }));
    chart.append(svg('text', { x: pad.left + plotW / 2, y: height - 4, class: 'axis-title', 'text-anchor': 'middle' },
      'time (local, per minute)'));
    chart.append(svg('text', { x: 12, y: pad.top + plotH / 2, class: 'axis-title', 'text-anchor': 'middle',
      transform: `rotate(-90 12 ${pad.top + plotH / 2})` }, 'requests / min'));
    if (!peak) {
      chart.append(svg('text', { x: pad.left + plotW / 2, y: pad.top + plotH / 2, class: 'empty', 'text-anchor': 'middle' },
        'No requests in this range yet'));
    }
    box.replaceChildren(chart);
  }

  function renderAnalytics(data) {
    state.series = data.series || [];
    renderTotals(data);
    renderMetrics(data.metrics, data.limiter_store, data.limiter_health);
    renderByTier(data.by_tier || {});
    renderChart();
    if (data.top_keys) renderAdminAnalytics(data);
    $('updated-at').textContent = fmtTime(new Date().toISOString());
    $('updated-at').setAttribute('datetime', new Date().toISOString());
  }

  // --- admin analytics ---------------------------------------------------------------------

  function renderTopKeys(rows) {
    const tbody = $('top-keys');
    if (!rows.length) return emptyRow(tbody, 5, 'No key traffic in this range');
    tbody.replaceChildren(...rows.map((row) => el('tr', {}, [
      el('td', {}, [el('code', { text: row.prefix })]), cell(row.name), cell(row.tier),
      cell(fmtNumber(row.allowed), 'num'), cell(fmtNumber(row.limited), 'num'),
    ])));
  }

  function renderRecent429s(rows) {
    const tbody = $('recent-429s');
    if (!rows.length) return emptyRow(tbody, 5, 'No 429 responses logged');
    tbody.replaceChildren(...rows.map((row) => el('tr', {}, [
      cell(fmtTime(row.timestamp)), el('td', {}, [el('code', { text: row.path })]), cell(row.ip),
      cell(row.key_prefix), cell(row.message),
    ])));
  }

  function renderAlerts(rows) {
    const list = $('alerts');
    if (!rows.length) {
      list.replaceChildren(el('li', { className: 'muted', text: 'No alerts' }));
      return;
    }
    list.replaceChildren(...rows.map((row) => el('li', { className: `sev-${row.severity || 'warning'}` }, [
      el('time', { text: fmtTime(row.timestamp), attrs: { datetime: row.timestamp } }),
      el('span', { className: 'badge', text: row.kind }),
      el('span', { className: 'subject', text: row.source }),
      el('span', { className: 'muted details', text: fmtDetails(row.details) }),
    ])));
  }

  function eventId(event) {
    return [event.timestamp, event.kind, event.subject, JSON.stringify(event.details || {})].join('|');
  }

  function addEvents(events) {
    let added = 0;
    events.slice().reverse().forEach((event) => {
      const id = eventId(event);
      if (state.eventIds.has(id)) return;
      state.eventIds.add(id);
      state.events.unshift(event);
      added += 1;
    });
    state.events.sort((a, b) => String(b.timestamp).localeCompare(String(a.timestamp)));
    state.events = state.events.slice(0, MAX_EVENTS);
    state.eventIds = new Set(state.events.map(eventId));
    renderEvents();
    return added;
  }

  function renderEvents() {
    const list = $('events');
    if (!state.events.length) {
      list.replaceChildren(el('li', { className: 'muted', text: 'Waiting for events…' }));
      return;
    }
    list.replaceChildren(...state.events.map((event) => el('li', { className: 'event', attrs: { 'data-kind': event.kind } }, [
      el('time', { text: fmtTime(event.timestamp), attrs: { datetime: event.timestamp } }),
      el('span', { className: 'badge', text: event.kind }),
      el('span', { className: 'subject', text: event.subject }),
      el('span', { className: 'muted details', text: fmtDetails(event.details) }),
    ])));
  }

  function renderAdminAnalytics(data) {
    renderTopKeys(data.top_keys || []);
    renderRecent429s(data.recent_429s || []);
    renderAlerts(data.alerts || []);
    if (addEvents(data.events || [])) scheduleAdminRefresh();
  }

  // --- refresh loop ------------------------------------------------------------------------

  async function refreshAnalytics() {
    const token = getToken();
    try {
      const data = await api(`/api/analytics?minutes=${state.minutes}`, { token });
      renderAnalytics(data);
      if (state.messageSource === 'analytics') hideMessage();
      showMode();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401 && token) {
        signOut();
        showMessage(describeError(error, 'Admin data'), 'error');
        return;
      }
      if (error instanceof ApiError && error.status === 429) {
        state.pausedUntil = Date.now() + Math.max(1, error.retryAfter || 5) * 1000;
      }
      if (!(error instanceof ApiError)) setConnection('offline', 'bad');
      showMessage(describeError(error, 'Analytics'), 'error', 'analytics');
    }
  }

  function schedulePoll() {
    window.clearTimeout(state.pollTimer);
    const delay = Math.max(state.live ? LIVE_REFRESH_MS : POLL_MS, state.pausedUntil - Date.now());
    state.pollTimer = window.setTimeout(async () => {
      await refreshAnalytics();
      schedulePoll();
    }, delay);
  }

  function refreshSoon() {
    if (state.refreshTimer || Date.now() < state.pausedUntil) return;
    state.refreshTimer = window.setTimeout(async () => {
      state.refreshTimer = null;
      await refreshAnalytics();
    }, 500);
  }

  // --- live updates over Socket.IO ---------------------------------------------------------

  function onSocketMetrics(metrics) {
    renderMetrics(metrics, null, metrics.limiter_health);
    const decisions = (metrics.allowed_total || 0) + (metrics.rate_limited_total || 0);
    if (state.lastDecisions !== null && decisions !== state.lastDecisions) refreshSoon();
    state.lastDecisions = decisions;
  }

  function onSocketEvent(event) {
    if (!getToken()) return;
    addEvents([event]);
    scheduleAdminRefresh();
  }

  function connectSocket() {
    if (!config.socketio) return;
    if (typeof window.io !== 'function') {
      showMessage('Live updates are unavailable (Socket.IO client missing); polling instead.', 'error');
      return;
    }
    const socket = window.io({ auth: (callback) => callback({ token: getToken() }), reconnectionDelayMax: 10000 });
    socket.on('connect', () => {
      state.live = true;
      showMode();
      schedulePoll();
    });
    socket.on('disconnect', () => {
      state.live = false;
      showMode();
      schedulePoll();
    });
    socket.on('connect_error', () => {
      state.live = false;
      showMode();
    });
    socket.on('metrics', onSocketMetrics);
    socket.on('event', onSocketEvent);
    state.socket = socket;
  }

  function reconnectSocket() {
    if (!state.socket) return;
    state.socket.disconnect();
    state.socket.connect();
  }

  // --- admin panel -------------------------------------------------------------------------

  async function adminCall(what, path, options) {
    try {
      return await api(path, Object.assign({ admin: true }, options));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) signOut();
      showMessage(describeError(error, what), 'error');
      return null;
    }
  }

  function tierSelect(user) {
    const select = el('select', { attrs: { 'aria-label': `Tier of ${user.username}`, 'data-user-id': user.id } },
      tiers.map((tier) => el('option', { text: tier, attrs: { value: tier } })));
    select.value = user.tier;
    select.addEventListener('change', () => changeTier(user, select));
    return select;
  }

  async function changeTier(user, select) {
    select.disabled = true;
    const result = await adminCall('Change tier', '/admin/upgrade_tier', {
      method: 'POST', body: { user_id: user.id, tier: select.value },
    });
    select.disabled = false;
    if (!result) {
      select.value = user.tier;
      return;
    }
    user.tier = result.user.tier;
    showMessage(`Tier of ${user.username} is now ${result.user.tier}.`, 'ok');
    await Promise.all([loadKeys(), loadAudit()]);
  }

  async function loadUsers() {
    const data = await adminCall('Users', `/admin/users?page=${state.usersPage}&per_page=${PER_PAGE}`);
    if (!data) return;
    state.usersTotal = data.total;
    const pages = Math.max(1, Math.ceil(data.total / PER_PAGE));
    $('users-page').textContent = `page ${data.page} of ${pages} · ${fmtNumber(data.total)} users`;
    $('users-prev').disabled = data.page <= 1;
    $('users-next').disabled = data.page >= pages;
    const tbody = $('users');
    if (!data.users.length) return emptyRow(tbody, 6, 'No users');
    tbody.replaceChildren(...data.users.map((user) => el('tr', { attrs: { 'data-user-id': user.id } }, [
      cell(user.id, 'num'), cell(user.username, 'username'), cell(user.email),
      el('td', {}, [tierSelect(user)]), cell(user.api_keys, 'num'), cell(fmtDateTime(user.created_at), 'when'),
    ])));
  }

  function keyStatus(key) {
    if (key.revoked) return el('span', { className: 'pill pill-bad', text: 'revoked' });
    if (key.blocked) return el('span', { className: 'pill pill-warn', text: 'blocked', title: key.blocked_reason || '' });
    return el('span', { className: 'pill pill-ok', text: 'active' });
  }

  function labelled(node, label) {
    node.setAttribute('aria-label', label);
    return node;
  }

  function actionButton(label, className, handler) {
    const button = el('button', { text: label, className, attrs: { type: 'button' } });
    button.addEventListener('click', () => handler(button));
    return button;
  }

  async function keyAction(what, path, body) {
    const result = await adminCall(what, path, { method: 'POST', body });
    if (result) {
      showMessage(`${what}: key ${result.key.prefix} done.`, 'ok');
      await Promise.all([loadKeys(), loadAudit()]);
    }
  }

  function revokeButton(key) {
    return actionButton('Revoke', 'danger small', (button) => {
      if (button.dataset.armed !== 'yes') {
        button.dataset.armed = 'yes';
        button.textContent = 'Confirm revoke';
        window.setTimeout(() => {
          button.dataset.armed = '';
          button.textContent = 'Revoke';
        }, 5000);
        return;
      }
      button.disabled = true;
      keyAction('Revoke key', '/admin/revoke_key', { key_id: key.id });
    });
  }

  function keyActions(key) {
    if (key.revoked) return el('td', { className: 'muted', text: 'none' });
    const label = `${key.prefix}`;
    const toggle = key.blocked
      ? actionButton('Unblock', 'secondary small', (button) => {
        button.disabled = true;
        keyAction('Unblock key', '/admin/unblock_key', { key_id: key.id });
      })
      : actionButton('Block', 'warn small', (button) => {
        button.disabled = true;
        keyAction('Block key', '/admin/block_key', { key_id: key.id, reason: $('block-reason').value.trim() });
      });
    toggle.setAttribute('aria-label', `${toggle.textContent} key ${label}`);
    const revoke = revokeButton(key);
    revoke.setAttribute('aria-label', `Revoke key ${label}`);
    return el('td', { className: 'actions' }, [toggle, revoke]);
  }

  async function loadKeys() {
    const data = await adminCall('API keys', `/admin/keys?page=${state.keysPage}&per_page=${PER_PAGE}`);
    if (!data) return;
    $('keys-page').textContent = `page ${data.page}`;
    $('keys-prev').disabled = data.page <= 1;
    $('keys-next').disabled = data.keys.length < PER_PAGE;
    const tbody = $('keys');
    if (!data.keys.length) return emptyRow(tbody, 7, 'No API keys');
    tbody.replaceChildren(...data.keys.map((key) => el('tr', { attrs: { 'data-key-id': key.id } }, [
      el('td', {}, [el('code', { text: key.prefix })]), cell(key.name, 'key-name'), cell(key.username),
      cell(key.tier), el('td', {}, [keyStatus(key)]), cell(fmtDateTime(key.last_used_at), 'when'), keyActions(key),
    ])));
  }

  async function loadBans() {
    const data = await adminCall('IP bans', '/admin/bans');
    if (!data) return;
    const tbody = $('bans');
    if (!data.bans.length) return emptyRow(tbody, 4, 'No active bans');
    tbody.replaceChildren(...data.bans.map((ban) => el('tr', {}, [
      el('td', {}, [el('code', { text: ban.ip })]),
      cell(fmtDateTime(new Date(ban.expires_epoch * 1000).toISOString()), 'when'),
      cell(ban.ban_count, 'num'),
      el('td', {}, [labelled(actionButton('Unban', 'secondary small', async (button) => {
        button.disabled = true;
        const result = await adminCall('Unban IP', '/admin/unban_ip', { method: 'POST', body: { ip: ban.ip } });
        if (result) showMessage(`${result.ban.ip} is no longer banned.`, 'ok');
        await Promise.all([loadBans(), loadAudit()]);
      }), `Unban ${ban.ip}`)]),
    ])));
  }

  function overrideTarget(row) {
    return row.key_id !== null ? `key #${row.key_id}` : `user #${row.user_id}`;
  }

  async function loadOverrides() {
    const data = await adminCall('Limit overrides', '/admin/overrides');
    if (!data) return;
    const tbody = $('overrides');
    if (!data.overrides.length) return emptyRow(tbody, 5, 'No overrides');
    tbody.replaceChildren(...data.overrides.map((row) => el('tr', { attrs: { 'data-override-id': row.id } }, [
      cell(overrideTarget(row)), cell(row.limits.join(', ')),
      cell(row.expires_at ? fmtDateTime(row.expires_at) + (row.active ? '' : ' (lapsed)') : 'never', 'when'),
      cell(row.reason),
      el('td', {}, [labelled(actionButton('Delete', 'secondary small', async (button) => {
        button.disabled = true;
        const result = await adminCall('Delete override', `/admin/overrides/${row.id}`, { method: 'DELETE' });
        if (result) showMessage(`Override for ${overrideTarget(row)} deleted.`, 'ok');
        await Promise.all([loadOverrides(), loadAudit()]);
      }), `Delete override for ${overrideTarget(row)}`)]),
    ])));
  }

  async function createOverride(event) {
    event.preventDefault();
    const body = {
      [$('override-kind').value]: $('override-target').value.trim(),
      limits: $('override-limits').value.split(',').map((item) => item.trim()).filter(Boolean),
      reason: $('override-reason').value.trim(),
    };
    const expires = $('override-expires').value.trim();
    if (expires) body.expires_at = expires;
    const result = await adminCall('Override', '/admin/overrides', { method: 'POST', body });
    if (!result) return;
    showMessage(`Override ${result.override.limits.join(', ')} for ${result.override.target} is in force.`, 'ok');
    await Promise.all([loadOverrides(), loadAudit()]);
  }

  async function banIp(event) {
    event.preventDefault();
    const result = await adminCall('Ban IP', '/admin/ban_ip', {
      method: 'POST', body: { ip: $('ban-ip').value.trim(), seconds: Number($('ban-seconds').value) },
    });
    if (!result) return;
    showMessage(`${result.ban.ip} is banned for ${result.ban.seconds} s.`, 'ok');
    $('ban-ip').value = '';
    await Promise.all([loadBans(), loadAudit()]);
  }

  async function loadAudit() {
    const data = await adminCall('Audit log', '/admin/audit?limit=50');
    if (!data) return;
    const tbody = $('audit');
    if (!data.entries.length) return emptyRow(tbody, 5, 'No admin actions yet');
    tbody.replaceChildren(...data.entries.map((entry) => el('tr', { attrs: { 'data-action': entry.action } }, [
      cell(fmtDateTime(entry.timestamp), 'when'), cell(entry.actor), el('td', {}, [el('span', { className: 'badge', text: entry.action })]),
      cell(entry.target, 'target'), cell(fmtDetails(entry.details), 'details'),
    ])));
  }

  async function refreshAdmin() {
    if (!getToken()) return;
    await Promise.all([loadUsers(), loadKeys(), loadBans(), loadOverrides(), loadAudit()]);
  }

  let adminRefreshTimer = null;

  function scheduleAdminRefresh() {
    window.clearTimeout(adminRefreshTimer);
    adminRefreshTimer = window.setTimeout(() => {
      refreshAdmin();
    }, 700);
  }

  // --- sign in / out -----------------------------------------------------------------------

  function showAdmin(signedIn) {
    $('token-form').hidden = signedIn;
    $('signed-in').hidden = !signedIn;
    $('admin-content').hidden = !signedIn;
    $('admin-state').textContent = signedIn ? 'signed in' : 'signed out';
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $('admin-token').value.trim();
    if (!token) return;
    try {
      const data = await api(`/api/analytics?minutes=${state.minutes}`, { token });
      setToken(token);
      $('admin-token').value = '';
      showAdmin(true);
      hideMessage();
      renderAnalytics(data);
      reconnectSocket();
      await refreshAdmin();
    } catch (error) {
      showMessage(describeError(error, 'Sign in'), 'error');
    }
  }

  function signOut() {
    clearToken();
    showAdmin(false);
    state.events = [];
    state.eventIds = new Set();
    ['top-keys', 'recent-429s', 'alerts', 'events', 'users', 'keys', 'bans', 'overrides', 'audit']
      .forEach((id) => $(id).replaceChildren());
    reconnectSocket();
  }

  // --- wiring ------------------------------------------------------------------------------

  function bindPager(prevId, nextId, field, load) {
    $(prevId).addEventListener('click', () => {
      state[field] = Math.max(1, state[field] - 1);
      load();
    });
    $(nextId).addEventListener('click', () => {
      state[field] += 1;
      load();
    });
  }

  function bindControls() {
    $('token-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', () => {
      signOut();
      showMessage('Signed out: the admin token was removed from this tab.', 'ok');
    });
    $('message-close').addEventListener('click', hideMessage);
    $('range').addEventListener('change', () => {
      state.minutes = Number($('range').value) || 60;
      refreshAnalytics();
    });
    $('ban-form').addEventListener('submit', banIp);
    $('override-form').addEventListener('submit', createOverride);
    $('admin-refresh').addEventListener('click', () => {
      refreshAdmin();
      refreshAnalytics();
    });
    bindPager('users-prev', 'users-next', 'usersPage', loadUsers);
    bindPager('keys-prev', 'keys-next', 'keysPage', loadKeys);
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(renderChart, 150);
    });
  }

  async function start() {
    bindControls();
    showAdmin(Boolean(getToken()));
    renderEvents();
    renderChart();
    connectSocket();
    showMode();
    await refreshAnalytics();
    schedulePoll();
    await refreshAdmin();
  }

  start();
}());
