/* otel-cmbagent run viewer: plain JS, no framework, no build step.
 *
 * Safety: every value that comes from the API or the websocket reaches the DOM as text (textContent,
 * text nodes, attribute values); nothing here assigns innerHTML/outerHTML or calls insertAdjacentHTML.
 *
 * Speed: a run opens from /api/runs/{run}/columns (only what a row shows, as columns whose JSON the database makes);
 * a span's inputs, outputs, attributes and messages are fetched when it is selected (/api/events/{id}). Rows
 * of the waterfall are virtualised (only the rows in view exist in the DOM) and recycled;
 * websocket events are queued and applied once per animation frame; a new span is spliced into the
 * flattened tree (no re-sort, no full re-render); bars are positioned in CSS from per-bar variables and
 * three canvas-wide ones (--t0, --scale, --now), so rescaling the axis or growing running bars costs
 * no per-bar JS.
 */
(function () {
  'use strict';

  // --- configuration, token ------------------------------------------------------------------
  const CONFIG = (function () {
    try { return JSON.parse(document.getElementById('viewer-config').textContent) || {}; } catch (e) { return {}; }
  })();
  const TYPES = ['run', 'step', 'conversation', 'agent_call', 'llm_call', 'tool_call', 'code_exec', 'file_gen',
    'handoff', 'human_input', 'error'];
  const TYPE_NAMES = {
    run: 'run', step: 'step', conversation: 'conversation', agent_call: 'agent call', llm_call: 'LLM call',
    tool_call: 'tool call', code_exec: 'code exec', file_gen: 'file', handoff: 'handoff',
    human_input: 'human input', error: 'error', message: 'message',
  };
  const ROW_H = 24;
  const OVERSCAN = 10;
  const TRACK_RIGHT_PAD = 78;   // room for the duration label after the last bar
  const MAX_TICKS_PER_ROW = 80;
  const MAX_MESSAGES_LISTED = 300;
  // With a token the page is opened as /?token=...: it stays in the address bar (a reload must send it
  // again) and goes with every API request (X-Token header) and the websocket (?token=).
  const token = new URL(location.href).searchParams.get('token');

  const $ = (id) => document.getElementById(id);
  const dom = {
    runList: $('run-list'), runCount: $('run-count'), runsError: $('runs-error'),
    empty: $('empty'), runView: $('run-view'), runHeader: $('run-header'),
    filterType: $('filter-type'), filterAgent: $('filter-agent'), filterText: $('filter-text'), legend: $('legend'),
    waterfall: $('waterfall'), axis: $('wf-axis'), body: $('wf-body'), canvas: $('wf-canvas'), grid: $('wf-grid'),
    loading: $('wf-loading'), count: $('wf-count'),
    details: $('details'), detailsTitle: $('details-title'), detailsBody: $('details-body'), detailsClose: $('details-close'),
    conn: $('conn'), connText: $('conn-text'), dbName: $('db-name'),
  };

  // Numbers the benchmark and the tests read (window.__viewer).
  const STATS = {
    firstRender: null,      // performance.now() when the first complete waterfall of a run was painted
    runLoadedAt: null,
    fetchMs: null,
    buildMs: null,
    applied: 0,             // websocket events applied
    applyMs: 0,             // JS time spent applying them and updating the DOM
    frames: 0,
    maxFrameMs: 0,
    wsMessages: 0,
  };
  window.__viewer = {
    stats: STATS,
    eventCount: () => (R ? R.events.size : 0),
    spanCount: () => (R ? R.flat.length : 0),
    runKey: () => (R ? R.key : null),
    reset() { STATS.applied = 0; STATS.applyMs = 0; STATS.frames = 0; STATS.maxFrameMs = 0; STATS.wsMessages = 0; },
  };

  // --- small helpers ---------------------------------------------------------------------------
  /** Build an element. Children that are not Nodes become text nodes: never parsed as HTML. */
  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    if (props) {
      for (const key of Object.keys(props)) {
        const value = props[key];
        if (value === null || value === undefined || value === false) continue;
        if (key === 'class') el.className = value;
        else if (key === 'text') el.textContent = String(value);
        else if (key === 'dataset') { for (const k of Object.keys(value)) el.dataset[k] = String(value[k]); }
        else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
        else el.setAttribute(key, value === true ? '' : String(value));
      }
    }
    appendKids(el, kids);
    return el;
  }
  function appendKids(el, kids) {
    for (const kid of kids) {
      if (kid === null || kid === undefined || kid === false) continue;
      if (Array.isArray(kid)) appendKids(el, kid);
      else el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
  }
  function typeClass(type) { return 't-' + (TYPES.includes(type) || type === 'message' ? type : 'other'); }

  // One rule with the CLI (otel_cmbagent/apps/cli/terminal.py fmt_duration): whole milliseconds, truncated
  // as the sink truncates duration_ms; 1.23 s; 2m 05s; 1h 02m.
  function fmtDur(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return '—';
    const whole = Math.max(0, Math.floor(ms));
    if (whole < 1000) return whole + ' ms';
    if (whole < 60000) return (Math.floor(whole / 10) / 100).toFixed(2) + ' s';
    const s = Math.floor(whole / 1000);
    const hours = Math.floor(s / 3600), minutes = Math.floor((s % 3600) / 60), seconds = s % 60;
    if (hours) return hours + 'h ' + String(minutes).padStart(2, '0') + 'm';
    return minutes + 'm ' + String(seconds).padStart(2, '0') + 's';
  }
  // A finished event's duration: its row's duration_ms (what the CLI shows), else end - start.
  function evDuration(ev) {
    return typeof ev.dur === 'number' && ev.status !== 'running' ? ev.dur : ev.e - ev.s;
  }
  function fmtAxis(ms, step) {
    if (step >= 60000) return fmtDur(ms);
    if (step >= 1000) return (ms / 1000).toFixed(step % 1000 ? 1 : 0) + ' s';
    if (ms >= 1000) return (ms / 1000).toFixed(step >= 100 ? 1 : 2) + ' s';
    return (step < 1 ? ms.toFixed(1) : Math.round(ms)) + ' ms';
  }
  const numberFormat = new Intl.NumberFormat('en-US');
  function fmtNum(n) { return (n === null || n === undefined || !isFinite(n)) ? '—' : numberFormat.format(n); }
  function fmtCompact(n) {
    if (!isFinite(n)) return '—';
    if (n >= 1e6) return (n / 1e6).toFixed(1) + 'M';
    if (n >= 1e4) return (n / 1e3).toFixed(1) + 'k';
    return numberFormat.format(n);
  }
  function fmtCost(c) {
    if (c === null || c === undefined || c === '' || !isFinite(Number(c))) return '—';
    c = Number(c);
    return '$' + (c === 0 ? '0.00' : c < 0.01 ? c.toFixed(4) : c.toFixed(2));
  }
  function fmtClock(ms) {
    if (!isFinite(ms)) return '—';
    const d = new Date(ms);
    const sameDay = new Date().toDateString() === d.toDateString();
    const time = d.toLocaleTimeString('en-GB', { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
    return sameDay ? time : d.toLocaleDateString('en-CA') + ' ' + time;
  }
  function fmtAgo(ms) {
    if (!isFinite(ms)) return '';
    const s = Math.max(0, (Date.now() + clockSkew - ms) / 1000);
    if (s < 60) return Math.round(s) + 's ago';
    if (s < 3600) return Math.round(s / 60) + 'm ago';
    if (s < 86400) return Math.round(s / 3600) + 'h ago';
    return new Date(ms).toLocaleDateString('en-CA');
  }
  function shortId(id) { return id ? String(id).slice(0, 8) : ''; }
  function parseTime(value) { if (!value) return NaN; const t = Date.parse(value); return isNaN(t) ? NaN : t; }
  function runTitle(name) {
    if (!name) return '(unnamed run)';
    return String(name).replace(/^invoke_workflow\s+/, '');
  }
  function hexId(value, length) { return typeof value === 'string' && new RegExp('^[0-9a-f]{1,' + length + '}$').test(value) ? value : null; }
  function jaegerLink(traceId, spanId) {
    const base = CONFIG.jaeger_url;
    const trace = hexId(traceId, 32);
    if (!base || !trace) return null;
    let href = base + '/trace/' + encodeURIComponent(trace);
    const span = hexId(spanId, 16);
    if (span) href += '?uiFind=' + encodeURIComponent(span);
    return h('a', { class: 'link-button', href, target: '_blank', rel: 'noopener noreferrer', 'data-testid': 'jaeger-link' },
      'Open in Jaeger ↗');
  }

  async function api(path) {
    const headers = { Accept: 'application/json' };
    if (token) headers['X-Token'] = encodeURIComponent(token);  // any token, even beyond Latin-1, as ASCII
    const response = await fetch(path, { headers, cache: 'no-store' });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const error = new Error((body && body.error) || ('HTTP ' + response.status));
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // --- clock: running bars grow to "now" on the server's clock ---------------------------------
  let clockSkew = 0;  // server time - browser time (ms), from the envelopes' timestamps

  // --- run list ---------------------------------------------------------------------------------
  const runItems = new Map();   // run key -> {el, data, durationEl}
  let runsTimer = null;
  let runsInFlight = false;
  let lastRunsFetch = 0;

  function refreshRunsSoon(delay) {
    if (runsTimer) return;
    const wait = Math.max(delay || 0, 1200 - (performance.now() - lastRunsFetch));
    runsTimer = setTimeout(() => { runsTimer = null; refreshRuns(); }, Math.max(0, wait));
  }

  async function refreshRuns() {
    if (runsInFlight) { refreshRunsSoon(300); return; }
    runsInFlight = true;
    lastRunsFetch = performance.now();
    try {
      const runs = await api('/api/runs?limit=200');
      dom.runsError.hidden = true;
      renderRuns(runs || []);
    } catch (error) {
      dom.runsError.hidden = false;
      dom.runsError.textContent = error.status === 503 ? 'Waiting for the database: ' + error.message : 'Cannot list runs: ' + error.message;
      refreshRunsSoon(1000);
    } finally {
      runsInFlight = false;
    }
  }

  function renderRuns(runs) {
    const seen = new Set();
    let previous = null;
    for (const run of runs) {
      const key = run.run_id;
      if (!key) continue;
      seen.add(key);
      let item = runItems.get(key);
      if (!item) {
        const el = h('button', { class: 'run-item', type: 'button', role: 'listitem', 'data-testid': 'run-row' });
        el.dataset.runId = key;
        el.addEventListener('click', () => { location.hash = '#/run/' + encodeURIComponent(key); });
        item = { el, data: null, durationEl: null, agoEl: null };
        runItems.set(key, item);
      }
      if (JSON.stringify(item.data) !== JSON.stringify(run)) fillRunItem(item, run);
      // keep the server's order (newest first) with as few moves as possible
      const wanted = previous ? previous.nextSibling : dom.runList.firstChild;
      if (wanted !== item.el) dom.runList.insertBefore(item.el, wanted);
      previous = item.el;
    }
    for (const [key, item] of runItems) {
      if (!seen.has(key)) { item.el.remove(); runItems.delete(key); }
    }
    let placeholder = dom.runList.querySelector('.run-empty');
    if (!runs.length && !placeholder) {
      dom.runList.append(h('div', { class: 'run-empty' }, 'No runs yet. Start one (e.g. otel-cmbagent demo): it appears here live.'));
    } else if (runs.length && placeholder) placeholder.remove();
    dom.runCount.textContent = runs.length ? String(runs.length) : '';
    markSelectedRun();
    if (!R && runs.length && !routeKey()) location.hash = '#/run/' + encodeURIComponent(runs[0].run_id);  // newest first
    if (R) { const item = runItems.get(R.key); if (item) { R.summary = item.data; R.headerDirty = true; schedule(); } }
  }

  function fillRunItem(item, run) {
    item.data = run;
    const el = item.el;
    const live = run.status === 'running';
    el.dataset.status = run.status || '';
    el.dataset.live = live ? 'true' : 'false';
    const badge = statusBadge(run.status, live ? 'LIVE' : null);
    badge.setAttribute('data-testid', 'run-status');
    const failed = Number(run.failed_events) || 0;   // e.g. a failed tool call the run recovered from
    el.dataset.failedEvents = String(failed);
    item.durationEl = h('span', null, fmtDur(runDuration(run)));
    item.agoEl = h('span', { title: run.started_at || '' }, fmtAgo(parseTime(run.started_at)));
    const tokensIn = Number(run.input_tokens) || 0, tokensOut = Number(run.output_tokens) || 0;
    el.title = runTitle(run.name) + '\n' + run.run_id;
    el.replaceChildren(
      h('div', { class: 'run-line1' }, badge,
        failed && run.status !== 'failed' ? h('span', { class: 'badge failed', 'data-testid': 'run-failed', title: failed + ' failed events' }, failed + ' failed') : null,
        h('span', { class: 'run-name' }, runTitle(run.name))),
      h('div', { class: 'run-line2' },
        h('span', { class: 'mono' }, shortId(run.run_id)),
        item.agoEl,
        run.agents && run.agents.length ? h('span', null, run.agents.length + ' agents') : null),
      h('div', { class: 'run-stats' },
        h('span', { title: 'duration' }, item.durationEl),
        h('span', { title: 'events' }, h('b', null, fmtNum(run.events)), ' events'),
        h('span', { title: 'input / output tokens' }, h('b', null, fmtCompact(tokensIn)), '/', h('b', null, fmtCompact(tokensOut)), ' tok'),
        h('span', { title: 'cost' }, fmtCost(run.cost))),
    );
  }

  function runDuration(run) {
    if (run.status === 'running') {
      const started = parseTime(run.started_at);
      if (isFinite(started)) return Math.max(0, Date.now() + clockSkew - started);
    }
    return run.duration_ms;
  }

  function markSelectedRun() {
    for (const [key, item] of runItems) item.el.classList.toggle('selected', !!R && R.key === key);
  }

  function statusBadge(status, label) {
    // interrupted: its process was stopped (SIGTERM) or is gone (killed) while it ran - final, not live
    const cls = status === 'failed' || status === 'running' || status === 'interrupted' ? status : 'completed';
    const badge = h('span', { class: 'badge ' + cls });
    if (cls === 'running') badge.append(h('span', { class: 'live-dot' }));
    badge.append(document.createTextNode(label || (cls === 'running' ? 'running' : cls)));
    return badge;
  }

  let ticks = 0;
  setInterval(() => {   // live durations (every second) and "started … ago" (every 10 s) in the list
    const ages = ++ticks % 10 === 0;
    for (const item of runItems.values()) {
      if (!item.data) continue;
      if (item.data.status === 'running' && item.durationEl) item.durationEl.textContent = fmtDur(runDuration(item.data));
      if (ages && item.agoEl) item.agoEl.textContent = fmtAgo(parseTime(item.data.started_at));
    }
  }, 1000);

  // --- the selected run -------------------------------------------------------------------------
  let R = null;   // state of the run on screen

  function newRun(key) {
    return {
      key,
      summary: runItems.has(key) ? runItems.get(key).data : null,
      base: null,              // ms epoch that bar times are relative to
      events: new Map(),       // id -> ev (spans and messages)
      roots: [],
      flat: [],                // spans in tree order (depth first, siblings by execution order)
      display: [],             // flat after filters / collapsed subtrees
      waiting: new Map(),      // parent id -> evs that arrived before their parent
      orders: new Set(),       // orders seen above contig (after a gap)
      contig: 0,               // every order 1..contig has been seen
      running: new Set(),
      minStart: Infinity, maxEnd: -Infinity,
      typeCounts: new Map(), agentCounts: new Map(),
      tokensIn: 0, tokensOut: 0, cost: 0, llmCalls: 0,
      root: null,
      selected: null, collapsed: new Set(),
      loaded: false, buffer: [], queue: [],
      structDirty: true, needRebuild: false, windowDirty: true, dirtyRows: new Set(),
      legendDirty: true, headerDirty: true, detailsDirty: true,
      rowEls: new Map(), pool: [],
      vars: { t0: null, scale: null }, axisKey: '', lastHeader: 0, trackWidth: 0, bodyWidth: -1,
      liveEnd: null, now: 0, lastNowTick: 0, nowDirty: true, nowLine: null, runningBars: new Set(),
      firstPainted: false,
      epoch: 0,                // bumped when every row must be redrawn (filters change the indentation)
    };
  }

  function routeKey() {
    const match = /^#\/run\/(.+)$/.exec(location.hash);
    if (!match) return null;
    try { return decodeURIComponent(match[1]); } catch (e) { return null; }
  }

  async function selectRun(key) {
    if (!key || (R && R.key === key)) return;
    // recycle the previous run's rows
    if (R) for (const row of R.rowEls.values()) row.remove();
    R = newRun(key);
    const run = R;
    dom.empty.hidden = true;
    dom.runView.hidden = false;
    dom.waterfall.dataset.ready = 'false';
    dom.waterfall.dataset.runId = key;
    dom.loading.hidden = false;
    dom.loading.textContent = 'Loading events…';
    dom.filterType.value = ''; dom.filterAgent.value = ''; dom.filterText.value = '';
    filters.type = ''; filters.agent = ''; filters.text = '';
    dom.body.scrollTop = 0;
    view.scrollTop = 0;
    markSelectedRun();
    renderDetails();
    schedule();
    try {
      const requested = performance.now();
      const columns = await api('/api/runs/' + encodeURIComponent(key) + '/columns');
      if (R !== run) return;
      const received = performance.now();
      bulkLoad(columns);
      run.loaded = true;
      STATS.runLoadedAt = performance.now();
      STATS.fetchMs = received - requested;          // request + server + download + JSON parse
      STATS.buildMs = STATS.runLoadedAt - received;  // rows -> tree
      for (const data of run.buffer) apply(data);
      run.buffer = [];
      dom.loading.hidden = true;
      if (ws && ws.readyState === WebSocket.OPEN) catchUp();  // anything written between the fetch and now
    } catch (error) {
      if (R !== run) return;
      dom.loading.hidden = false;
      dom.loading.textContent = error.status === 404 ? 'No such run: ' + key : 'Cannot load the run: ' + error.message;
      if (error.status === 404) { run.missing = true; run.headerDirty = true; }
    }
    schedule();
  }

  async function catchUp() {
    const run = R;
    if (!run || !run.loaded) return;
    const running = Array.from(run.running).slice(0, 200);
    let path = '/api/runs/' + encodeURIComponent(run.key) + '/events?after=' + run.contig;
    if (running.length) path += '&running=' + encodeURIComponent(running.join(','));
    try {
      const rows = await api(path);
      if (R !== run) return;
      for (const data of rows || []) run.queue.push(data);
      schedule();
    } catch (e) { /* the next reconnect tries again */ }
  }

  // --- events -> tree -------------------------------------------------------------------------------
  // cmbagent's rows: a message is an agent_call of subtype "message" (agent_name = its recipient)
  function kindOf(d) {
    return d.event_type === 'agent_call' && d.event_subtype === 'message' ? 'message' : (d.event_type || 'info');
  }

  function spanName(d) {
    const meta = d.meta && typeof d.meta === 'object' ? d.meta : {};
    if (kindOf(d) === 'message') {
      const inputs = d.inputs && typeof d.inputs === 'object' ? d.inputs : {};
      const to = inputs.recipient || d.agent_name;
      return 'message ' + (inputs.sender || '?') + (to ? ' → ' + to : '');
    }
    return meta.span_name || d.event_type || 'event';
  }

  function setTimes(ev, d) {
    let start = parseTime(d.started_at || d.timestamp);
    if (!isFinite(start)) start = parseTime(d.timestamp);
    if (R.base === null && isFinite(start)) R.base = start;
    ev.s = isFinite(start) ? start - R.base : 0;
    if (ev.status === 'running') { ev.e = null; return; }
    const end = parseTime(d.completed_at);
    if (isFinite(end)) ev.e = Math.max(ev.s, end - R.base);
    else if (typeof d.duration_ms === 'number') ev.e = ev.s + d.duration_ms;
    else ev.e = ev.s;
  }

  function insertSorted(list, ev) {
    let lo = 0, hi = list.length;
    if (hi === 0 || list[hi - 1].order <= ev.order) { list.push(ev); return hi; }
    while (lo < hi) { const mid = (lo + hi) >> 1; if (list[mid].order <= ev.order) lo = mid + 1; else hi = mid; }
    list.splice(lo, 0, ev);
    return lo;
  }

  function lastDescendant(ev) {
    while (ev.children.length) ev = ev.children[ev.children.length - 1];
    return ev;
  }

  function countUsage(ev, sign) {
    if (ev.type !== 'llm_call' || ev.status === 'running') return;
    R.tokensIn += sign * ev.tin;
    R.tokensOut += sign * ev.tout;
    R.cost += sign * ev.cost;
    R.llmCalls += sign;
  }

  /** A live row's fields (websocket, catch-up): what the columns endpoint sends for it. */
  function fromRow(ev, d) {
    const meta = d.meta && typeof d.meta === 'object' ? d.meta : {};
    ev.status = d.status || 'completed';
    ev.name = spanName(d);
    ev.dur = typeof d.duration_ms === 'number' ? d.duration_ms : null;
    ev.tin = Number(meta['gen_ai.usage.input_tokens']) || 0;
    ev.tout = Number(meta['gen_ai.usage.output_tokens']) || 0;
    ev.cost = Number(meta['gen_ai.usage.cost']) || 0;
    if (!R.traceId && d.trace_id) R.traceId = d.trace_id;
    setTimes(ev, d);
  }

  function bump(map, key, by) { if (key) map.set(key, (map.get(key) || 0) + by); }

  const NONE = Object.freeze([]);   // the children / messages of a span that has none (most have none)
  function listOf(ev, key) {
    if (ev[key] === NONE) ev[key] = [];
    return ev[key];
  }

  function newEv(id, parentId, type, order, agent) {
    return {
      id, parentId, type, order, agent, status: 'completed', name: '',
      s: 0, e: null, dur: null, tin: 0, tout: 0, cost: 0,
      children: NONE, msgs: NONE, parent: null, level: 0,   // own lists once something is added
      v: 1, dv: 0,                // row version (redraw), details version (fetch again)
    };
  }

  function makeEv(d) {
    const ev = newEv(d.id || d.event_id, d.parent_event_id || null, kindOf(d), Number(d.execution_order) || 0,
      d.agent_name || '');
    fromRow(ev, d);
    return ev;
  }

  /** A span of the columns response (see otel_cmbagent/table/columns.py). */
  function columnEv(c, i) {
    const ev = newEv(c.id[i], c.parent[i] || null, c.kind[i], c.order[i], c.agent[i] || '');
    ev.status = c.status[i] || 'completed';
    ev.name = c.name[i];
    ev.s = c.start[i];
    ev.dur = c.duration[i];
    const end = c.end[i];
    if (ev.status === 'running') ev.e = null;
    else if (end !== null) ev.e = Math.max(ev.s, end);
    else ev.e = typeof ev.dur === 'number' ? ev.s + ev.dur : ev.s;
    return ev;
  }

  function track(ev) {
    R.events.set(ev.id, ev);
    if (ev.order === R.contig + 1) R.contig++;   // the usual case: orders come in sequence
    else if (ev.order > R.contig) R.orders.add(ev.order);
    while (R.orders.size && R.orders.delete(R.contig + 1)) R.contig++;
    bump(R.typeCounts, ev.type, 1);
    if (ev.agent) {
      if (!R.agentCounts.has(ev.agent)) R.legendDirty = true;
      bump(R.agentCounts, ev.agent, 1);
    }
    if (ev.status === 'running') R.running.add(ev.id);
    if (ev.type === 'run' && (!R.root || ev.order < R.root.order)) R.root = ev;
    countUsage(ev, 1);
    extendTime(ev);
  }

  function extendTime(ev) {
    if (ev.s < R.minStart) R.minStart = ev.s;
    const end = ev.e === null ? ev.s : ev.e;
    if (end > R.maxEnd) R.maxEnd = end;
  }

  /** Initial load from columns: rows arrive in execution order, so children lists come out sorted. */
  function bulkLoad(c) {
    const n = c && c.count ? c.count : 0;
    if (n) { R.base = c.base; R.traceId = c.trace_id || null; }
    const evs = new Array(n);
    for (let i = 0; i < n; i++) evs[i] = columnEv(c, i);
    let at = null;   // execution order -> span, made only if the orders are not 1..n (usage names rows by order)
    for (const [order, tokensIn, tokensOut, cost] of (n ? c.usage : [])) {
      let ev = evs[order - 1];
      if (!ev || ev.order !== order) {
        if (at === null) { at = new Map(); for (let i = n - 1; i >= 0; i--) at.set(evs[i].order, evs[i]); }
        ev = at.get(order);
      }
      if (ev) { ev.tin = Number(tokensIn) || 0; ev.tout = Number(tokensOut) || 0; ev.cost = Number(cost) || 0; }
    }
    for (const ev of evs) {
      if (!ev.id || R.events.has(ev.id)) continue;
      track(ev);
    }
    for (const ev of R.events.values()) attach(ev, false);
    rebuildFlat();
    R.legendDirty = R.headerDirty = true;
  }

  /** Link ev to its parent (or the roots / the waiting list). With `incremental`, splice it into flat. */
  function attach(ev, incremental) {
    const parent = ev.parentId ? R.events.get(ev.parentId) : null;
    if (ev.type === 'message') {
      if (parent) { insertSorted(listOf(parent, 'msgs'), ev); parent.dv++; if (incremental) markRow(parent); }
      else waitFor(ev);
      return;
    }
    if (incremental) {
      const early = R.waiting.get(ev.id);
      if (early) {   // children (or messages) that came before this span: adopt them, rebuild the order
        R.waiting.delete(ev.id);
        for (const child of early) {
          if (child.type === 'message') { insertSorted(listOf(ev, 'msgs'), child); continue; }
          const i = R.roots.indexOf(child);
          if (i >= 0) R.roots.splice(i, 1);
          child.parent = ev;
          insertSorted(listOf(ev, 'children'), child);
          R.needRebuild = true;
        }
      }
    }
    let siblings;
    if (parent && parent.type !== 'message') {
      ev.parent = parent;
      ev.level = parent.level + 1;
      siblings = listOf(parent, 'children');
      if (incremental) markRow(parent);   // its caret may appear (a first load draws every row anyway)
    } else {
      if (ev.parentId && !parent) waitFor(ev);
      ev.level = 0;
      siblings = R.roots;
    }
    const k = insertSorted(siblings, ev);
    if (!incremental || R.needRebuild) return;
    const anchor = k > 0 ? lastDescendant(siblings[k - 1]) : (siblings === R.roots ? null : parent);
    let position;
    if (anchor === null) position = 0;
    else if (R.flat.length && R.flat[R.flat.length - 1] === anchor) position = R.flat.length;
    else {
      const i = R.flat.lastIndexOf(anchor);
      if (i < 0) { R.needRebuild = true; return; }
      position = i + 1;
    }
    if (position === R.flat.length) R.flat.push(ev); else R.flat.splice(position, 0, ev);
  }

  function waitFor(ev) {
    let list = R.waiting.get(ev.parentId);
    if (!list) { list = []; R.waiting.set(ev.parentId, list); }
    list.push(ev);
  }

  function rebuildFlat() {
    const flat = [];
    const stack = [];
    for (let i = R.roots.length - 1; i >= 0; i--) { R.roots[i].level = 0; stack.push(R.roots[i]); }
    while (stack.length) {
      const ev = stack.pop();
      flat.push(ev);
      for (let i = ev.children.length - 1; i >= 0; i--) {
        const child = ev.children[i];
        child.level = ev.level + 1;
        stack.push(child);
      }
    }
    R.flat = flat;
    R.needRebuild = false;
    R.structDirty = true;
  }

  function markRow(ev) {
    ev.v++;
    R.dirtyRows.add(ev);
    if (R.selected === ev.id) R.detailsDirty = true;
  }

  /** Apply one row (from the websocket or a catch-up fetch): insert it, or update it (never backwards). */
  function apply(d) {
    const id = d.id || d.event_id;
    if (!id) return;
    const ev = R.events.get(id);
    if (ev) {
      if (ev.status !== 'running' || d.status === 'running') return;   // final rows do not change
      countUsage(ev, -1);
      const hadAgent = ev.agent;
      fromRow(ev, d);
      ev.agent = d.agent_name || hadAgent;
      if (ev.agent && ev.agent !== hadAgent) { bump(R.agentCounts, ev.agent, 1); R.legendDirty = true; }
      ev.dv++;   // its details changed: fetched again when shown
      R.running.delete(id);
      countUsage(ev, 1);
      extendTime(ev);
      markRow(ev);
      if (ev.type === 'run') R.headerDirty = true;
      if (filters.text || filters.agent) R.structDirty = true;
      return;
    }
    const created = makeEv(d);
    track(created);
    attach(created, true);
    if (created.type !== 'message') R.structDirty = true;
    R.legendDirty = true;
  }

  // --- filters ------------------------------------------------------------------------------------
  const filters = { type: '', agent: '', text: '' };

  function passes(ev) {
    if (filters.type && ev.type !== filters.type) return false;
    if (filters.agent && ev.agent !== filters.agent) return false;
    if (filters.text) {
      const needle = filters.text;
      if (ev.name.toLowerCase().indexOf(needle) < 0 && ev.agent.toLowerCase().indexOf(needle) < 0) return false;
    }
    return true;
  }

  function rebuildDisplay() {
    if (R.needRebuild) rebuildFlat();
    const filtered = filters.type || filters.agent || filters.text;
    if (!filtered && R.collapsed.size === 0) { R.display = R.flat; return; }
    const out = [];
    let skipBelow = Infinity;   // level of a collapsed span whose subtree is being skipped
    for (const ev of R.flat) {
      if (!filtered) {
        if (ev.level > skipBelow) continue;
        skipBelow = R.collapsed.has(ev.id) ? ev.level : Infinity;
        out.push(ev);
      } else if (passes(ev)) out.push(ev);
    }
    R.display = out;
  }

  dom.filterType.addEventListener('change', () => { filters.type = dom.filterType.value; filtersChanged(); });
  dom.filterAgent.addEventListener('change', () => { filters.agent = dom.filterAgent.value; filtersChanged(); });
  dom.filterText.addEventListener('input', () => { filters.text = dom.filterText.value.trim().toLowerCase(); filtersChanged(); });
  function filtersChanged() {
    if (!R) return;
    R.structDirty = true;
    R.legendDirty = true;
    R.epoch++;
    dom.body.scrollTop = 0;
    view.scrollTop = 0;
    schedule();
  }

  function renderFilters() {
    fillSelect(dom.filterType, 'all types',
      TYPES.concat(Array.from(R.typeCounts.keys()).filter((t) => !TYPES.includes(t) && t !== 'message'))
        .filter((t) => R.typeCounts.get(t)).map((t) => [t, (TYPE_NAMES[t] || t) + ' (' + R.typeCounts.get(t) + ')']),
      filters.type);
    const agents = Array.from(R.agentCounts.keys()).sort((a, b) => a.localeCompare(b));
    fillSelect(dom.filterAgent, 'all agents', agents.map((a) => [a, a]), filters.agent);
    const legend = [];
    for (const type of TYPES) {
      const count = R.typeCounts.get(type) || 0;
      const item = h('span', { class: 'legend-item ' + typeClass(type) + (count ? '' : ' absent'), 'data-type': type },
        h('span', { class: 'swatch' }), TYPE_NAMES[type] || type);
      if (count) item.append(' ', h('b', null, String(count)));
      legend.push(item);
    }
    const messages = R.typeCounts.get('message') || 0;
    legend.push(h('span', { class: 'legend-item t-message' + (messages ? '' : ' absent'), 'data-type': 'message', title: 'messages are the ticks under the bars' },
      h('span', { class: 'swatch' }), 'message', messages ? ' ' : null, messages ? h('b', null, String(messages)) : null));
    dom.legend.replaceChildren(...legend);
  }

  function fillSelect(select, allLabel, options, current) {
    const key = JSON.stringify(options);
    if (select._key === key) return;
    select._key = key;
    const nodes = [h('option', { value: '' }, allLabel)];
    for (const [value, label] of options) nodes.push(h('option', { value }, label));
    if (current && !options.some(([value]) => value === current)) nodes.push(h('option', { value: current }, current));
    select.replaceChildren(...nodes);
    select.value = current || '';
  }

  // --- rendering ------------------------------------------------------------------------------------
  let frameRequested = false;
  let tickTimer = null;
  function schedule() {
    if (!frameRequested) { frameRequested = true; requestAnimationFrame(frame); }
  }

  function frame() {
    frameRequested = false;
    if (!R) return;
    const started = performance.now();
    let applied = 0;
    if (R.loaded && R.queue.length) {
      const queue = R.queue;
      R.queue = [];
      for (const data of queue) apply(data);
      applied = queue.length;
    }
    render();
    const spent = performance.now() - started;
    STATS.frames++;
    if (spent > STATS.maxFrameMs) STATS.maxFrameMs = spent;
    if (applied) { STATS.applied += applied; STATS.applyMs += spent; }
    if (R.loaded && !R.firstPainted) {
      R.firstPainted = true;
      const run = R;
      requestAnimationFrame(() => {   // the frame holding the first render has been painted
        if (R !== run) return;
        if (STATS.firstRender === null) {
          STATS.firstRender = performance.now();
          try { performance.mark('otel-cmbagent:waterfall-complete'); } catch (e) { /* old browsers */ }
        }
        dom.waterfall.dataset.ready = 'true';
      });
    }
    if (R.queue.length) schedule();
    else if (R.running.size && !tickTimer) tickTimer = setTimeout(() => { tickTimer = null; schedule(); }, 35);  // ~25 fps growth
  }

  function render() {
    if (R.structDirty) {
      rebuildDisplay();
      R.structDirty = false;
      R.windowDirty = true;
      dom.canvas.style.height = (R.display.length * ROW_H) + 'px';
      dom.count.textContent = (R.display.length === R.flat.length ? '' : R.display.length + ' of ') + R.flat.length + ' spans';
    }
    updateScale();
    if (R.windowDirty) { renderWindow(); R.windowDirty = false; R.dirtyRows.clear(); }
    else if (R.dirtyRows.size) {
      for (const ev of R.dirtyRows) {
        const row = R.rowEls.get(ev.id);
        if (row && row._v !== ev.v) fillRow(row, ev);
      }
      R.dirtyRows.clear();
    }
    if (R.legendDirty) { renderFilters(); R.legendDirty = false; }
    const now = performance.now();
    if (R.headerDirty || (R.running.size && now - R.lastHeader > 250)) {
      renderHeader(); R.headerDirty = false; R.lastHeader = now;
      if (liveDuration) liveDuration();
    }
    if (R.detailsDirty) {
      const opening = dom.details.hidden;
      renderDetails(); R.detailsDirty = false;
      if (opening && !dom.details.hidden) revealSelected();
    }
  }

  function nowRelative() { return R.base === null ? 0 : Date.now() + clockSkew - R.base; }

  // Geometry of the scroll box, read only when it changes (reading it in a frame would force a layout).
  const view = { width: -1, height: 600, scrollTop: 0 };
  function measureView() {
    view.width = dom.body.clientWidth;
    view.height = dom.body.clientHeight || 600;
    view.scrollTop = dom.body.scrollTop;
  }

  /** Time axis: while a run is live its end is "now" plus 25% headroom, so the scale changes in rare steps
   *  (every bar moves in CSS then) and between steps only the running bars' --now is updated. */
  function updateScale() {
    if (view.width < 0) measureView();
    if (view.width !== R.bodyWidth) {
      R.bodyWidth = view.width;
      const labelWidth = parseFloat(getComputedStyle(document.documentElement).getPropertyValue('--label-w')) || 320;
      R.trackWidth = Math.max(60, view.width - labelWidth - 8 - TRACK_RIGHT_PAD);
    }
    const live = R.running.size > 0;
    const now = nowRelative();
    const t0 = isFinite(R.minStart) ? R.minStart : 0;
    let end = isFinite(R.maxEnd) ? R.maxEnd : t0;
    if (live) {
      end = Math.max(end, now);
      if (R.liveEnd === null || end > R.liveEnd || R.liveEnd - t0 > 2 * (end - t0) + 1000) R.liveEnd = t0 + (end - t0) * 1.25 + 200;
      end = R.liveEnd;
    } else R.liveEnd = null;
    const total = Math.max(end - t0, 1);
    const scale = R.trackWidth / total;
    setVar('t0', t0);
    setVar('scale', scale);
    renderAxis(total, scale, live);
    if (live) {
      const tick = performance.now();
      if (tick - R.lastNowTick >= 40 || R.nowDirty) {   // running bars grow at ~25 fps
        R.lastNowTick = tick;
        R.nowDirty = false;
        R.now = now;
        const value = String(now);
        for (const bar of R.runningBars) bar.style.setProperty('--now', value);
        if (R.nowLine) R.nowLine.style.left = ((now - t0) * scale) + 'px';
      }
    }
  }

  function setVar(name, value) {
    if (R.vars[name] === value) return;
    R.vars[name] = value;
    dom.canvas.style.setProperty('--' + name, String(value));
  }

  function niceStep(raw) {
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function renderAxis(total, scale, live) {
    const count = Math.max(2, Math.floor(R.trackWidth / 85));
    const step = niceStep(total / count);
    const key = step + ':' + total + ':' + scale + ':' + live;
    if (key === R.axisKey) return;
    R.axisKey = key;
    const ticks = [], lines = [];
    for (let t = 0; t <= total + 1e-9; t += step) {
      const x = t * scale;
      const left = (8 + x) + 'px';
      const tick = h('div', { class: 'axis-tick' }, fmtAxis(t, step));
      tick.style.left = left;
      ticks.push(tick);
      const line = h('div', { class: 'grid-line' });
      line.style.left = x + 'px';
      lines.push(line);
    }
    R.nowLine = null;
    if (live) { R.nowLine = h('div', { class: 'now-line', title: 'now' }); lines.push(R.nowLine); R.nowDirty = true; }
    dom.axis.replaceChildren(...ticks);
    dom.grid.replaceChildren(...lines);
  }

  function renderWindow() {
    const display = R.display;
    const top = view.scrollTop;
    const height = view.height;
    const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
    const last = Math.min(display.length, Math.ceil((top + height) / ROW_H) + OVERSCAN);
    const previous = R.rowEls;
    const next = new Map();
    for (let i = first; i < last; i++) {
      const ev = display[i];
      let row = previous.get(ev.id);
      if (row) previous.delete(ev.id);
      else {
        row = R.pool.pop() || makeRow();
        row._v = -1;
      }
      if (row._v !== ev.v || row._ev !== ev || row._epoch !== R.epoch) fillRow(row, ev);
      if (row._i !== i) { row.style.transform = 'translateY(' + (i * ROW_H) + 'px)'; row._i = i; }
      if (!row.isConnected) dom.canvas.append(row);
      next.set(ev.id, row);
    }
    for (const row of previous.values()) {
      row.remove();
      row._ev = null;
      if (row._bar) { R.runningBars.delete(row._bar); row._bar = null; }
      R.pool.push(row);
    }
    R.rowEls = next;
  }

  function makeRow() {
    const row = document.createElement('div');
    row.className = 'wf-row';
    row.setAttribute('data-testid', 'span-row');
    row._i = -1;
    return row;
  }

  function fillRow(row, ev) {
    row._ev = ev;
    row._v = ev.v;
    row._epoch = R.epoch;
    row.className = 'wf-row' + (R.selected === ev.id ? ' selected' : '');
    row.dataset.eventId = ev.id;
    row.dataset.type = ev.type;
    row.dataset.status = ev.status;
    const hasChildren = ev.children.length > 0;
    const caret = h('span', { class: 'caret' + (hasChildren ? ' has-children' : ''), 'data-action': hasChildren ? 'toggle' : null },
      hasChildren ? (R.collapsed.has(ev.id) ? '▸' : '▾') : '');
    const label = h('div', { class: 'wf-label', title: ev.name + (ev.agent ? ' · ' + ev.agent : '') },
      caret,
      h('span', { class: 'swatch ' + typeClass(ev.type) }),
      h('span', { class: 'lbl-name' }, ev.name),
      ev.agent && ev.name.indexOf(ev.agent) < 0 ? h('span', { class: 'lbl-agent' }, ev.agent) : null,
      ev.status === 'failed' ? h('span', { class: 'lbl-status failed', title: 'failed' }, '✕') : null,
      ev.status === 'interrupted' ? h('span', { class: 'lbl-status interrupted', title: 'interrupted' }, '⏹') : null,
      ev.status === 'running' ? h('span', { class: 'lbl-status running', title: 'running' }, '●') : null);
    label.style.setProperty('--indent', String(filters.type || filters.agent || filters.text ? 0 : ev.level));
    const bar = h('div', {
      class: 'bar ' + typeClass(ev.type) + (ev.status === 'running' || ev.status === 'failed' || ev.status === 'interrupted' ? ' ' + ev.status : ''),
      'data-testid': 'bar', 'data-event-id': ev.id, 'data-type': ev.type, 'data-status': ev.status, 'data-agent': ev.agent,
      title: ev.name + ' — ' + (ev.status === 'running' ? 'running' : fmtDur(evDuration(ev))) + (ev.status === 'failed' || ev.status === 'interrupted' ? ' (' + ev.status + ')' : ''),
    }, h('span', { class: 'bar-fill' }), h('span', { class: 'bar-dur' }, ev.status === 'running' ? 'running…' : fmtDur(evDuration(ev))));
    bar.style.setProperty('--s', String(ev.s));
    if (ev.e !== null) bar.style.setProperty('--e', String(ev.e));
    if (row._bar) R.runningBars.delete(row._bar);
    row._bar = null;
    if (ev.status === 'running') {
      bar.style.setProperty('--now', String(Math.max(R.now, ev.s)));
      R.runningBars.add(bar);
      row._bar = bar;
    }
    const trackEl = h('div', { class: 'wf-track' }, bar);
    const msgs = ev.msgs;
    const shown = Math.min(msgs.length, MAX_TICKS_PER_ROW);
    for (let i = 0; i < shown; i++) {
      const msg = msgs[i];
      const tick = h('div', { class: 'tick', 'data-testid': 'msg-tick', 'data-event-id': msg.id, title: msg.name });
      tick.style.setProperty('--s', String(msg.s));
      trackEl.append(tick);
    }
    row.replaceChildren(label, trackEl);
  }

  dom.body.addEventListener('scroll', () => {
    view.scrollTop = dom.body.scrollTop;
    if (R) { R.windowDirty = true; schedule(); }
  }, { passive: true });
  if (window.ResizeObserver) {
    new ResizeObserver(() => {
      measureView();
      if (R) { R.axisKey = ''; R.windowDirty = true; schedule(); }
    }).observe(dom.body);
  }

  dom.canvas.addEventListener('click', (event) => {
    if (!R) return;
    const target = event.target instanceof Element ? event.target : null;
    if (!target) return;
    const caret = target.closest('[data-action="toggle"]');
    const row = target.closest('.wf-row');
    if (caret && row) {
      const id = row.dataset.eventId;
      if (R.collapsed.has(id)) R.collapsed.delete(id); else R.collapsed.add(id);
      const ev = R.events.get(id);
      if (ev) markRow(ev);
      R.structDirty = true;
      schedule();
      return;
    }
    const tick = target.closest('.tick');
    const id = tick ? tick.dataset.eventId : row ? row.dataset.eventId : null;
    if (id) select(id);
  });

  dom.body.addEventListener('keydown', (event) => {
    if (!R || !R.display.length || (event.key !== 'ArrowDown' && event.key !== 'ArrowUp')) return;
    event.preventDefault();
    const current = R.selected ? R.events.get(R.selected) : null;
    const span = current && current.type === 'message' ? current.parent || R.events.get(current.parentId) : current;
    let i = span ? R.display.indexOf(span) : -1;
    i = Math.max(0, Math.min(R.display.length - 1, i + (event.key === 'ArrowDown' ? 1 : -1)));
    select(R.display[i].id);
    reveal(i);
  });

  function reveal(i) {
    const y = i * ROW_H;
    if (y < dom.body.scrollTop) dom.body.scrollTop = y;
    else if (y + ROW_H > dom.body.scrollTop + dom.body.clientHeight - ROW_H) dom.body.scrollTop = y - dom.body.clientHeight + 2 * ROW_H;
  }

  function revealSelected() {   // after the details pane opened: the selected row stays on screen
    const ev = R && R.selected ? R.events.get(R.selected) : null;
    const span = ev && ev.type === 'message' ? ev.parent || R.events.get(ev.parentId) : ev;
    const i = span ? R.display.indexOf(span) : -1;
    if (i >= 0) reveal(i);
  }

  function select(id) {
    const before = R.selected ? R.events.get(R.selected) : null;
    R.selected = id;
    if (before) markRow(before);
    const ev = R.events.get(id);
    if (ev) { markRow(ev); if (ev.type === 'message' && ev.parentId && R.events.get(ev.parentId)) markRow(R.events.get(ev.parentId)); }
    R.detailsDirty = true;
    schedule();
  }

  dom.detailsClose.addEventListener('click', () => {
    if (!R) return;
    const before = R.selected ? R.events.get(R.selected) : null;
    R.selected = null;
    if (before) markRow(before);
    R.detailsDirty = true;
    schedule();
  });

  // --- run header ------------------------------------------------------------------------------------
  function stat(label, value, testid, wide) {
    return h('div', { class: 'stat' + (wide ? ' wide' : '') }, h('span', { class: 'stat-label' }, label),
      h('span', { class: 'stat-value', 'data-testid': testid || null, title: wide ? value : null }, value));
  }

  function renderHeader() {
    if (R.missing) {   // an unknown run id: no status, no name, no figures (they would all be made up)
      dom.runHeader.dataset.status = 'missing';
      dom.runHeader.replaceChildren(h('div', { class: 'rh-line1' },
        h('span', { class: 'rh-name', 'data-testid': 'run-name' }, 'No such run')),
        h('div', { class: 'rh-ids' }, 'run ', R.key));
      return;
    }
    const summary = R.summary || {};
    const root = R.root;
    // before the run's rows or summary arrive, its status is unknown: no badge rather than a made-up one
    const status = root ? root.status : (summary.status || (R.running.size ? 'running' : (R.loaded ? 'completed' : null)));
    const live = status === 'running';
    const name = root ? String(root.name).replace(/^invoke_workflow\s+/, '') : (R.summary ? runTitle(summary.name) : R.key);
    let duration;
    if (root && root.e !== null) duration = evDuration(root);
    else if (isFinite(R.minStart)) duration = (live ? nowRelative() : R.maxEnd) - R.minStart;
    const traceId = R.traceId || summary.trace_id;
    const agents = Array.from(R.agentCounts.keys());
    const failed = Number(summary.failed_events) || 0;
    const ids = 'run ' + R.key + (traceId && traceId !== R.key ? '  ·  trace ' + traceId : '') +
      (summary.session_id ? '  ·  session ' + summary.session_id : '');
    dom.runHeader.dataset.status = status || 'loading';
    dom.runHeader.replaceChildren(
      h('div', { class: 'rh-line1' },
        status ? statusBadge(status, live ? 'LIVE' : null) : null,
        failed && status !== 'failed' ? h('span', { class: 'badge failed', 'data-testid': 'run-failed' }, failed + ' failed') : null,
        h('span', { class: 'rh-name', 'data-testid': 'run-name' }, name),
        h('span', { class: 'rh-spacer' }),
        jaegerLink(traceId, null)),
      h('div', { class: 'rh-ids', title: ids }, ids),
      h('div', { class: 'rh-stats' },
        stat('Duration', fmtDur(duration), 'run-duration'),
        stat('Events', fmtNum(R.events.size), 'run-events'),
        stat('Spans', fmtNum(R.flat.length)),
        stat('LLM calls', fmtNum(R.llmCalls)),
        stat('Tokens in / out', fmtNum(R.tokensIn) + ' / ' + fmtNum(R.tokensOut), 'run-tokens'),
        stat('Cost', fmtCost(R.cost)),
        stat('Started', isFinite(R.minStart) && R.base !== null ? fmtClock(R.base + R.minStart) : '—'),
        stat('Agents (' + agents.length + ')', agents.length ? agents.join(', ') : '—', 'run-agents', true)),
    );
  }

  // --- details pane ---------------------------------------------------------------------------------
  let liveDuration = null;   // updates the duration field of a running selection

  const INPUT_LABELS = {
    messages: 'Input (newest message)', message: 'Message', context: 'Context', arguments: 'Arguments',
    code: 'Code', prompt: 'Prompt', content: 'Content', tool_calls: 'Tool calls',
  };
  const OUTPUT_LABELS = { messages: 'Output', result: 'Result', response: 'Response' };
  // shown as fields, not in the inputs section
  const INPUT_FIELDS = ['tool_name', 'file_path', 'file_type', 'from_agent', 'to_agent', 'sender', 'recipient'];

  // The selected event's row and messages, fetched when it is shown and again when it changes (ev.dv); one
  // request at a time (a live span getting messages every frame is fetched again when the previous answer is in).
  const details = { id: null, dv: -1, data: null, loading: null, failed: null };

  function detailsOf(ev) {
    const dv = ev.dv || 0;
    const wanted = ev.id + '#' + dv;
    if (details.id === ev.id && details.dv === dv) return details.data;
    if (details.loading !== null && !details.loading.startsWith(ev.id + '#')) details.loading = null;  // another event
    if (details.loading === null && details.failed !== wanted) {
      details.loading = wanted;
      const run = R;
      api('/api/events/' + encodeURIComponent(ev.id)).then((data) => {
        if (details.loading !== wanted) return;
        details.loading = null;
        details.id = ev.id; details.dv = dv; details.data = data;
        if (R === run && R.selected === ev.id) { R.detailsDirty = true; schedule(); }   // newer: fetched next
      }, () => {
        if (details.loading !== wanted) return;
        details.loading = null; details.failed = wanted;
        if (R === run && R.selected === ev.id) { R.detailsDirty = true; schedule(); }
      });
    }
    return details.id === ev.id ? details.data : null;   // the previous version until the new one arrives
  }

  function renderDetails() {
    liveDuration = null;
    const ev = R && R.selected ? R.events.get(R.selected) : null;
    if (!ev) { dom.details.hidden = true; dom.details.removeAttribute('data-event-id'); return; }
    dom.details.hidden = false;
    dom.details.dataset.eventId = ev.id;
    dom.details.dataset.type = ev.type;
    dom.details.dataset.status = ev.status;
    const fetched = detailsOf(ev);
    dom.details.dataset.loaded = fetched ? 'true' : 'false';
    const d = fetched && fetched.event ? fetched.event : {};
    const meta = d.meta && typeof d.meta === 'object' ? d.meta : {};
    const inputs = d.inputs && typeof d.inputs === 'object' ? d.inputs : (d.inputs != null ? { value: d.inputs } : {});
    const outputs = d.outputs && typeof d.outputs === 'object' ? d.outputs : (d.outputs != null ? { value: d.outputs } : {});

    dom.detailsTitle.replaceChildren(
      h('div', { class: 'dt-name', 'data-testid': 'details-name' }, ev.name),
      h('div', { class: 'dt-badges' },
        h('span', { class: 'badge type ' + typeClass(ev.type) }, TYPE_NAMES[ev.type] || ev.type),
        statusBadge(ev.status)),
    );

    const fields = [];
    const field = (label, value, testid) => {
      if (value === null || value === undefined || value === '') return null;
      const dd = h('dd', { 'data-testid': testid || null }, value instanceof Node ? value : String(value));
      fields.push(h('dt', null, label), dd);
      return dd;
    };
    field('Agent', ev.agent || '—', 'details-agent');
    field('Role', d.agent_role);
    field('Type', TYPE_NAMES[ev.type] || ev.type);
    field('Status', ev.status, 'details-status');
    field('Started', R.base !== null ? fmtClock(R.base + ev.s) : '—');
    const durationCell = field('Duration', ev.status === 'running' ? 'running for ' + fmtDur(nowRelative() - ev.s) : fmtDur(evDuration(ev)), 'details-duration');
    if (ev.status === 'running' && durationCell) liveDuration = () => { durationCell.textContent = 'running for ' + fmtDur(nowRelative() - ev.s); };
    field('Order', '#' + ev.order + ' · depth ' + (d.depth != null ? d.depth : ev.level));
    if (d.step_id) field('Step', d.step_id);
    if (d.node_id && d.node_id !== d.step_id) field('Node', d.node_id);
    const model = meta['gen_ai.response.model'] || meta['gen_ai.request.model'];
    if (model) field('Model', model + (meta['gen_ai.provider.name'] ? ' (' + meta['gen_ai.provider.name'] + ')' : ''));
    const tokensIn = meta['gen_ai.usage.input_tokens'], tokensOut = meta['gen_ai.usage.output_tokens'];
    if (tokensIn != null || tokensOut != null) field('Tokens', fmtNum(Number(tokensIn) || 0) + ' in / ' + fmtNum(Number(tokensOut) || 0) + ' out', 'details-tokens');
    if (meta['gen_ai.usage.cost'] != null) field('Cost', fmtCost(meta['gen_ai.usage.cost']));
    if (inputs.tool_name) field('Tool', inputs.tool_name + (meta['gen_ai.tool.call.id'] ? '  (' + meta['gen_ai.tool.call.id'] + ')' : ''), 'details-tool');
    if (inputs.file_path != null) field('File', String(inputs.file_path), 'details-file');
    if (inputs.file_type || meta['cmbagent.file.change']) field('File kind', [inputs.file_type, meta['cmbagent.file.change'], meta.size_bytes != null ? fmtNum(meta.size_bytes) + ' bytes' : null].filter(Boolean).join(' · '));
    if (ev.type === 'code_exec' && meta.exit_code != null) field('Exit code', String(meta.exit_code));
    if (ev.type === 'code_exec' && meta.language) field('Language', String(meta.language));
    if (inputs.from_agent != null || inputs.to_agent != null) field('Handoff', (inputs.from_agent || '?') + ' → ' + (inputs.to_agent || '?') + (meta.reason ? ' (' + meta.reason + ')' : ''));
    if (ev.type === 'message') {
      field('From', inputs.sender);
      field('To', inputs.recipient || ev.agent);
      if (meta['cmbagent.message.role']) field('Role', meta['cmbagent.message.role']);
    }
    if (meta['gen_ai.conversation.turns'] != null) field('Turns', String(meta['gen_ai.conversation.turns']));

    const body = [h('div', { class: 'section' }, h('dl', { class: 'fields' }, fields))];
    if (!fetched) {
      const failed = details.failed === ev.id + '#' + (ev.dv || 0);
      body.push(h('div', { class: 'section muted', 'data-testid': 'details-loading' },
        failed ? 'Cannot load this event’s inputs, outputs and attributes.' : 'Loading…'));
    }
    if (d.error_message) {
      body.push(h('div', { class: 'section' }, h('div', { class: 'section-title' }, 'Error'),
        h('div', { class: 'error-box', 'data-testid': 'details-error' }, String(d.error_message))));
    }
    const isEmpty = (v) => v === null || v === undefined || (typeof v === 'object' && !Array.isArray(v) && !Object.keys(v).length);
    const inputKeys = Object.keys(inputs).filter((k) => !INPUT_FIELDS.includes(k) && !isEmpty(inputs[k]));
    if (inputKeys.length) {
      body.push(h('div', { class: 'section', 'data-testid': 'details-inputs' },
        h('div', { class: 'section-title' }, ev.type === 'message' ? 'Message' : 'Inputs'),
        inputKeys.map((k) => kv(INPUT_LABELS[k] || k, inputs[k], k))));
    }
    const outputKeys = Object.keys(outputs).filter((k) => !isEmpty(outputs[k]));
    if (outputKeys.length) {
      body.push(h('div', { class: 'section', 'data-testid': 'details-outputs' },
        h('div', { class: 'section-title' }, 'Outputs'),
        outputKeys.map((k) => kv(OUTPUT_LABELS[k] || k, outputs[k], k))));
    }
    if (fetched && fetched.messages && fetched.messages.length) body.push(messagesSection(fetched));
    if (ev.type === 'message' && ev.parentId && R.events.get(ev.parentId)) {
      const parent = R.events.get(ev.parentId);
      body.push(h('div', { class: 'section' }, h('div', { class: 'section-title' }, 'Sent during'),
        h('button', { class: 'more', type: 'button', onclick: () => select(parent.id) }, parent.name)));
    }
    const metaKeys = Object.keys(meta).filter((k) => k !== 'span_name');
    if (metaKeys.length) {
      const list = [];
      for (const k of metaKeys.sort()) {
        const value = meta[k];
        list.push(h('dt', null, k), h('dd', null, typeof value === 'string' ? value : JSON.stringify(value)));
      }
      body.push(h('div', { class: 'section' }, h('details', { class: 'meta' },
        h('summary', null, 'Attributes (' + metaKeys.length + ')'), h('dl', { class: 'fields' }, list))));
    }
    const ids = h('div', { class: 'section muted mono', style: null }, 'event ' + ev.id);
    if (d.trace_id) ids.append(h('br'), 'trace ' + d.trace_id + (d.span_id ? ' · span ' + d.span_id : ''));
    body.push(ids);
    const link = jaegerLink(d.trace_id, d.span_id);
    if (link) body.push(h('div', { class: 'section' }, link));
    dom.detailsBody.replaceChildren(...body);
  }

  function kv(label, value, key) {
    return h('div', { 'data-key': key }, h('div', { class: 'kv-label' }, label), valueView(value, key));
  }

  function isParts(v) { return Array.isArray(v) && v.length > 0 && v.every((p) => p && typeof p === 'object' && 'type' in p && !('role' in p)); }
  function isMessages(v) { return Array.isArray(v) && v.length > 0 && v.every((m) => m && typeof m === 'object' && 'role' in m); }
  function isCodeBlocks(v) { return Array.isArray(v) && v.length > 0 && v.every((b) => b && typeof b === 'object' && 'code' in b); }

  function partsText(parts) {
    return parts.map((p) => {
      if (p.type === 'text' && typeof p.content === 'string') return p.content;
      if (p.type === 'tool_call') return '→ ' + (p.name || 'tool') + '(' + (typeof p.arguments === 'string' ? p.arguments : JSON.stringify(p.arguments)) + ')';
      if (p.type === 'tool_call_response') return '← ' + (typeof p.response === 'string' ? p.response : JSON.stringify(p.response));
      return JSON.stringify(p, null, 2);
    }).join('\n');
  }

  function messageText(m) {
    if (Array.isArray(m.parts)) return partsText(m.parts);
    if (typeof m.content === 'string') return m.content;
    if (Array.isArray(m.content)) return isParts(m.content) ? partsText(m.content) : JSON.stringify(m.content, null, 2);
    const rest = Object.assign({}, m); delete rest.role; delete rest.name;
    return JSON.stringify(rest, null, 2);
  }

  function pre(text, cls) {
    const el = h('pre', { class: 'val' + (cls ? ' ' + cls : '') });
    const LIMIT = 20000;
    if (text.length > LIMIT) {
      el.textContent = text.slice(0, LIMIT);
      const more = h('button', { class: 'more', type: 'button' }, 'show all ' + fmtNum(text.length) + ' characters');
      more.addEventListener('click', () => { el.textContent = text; more.remove(); });
      return h('div', null, el, more);
    }
    el.textContent = text;
    return el;
  }

  function valueView(value, key) {
    if (value === null || value === undefined) return h('span', { class: 'scalar' }, '—');
    if (typeof value === 'string') {
      const trimmed = value.trim();
      if ((key === 'result' || key === 'arguments') && /^[[{]/.test(trimmed)) {
        try { return pre(JSON.stringify(JSON.parse(trimmed), null, 2)); } catch (e) { /* not JSON: as it is */ }
      }
      return pre(value, key === 'output' ? 'code' : '');
    }
    if (typeof value !== 'object') return h('span', { class: 'scalar' }, String(value));
    if (isParts(value)) return pre(partsText(value));
    if (isMessages(value)) {
      return h('div', null, value.map((m) => h('div', { class: 'msg' },
        h('div', { class: 'msg-head' }, h('b', null, String(m.role)), m.name ? ' · ' + m.name : null),
        pre(messageText(m)))));
    }
    if (isCodeBlocks(value)) {
      return h('div', null, value.map((b) => h('div', null,
        h('div', { class: 'muted', style: null }, String(b.language || 'code')), pre(String(b.code), 'code'))));
    }
    return pre(JSON.stringify(value, null, 2));
  }

  function messagesSection(fetched) {
    const list = fetched.messages;
    const total = Math.max(list.length, Number(fetched.message_count) || 0);
    const items = [];
    for (const row of list.slice(0, MAX_MESSAGES_LISTED)) {
      const msg = { id: row.id, order: row.execution_order, agent: row.agent_name };
      const inputs = row.inputs && typeof row.inputs === 'object' ? row.inputs : {};
      let text = '';
      if (inputs.content !== undefined) text = typeof inputs.content === 'string' ? inputs.content : isParts(inputs.content) ? partsText(inputs.content) : JSON.stringify(inputs.content, null, 2);
      if (inputs.tool_calls) text += (text ? '\n' : '') + JSON.stringify(inputs.tool_calls, null, 2);
      const head = h('div', { class: 'msg-head', title: 'show this message' },
        h('span', null, '#' + msg.order), h('b', null, inputs.sender || '?'), '→',
        h('b', null, inputs.recipient || msg.agent || '?'));
      head.addEventListener('click', () => select(msg.id));
      items.push(h('div', { class: 'msg' + (R.selected === msg.id ? ' selected' : ''), 'data-testid': 'details-message', 'data-event-id': msg.id },
        head, text ? pre(text.length > 4000 ? text.slice(0, 4000) + '…' : text) : null));
    }
    const shown = Math.min(list.length, MAX_MESSAGES_LISTED);
    if (total > shown) items.push(h('div', { class: 'muted' }, (total - shown) + ' more messages'));
    return h('div', { class: 'section', 'data-testid': 'details-messages' },
      h('div', { class: 'section-title' }, 'Messages sent during this span (' + total + ')'), items);
  }

  // --- websocket --------------------------------------------------------------------------------------
  let ws = null;
  let backoff = 500;

  function setConnection(state, text) {
    dom.conn.dataset.state = state;
    dom.connText.textContent = text;
  }

  function connect() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = scheme + '//' + location.host + '/ws' + (token ? '?token=' + encodeURIComponent(token) : '');
    let socket;
    try { socket = new WebSocket(url); } catch (e) { setTimeout(connect, backoff); return; }
    ws = socket;
    socket.onopen = () => {
      backoff = 500;
      setConnection('open', 'live');
      if (!R || R.loaded || R.missing) refreshRuns();   // else: once the run on screen has loaded
      if (R && R.loaded) catchUp();
    };
    socket.onmessage = (message) => {
      let envelope;
      try { envelope = JSON.parse(message.data); } catch (e) { return; }
      if (!envelope || envelope.event_type !== 'event_captured' || !envelope.data) return;
      STATS.wsMessages++;
      const serverNow = parseTime(envelope.timestamp);
      if (isFinite(serverNow)) clockSkew = serverNow - Date.now();
      const data = envelope.data;
      const key = data.run_key || data.run_id || data.trace_id;
      if (R && key === R.key) {
        if (R.loaded) { R.queue.push(data); schedule(); } else R.buffer.push(data);
      }
      if (!runItems.has(key) || data.event_type === 'run' || (runItems.get(key).data || {}).status === 'running') refreshRunsSoon();
    };
    socket.onclose = () => {
      if (ws !== socket) return;
      setConnection('closed', 'reconnecting…');
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 8000);
    };
  }

  // --- start ---------------------------------------------------------------------------------------
  dom.dbName.textContent = CONFIG.db || '';
  dom.dbName.title = 'database: ' + (CONFIG.db || '');
  window.addEventListener('hashchange', () => { const key = routeKey(); if (key) selectRun(key); });
  // A run in the address: its waterfall first (the server reads one thing at a time), then the run list.
  const initial = routeKey();
  if (initial) selectRun(initial).finally(refreshRuns);
  else refreshRuns();
  connect();
})();
