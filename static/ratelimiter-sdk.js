/**
 * RateLimiter browser SDK.
 *
 * Served by the API at /sdk.js as a classic script: `<script src="https://api.example/sdk.js">`
 * defines the global `RateLimiter`. For ES modules import /sdk.mjs, a two-line wrapper that loads
 * this file and re-exports the same object (`import RateLimiter from "https://api.example/sdk.mjs"`).
 * The file has no `export` statement on purpose, so it stays valid as a classic script; loading it
 * twice (script tag plus module import) keeps the first copy, so `instanceof` checks keep working.
 *
 * No dependencies, no build step, no eval, no innerHTML: the widget builds its DOM with
 * createElement/textContent. The API key travels in the JSON body of POST /sdk/check and
 * POST /sdk/track, never in a URL.
 */
(function (root) {
  'use strict';

  const SDK_TAG = 'ratelimiter-sdk';
  if (root.RateLimiter && root.RateLimiter.sdk === SDK_TAG) {
    return;
  }

  const VERSION = '1.0.0';
  const EVENTS = ['limited', 'usage', 'error'];
  const DEFAULT_TIMEOUT_MS = 10000;
  const MAX_ENDPOINT_LENGTH = 500;

  /** Any failure of the SDK: server unreachable, timeout, bad key, unexpected answer. */
  class RateLimiterError extends Error {
    /**
     * @param {string} message human sentence
     * @param {{code?: string, status?: number, body?: object|null, cause?: unknown}} [details]
     */
    constructor(message, details = {}) {
      super(message, details.cause === undefined ? undefined : { cause: details.cause });
      this.name = 'RateLimiterError';
      /** machine code: the server's `error` field, or network_error / timeout / invalid_response */
      this.code = details.code || 'sdk_error';
      /** HTTP status, 0 when no response arrived */
      this.status = details.status || 0;
      /** the server's JSON error body, when there was one */
      this.body = details.body || null;
    }
  }

  /** The key is over its limit (answered by the server, or known locally without a round trip). */
  class RateLimitError extends RateLimiterError {
    /**
     * @param {string} message human sentence
     * @param {{limit: number, retryAfter: number, resetEpoch: number, tier?: string, local?: boolean,
     *          body?: object|null}} info
     */
    constructor(message, info) {
      super(message, { code: 'rate_limit_exceeded', status: 429, body: info.body });
      this.name = 'RateLimitError';
      /** seconds until one more request will be admitted */
      this.retryAfter = info.retryAfter;
      this.limit = info.limit;
      this.remaining = 0;
      /** epoch seconds when one more request will be admitted */
      this.resetEpoch = info.resetEpoch;
      this.tier = info.tier || null;
      /** true when the SDK refused without asking the server */
      this.local = Boolean(info.local);
    }
  }

  // --- small helpers ----------------------------------------------------------------------

  function nowMs() {
    return Date.now();
  }

  function secondsUntil(epochMs) {
    return Math.max(0, Math.ceil((epochMs - nowMs()) / 1000));
  }

  function toNumber(value) {
    if (value === null || value === undefined || value === '') {
      return null;
    }
    const number = Number(value);
    return Number.isFinite(number) ? number : null;
  }

  function firstNumber(...values) {
    for (const value of values) {
      const number = toNumber(value);
      if (number !== null) {
        return number;
      }
    }
    return null;
  }

  /** Retry-After is either delta seconds or an HTTP date. */
  function parseRetryAfter(value) {
    const seconds = toNumber(value);
    if (seconds !== null) {
      return Math.max(0, seconds);
    }
    const date = value ? Date.parse(value) : NaN;
    return Number.isNaN(date) ? null : secondsUntil(date);
  }

  /** Seconds to reset from the IETF `RateLimit: "free";r=4;t=57` field (immune to clock skew). */
  function parseResetIn(field) {
    const match = /(?:^|[;,\s])t=(\d+)/.exec(field || '');
    return match ? Number(match[1]) : null;
  }

  /** Tier name from `RateLimit-Policy: "free";q=5;w=60`. */
  function parsePolicyName(field) {
    const match = /^\s*"([^"]+)"/.exec(field || '');
    return match ? match[1] : null;
  }

  /** Usage fields carried by the headers of any rate-limited response, or null when absent. */
  function usageFromHeaders(headers) {
    const limit = toNumber(headers.get('X-RateLimit-Limit'));
    const remaining = toNumber(headers.get('X-RateLimit-Remaining'));
    if (limit === null || remaining === null) {
      return null;
    }
    return {
      limit,
      remaining,
      resetEpoch: toNumber(headers.get('X-RateLimit-Reset')),
      resetIn: parseResetIn(headers.get('RateLimit')),
      retryAfter: parseRetryAfter(headers.get('Retry-After')),
      tier: parsePolicyName(headers.get('RateLimit-Policy')),
    };
  }

  function endpointOf(input) {
    const raw = typeof input === 'string' ? input : input && input.url ? input.url : String(input);
    try {
      const base = root.location && root.location.href ? root.location.href : 'http://localhost/';
      return new URL(raw, base).pathname.slice(0, MAX_ENDPOINT_LENGTH);
    } catch (err) {
      return raw.slice(0, MAX_ENDPOINT_LENGTH);
    }
  }

  /** Report a listener's own bug the way EventTarget does, without breaking the SDK call. */
  function reportListenerError(err) {
    if (typeof root.reportError === 'function') {
      root.reportError(err);
    } else {
      setTimeout(() => {
        throw err;
      }, 0);
    }
  }

  function limitedMessage(limit, seconds) {
    return `Rate limit reached: ${limit} of ${limit} used, resets in ${seconds} s`;
  }

  function requireString(options, name) {
    const value = options[name];
    if (typeof value !== 'string' || value.trim() === '') {
      throw new TypeError(`RateLimiter.init: "${name}" must be a non-empty string`);
    }
    return value.trim();
  }

  // --- client -----------------------------------------------------------------------------

  /** A client bound to one API key; create it with `RateLimiter.init(options)`. */
  class RateLimiterClient {
    #baseUrl;
    #apiKey;
    #endpoint;
    #fetch;
    #timeoutMs;
    #listeners = new Map(EVENTS.map((name) => [name, new Set()]));
    #usage = null;
    #sent = 0; // requests numbered as sent, so a late answer never overwrites a newer one
    #applied = 0;

    constructor(options) {
      this.#baseUrl = requireString(options, 'baseUrl').replace(/\/+$/, '');
      this.#apiKey = requireString(options, 'apiKey');
      this.#endpoint = options.endpoint || null;
      this.#fetch = options.fetch || root.fetch.bind(root);
      this.#timeoutMs = options.timeoutMs || DEFAULT_TIMEOUT_MS;
      const callbacks = { limited: options.onLimited, usage: options.onUsage, error: options.onError };
      for (const [event, fn] of Object.entries(callbacks)) {
        if (typeof fn === 'function') {
          this.on(event, fn);
        }
      }
    }

    /** The API origin this client talks to. */
    get baseUrl() {
      return this.#baseUrl;
    }

    /**
     * Subscribe to `limited`, `usage` or `error`.
     * @param {'limited'|'usage'|'error'} event
     * @param {(payload: object) => void} fn
     * @returns {() => void} a function that unsubscribes
     */
    on(event, fn) {
      this.#listenersOf(event).add(fn);
      return () => this.off(event, fn);
    }

    /**
     * Unsubscribe a listener added with `on`.
     * @param {'limited'|'usage'|'error'} event
     * @param {Function} fn
     */
    off(event, fn) {
      this.#listenersOf(event).delete(fn);
    }

    /**
     * The last known usage, or null before the first answer.
     * @returns {{limit: number, remaining: number, used: number, tier: string|null, resetEpoch: number|null,
     *            resetIn: number, retryAfter: number, limited: boolean}|null}
     */
    getUsage() {
      const usage = this.#usage;
      if (!usage) {
        return null;
      }
      const limited = this.#isLimited();
      const until = limited ? Math.max(usage.resetAt, usage.limitedUntil) : usage.resetAt;
      return {
        limit: usage.limit,
        remaining: usage.remaining,
        used: Math.max(0, usage.limit - usage.remaining),
        tier: usage.tier,
        resetEpoch: usage.resetEpoch,
        resetIn: secondsUntil(until),
        retryAfter: limited ? secondsUntil(until) : 0,
        limited,
      };
    }

    /**
     * Ask the server whether one more request would be admitted. Consumes nothing.
     * Emits `usage`, and `limited` when the answer is no.
     * @param {string} [endpoint]
     * @returns {Promise<{allowed: boolean, limit: number, remaining: number, reset_epoch: number,
     *                    retry_after: number, tier: string}>} the /sdk/check body
     */
    async check(endpoint) {
      try {
        const body = await this.#check(endpoint);
        if (!body.allowed) {
          this.#emit('limited', this.#limitedInfo(false));
        }
        return body;
      } catch (err) {
        throw this.#report(err);
      }
    }

    /**
     * Count one request against the key. Rejects with RateLimitError when the key is over its
     * limit (without a round trip while the last known usage says the budget is spent).
     * @param {string} [endpoint] defaults to the `endpoint` given to init
     * @param {{method?: string, status?: number}} [details]
     * @returns {Promise<{tracked: true, limit: number, remaining: number, reset_epoch: number, tier: string}>}
     */
    async track(endpoint, details = {}) {
      try {
        return await this.#track(endpoint, details);
      } catch (err) {
        throw this.#report(err);
      }
    }

    /**
     * `fetch` with the rate limit in front: admits the call from the last known usage (or a
     * /sdk/check round trip when that is stale), refuses locally with RateLimitError when the
     * key is limited, performs the call, then counts it. A response that carries X-RateLimit-*
     * headers was already counted by the limiter, so it only updates the usage; a 429 with
     * Retry-After makes the client refuse locally until then.
     * @param {RequestInfo|URL} input
     * @param {RequestInit} [init]
     * @returns {Promise<Response>}
     */
    async fetch(input, init) {
      const options = init || {};
      const endpoint = endpointOf(input);
      try {
        await this.#admit(endpoint);
      } catch (err) {
        throw this.#report(err);
      }
      let response;
      const seq = ++this.#sent;
      try {
        response = await this.#fetch(input, options);
      } catch (err) {
        this.#release();
        if (err && err.name === 'AbortError') {
          throw new RateLimiterError('The request was aborted', { code: 'aborted', cause: err }); // the caller's choice
        }
        throw this.#report(this.#networkError(err, String(input && input.url ? input.url : input)));
      }
      await this.#afterCall(endpoint, options.method || (input && input.method) || 'GET', response, seq);
      return response;
    }

    /**
     * Render a live usage bar (remaining / limit, seconds to reset) into `element`.
     * @param {HTMLElement} element
     * @returns {() => void} unmount: stops the countdown and removes the widget
     */
    mountWidget(element) {
      if (!element || typeof element.appendChild !== 'function') {
        throw new TypeError('mountWidget needs a DOM element');
      }
      return mountUsageWidget(this, element);
    }

    // --- internals ---

    #listenersOf(event) {
      const set = this.#listeners.get(event);
      if (!set) {
        throw new TypeError(`Unknown event "${event}"; use one of ${EVENTS.join(', ')}`);
      }
      return set;
    }

    #emit(event, payload) {
      for (const fn of [...this.#listeners.get(event)]) {
        try {
          fn(payload);
        } catch (err) {
          reportListenerError(err);
        }
      }
    }

    /** Emit the event an error deserves, and hand the error back for `throw`. */
    #report(err) {
      const error = err instanceof RateLimiterError ? err : new RateLimiterError(String(err && err.message), {
        cause: err,
      });
      if (error instanceof RateLimitError) {
        this.#emit('limited', this.#limitedInfo(error.local));
      } else {
        this.#emit('error', error);
      }
      return error;
    }

    async #check(endpoint) {
      const payload = { api_key: this.#apiKey };
      const name = endpoint || this.#endpoint;
      if (name) {
        payload.endpoint = String(name).slice(0, MAX_ENDPOINT_LENGTH);
      }
      const { response, body, seq } = await this.#post('/sdk/check', payload);
      if (!response.ok) {
        throw this.#httpError(response, body);
      }
      this.#updateUsage(body, response.headers, seq);
      return body;
    }

    async #track(endpoint, details) {
      const name = endpoint || this.#endpoint;
      if (!name) {
        throw new RateLimiterError('track() needs an endpoint name', { code: 'invalid_field' });
      }
      if (this.#decideLocally() === 'limited') {
        throw this.#limitError(true);
      }
      const payload = { api_key: this.#apiKey, endpoint: String(name).slice(0, MAX_ENDPOINT_LENGTH) };
      if (details.method) {
        payload.method = String(details.method).toUpperCase();
      }
      if (Number.isInteger(details.status)) {
        payload.status = details.status;
      }
      const { response, body, seq } = await this.#post('/sdk/track', payload);
      if (response.status === 429 && body && body.error === 'rate_limit_exceeded') {
        this.#updateUsage({ ...body, remaining: 0 }, response.headers, seq);
        throw this.#limitError(false, body);
      }
      if (!response.ok) {
        throw this.#httpError(response, body);
      }
      this.#updateUsage(body, response.headers, seq);
      return body;
    }

    /** Admit one call: from the cached usage when it is fresh, else by asking the server. */
    async #admit(endpoint) {
      const decision = this.#decideLocally();
      if (decision === 'limited') {
        throw this.#limitError(true);
      }
      if (decision === 'unknown') {
        const body = await this.#check(endpoint);
        if (!body.allowed) {
          throw this.#limitError(false);
        }
      }
      if (this.#usage) {
        this.#usage.remaining = Math.max(0, this.#usage.remaining - 1); // reserve: concurrent calls share the budget
      }
    }

    /** Give back a reservation for a call that never reached its server. */
    #release() {
      if (this.#usage) {
        this.#usage.remaining = Math.min(this.#usage.limit, this.#usage.remaining + 1);
      }
    }

    async #afterCall(endpoint, method, response, seq) {
      const fromHeaders = usageFromHeaders(response.headers);
      if (response.status === 429) {
        this.#honourRetryAfter(fromHeaders, response.headers, seq);
        this.#emit('limited', this.#limitedInfo(false));
        return;
      }
      if (fromHeaders) {
        this.#updateUsage({}, response.headers, seq); // the limiter counted this call itself
        return;
      }
      try {
        await this.#track(endpoint, { method, status: response.status });
      } catch (err) {
        this.#report(err); // the call itself succeeded: report, but still hand back its response
      }
    }

    #honourRetryAfter(fromHeaders, headers, seq) {
      const retryAfter = parseRetryAfter(headers.get('Retry-After'));
      if (fromHeaders) {
        this.#updateUsage({ remaining: 0 }, headers, seq);
      } else if (this.#usage) {
        this.#usage.remaining = 0;
      }
      if (retryAfter !== null && this.#usage) {
        this.#usage.limitedUntil = nowMs() + retryAfter * 1000;
      }
    }

    /** 'limited', 'allowed' (fresh cached usage with budget left) or 'unknown' (ask the server). */
    #decideLocally() {
      const usage = this.#usage;
      if (!usage) {
        return 'unknown';
      }
      const now = nowMs();
      if (usage.limitedUntil > now) {
        return 'limited';
      }
      if (now >= usage.resetAt) {
        return 'unknown';
      }
      return usage.remaining > 0 ? 'allowed' : 'limited';
    }

    #isLimited() {
      return this.#decideLocally() === 'limited';
    }

    /** Merge a response body and its rate-limit headers into the usage record; emit `usage`. */
    #updateUsage(body, headers, seq) {
      if (seq < this.#applied) {
        return;
      }
      this.#applied = seq;
      const previous = this.#usage || {};
      const fromHeaders = usageFromHeaders(headers) || {};
      const limit = firstNumber(body.limit, fromHeaders.limit, previous.limit);
      const remaining = firstNumber(body.remaining, fromHeaders.remaining, previous.remaining);
      if (limit === null || remaining === null) {
        return;
      }
      const resetEpoch = firstNumber(body.reset_epoch, fromHeaders.resetEpoch, previous.resetEpoch);
      const resetIn = fromHeaders.resetIn;
      const now = nowMs();
      const resetAt = resetIn !== null && resetIn !== undefined ? now + resetIn * 1000 : (resetEpoch || 0) * 1000;
      const retryAfter = firstNumber(body.retry_after, fromHeaders.retryAfter) || 0;
      this.#usage = {
        limit,
        remaining,
        resetEpoch,
        resetAt,
        tier: body.tier || fromHeaders.tier || previous.tier || null,
        limitedUntil: remaining <= 0 && retryAfter > 0 ? now + retryAfter * 1000 : 0,
      };
      this.#emit('usage', this.getUsage());
    }

    #limitedInfo(local) {
      const usage = this.getUsage() || { limit: 0, resetEpoch: null, tier: null, retryAfter: 0 };
      const retryAfter = Math.max(1, usage.retryAfter || usage.resetIn || 0);
      return {
        limit: usage.limit,
        remaining: 0,
        used: usage.limit,
        retryAfter,
        resetEpoch: usage.resetEpoch,
        tier: usage.tier,
        local: Boolean(local),
        message: limitedMessage(usage.limit, retryAfter),
      };
    }

    #limitError(local, body) {
      const info = this.#limitedInfo(local);
      return new RateLimitError(info.message, { ...info, body: body || null });
    }

    #httpError(response, body) {
      const code = body && typeof body.error === 'string' ? body.error : 'http_error';
      const message = body && typeof body.message === 'string' ? body.message : `HTTP ${response.status}`;
      return new RateLimiterError(message, { code, status: response.status, body });
    }

    #networkError(err, url) {
      if (err && err.name === 'AbortError') {
        return new RateLimiterError(`No answer from ${url} within ${this.#timeoutMs} ms`, {
          code: 'timeout',
          cause: err,
        });
      }
      return new RateLimiterError(`Cannot reach ${url}: ${err && err.message ? err.message : err}`, {
        code: 'network_error',
        cause: err,
      });
    }

    /** POST JSON to the API with a timeout; resolves {response, body} or rejects RateLimiterError. */
    async #post(path, payload) {
      const url = this.#baseUrl + path;
      const seq = ++this.#sent;
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
      try {
        const response = await this.#fetch(url, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify(payload),
          credentials: 'omit',
          signal: controller.signal,
        });
        return { response, body: await this.#readJson(response, url), seq };
      } catch (err) {
        throw err instanceof RateLimiterError ? err : this.#networkError(err, url);
      } finally {
        clearTimeout(timer);
      }
    }

    async #readJson(response, url) {
      try {
        return await response.json();
      } catch (err) {
        throw new RateLimiterError(`Expected JSON from ${url} (HTTP ${response.status})`, {
          code: 'invalid_response',
          status: response.status,
          cause: err,
        });
      }
    }
  }

  // --- widget -----------------------------------------------------------------------------

  const COLORS = {
    ok: '#1a7f37', low: '#9a6700', out: '#cf222e', track: '#d0d7de', outTrack: '#ffcecb', text: '#1f2328',
  };

  function makeElement(tag, style, attributes = {}) {
    const element = document.createElement(tag);
    Object.assign(element.style, style);
    for (const [name, value] of Object.entries(attributes)) {
      element.setAttribute(name, value);
    }
    return element;
  }

  function buildWidget() {
    const rootEl = makeElement('div', {
      font: '14px/1.4 system-ui, sans-serif', color: COLORS.text, border: '1px solid #d0d7de',
      borderRadius: '6px', padding: '10px 12px', maxWidth: '28rem', background: '#fff',
    }, { class: 'rl-widget' });
    const counts = makeElement('div', { fontWeight: '600' }, { class: 'rl-widget-counts' });
    const bar = makeElement('div', {
      height: '10px', background: COLORS.track, borderRadius: '5px', overflow: 'hidden', margin: '6px 0',
    }, { class: 'rl-widget-bar', role: 'progressbar', 'aria-label': 'Requests remaining', 'aria-valuemin': '0' });
    const fill = makeElement('div', { height: '100%', width: '0%', background: COLORS.ok }, {
      class: 'rl-widget-fill',
    });
    const reset = makeElement('div', { fontSize: '13px' }, { class: 'rl-widget-reset' });
    const announcer = makeElement('div', {
      position: 'absolute', width: '1px', height: '1px', overflow: 'hidden', clip: 'rect(0 0 0 0)',
    }, { class: 'rl-widget-live', role: 'status', 'aria-live': 'polite' });
    bar.appendChild(fill);
    rootEl.append(counts, bar, reset, announcer);
    counts.textContent = 'Usage: checking\u2026';
    return { rootEl, counts, bar, fill, reset, announcer };
  }

  function renderWidget(parts, usage) {
    if (!usage) {
      return;
    }
    const share = usage.limit > 0 ? usage.remaining / usage.limit : 0;
    parts.rootEl.dataset.remaining = String(usage.remaining);
    parts.rootEl.dataset.limit = String(usage.limit);
    parts.rootEl.dataset.limited = String(usage.limited);
    parts.counts.textContent = `${usage.remaining} / ${usage.limit} requests left` +
      (usage.tier ? ` (${usage.tier} tier)` : '');
    parts.bar.setAttribute('aria-valuemax', String(usage.limit));
    parts.bar.setAttribute('aria-valuenow', String(usage.remaining));
    parts.fill.style.width = `${Math.round(share * 100)}%`;
    parts.fill.style.background = share <= 0.2 ? COLORS.low : COLORS.ok;
    parts.bar.style.background = share === 0 ? COLORS.outTrack : COLORS.track;
    parts.reset.style.color = usage.limited ? COLORS.out : COLORS.text;
    parts.reset.style.fontWeight = usage.limited ? '600' : '400';
    parts.reset.textContent = resetText(usage);
  }

  function resetText(usage) {
    if (usage.limited) {
      return limitedMessage(usage.limit, usage.resetIn);
    }
    if (usage.remaining >= usage.limit || usage.resetIn <= 0) {
      return 'Full budget available';
    }
    return `Window resets in ${usage.resetIn} s`;
  }

  function announce(parts, usage) {
    if (usage) {
      parts.announcer.textContent = usage.limited
        ? `Rate limit reached: ${usage.limit} of ${usage.limit} used`
        : `${usage.remaining} of ${usage.limit} requests left`;
    }
  }

  function mountUsageWidget(client, element) {
    const parts = buildWidget();
    let refreshing = false;
    let lastResetEpoch = null;
    const refresh = () => {
      refreshing = true;
      client.check().catch(() => {
        parts.counts.textContent = 'Usage unavailable';
      }).finally(() => {
        refreshing = false;
      });
    };
    const onUsage = () => {
      const usage = client.getUsage();
      renderWidget(parts, usage);
      announce(parts, usage);
    };
    const tick = () => {
      const usage = client.getUsage();
      renderWidget(parts, usage);
      const expired = usage && usage.resetIn <= 0 && usage.remaining < usage.limit;
      if (expired && !refreshing && usage.resetEpoch !== lastResetEpoch) {
        lastResetEpoch = usage.resetEpoch; // one refresh per window reset
        refresh();
      }
    };
    element.appendChild(parts.rootEl);
    const unsubscribe = [client.on('usage', onUsage), client.on('limited', onUsage)];
    const timer = setInterval(tick, 1000);
    if (client.getUsage()) {
      onUsage();
    } else {
      refresh();
    }
    return function unmount() {
      clearInterval(timer);
      unsubscribe.forEach((off) => off());
      parts.rootEl.remove();
    };
  }

  // --- public namespace -------------------------------------------------------------------

  /**
   * Create a client.
   * @param {{baseUrl: string, apiKey: string, endpoint?: string, onLimited?: Function, onUsage?: Function,
   *          onError?: Function, fetch?: typeof fetch, timeoutMs?: number}} options
   * @returns {RateLimiterClient}
   */
  function init(options) {
    if (!options || typeof options !== 'object') {
      throw new TypeError('RateLimiter.init needs an options object');
    }
    return new RateLimiterClient(options);
  }

  root.RateLimiter = Object.freeze({
    sdk: SDK_TAG,
    version: VERSION,
    init,
    RateLimiterClient,
    RateLimiterError,
    RateLimitError,
  });
})(typeof globalThis !== 'undefined' ? globalThis : self);
