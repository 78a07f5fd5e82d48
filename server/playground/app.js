// adapter-chat playground: two panes answering the same conversation side by side, ratings sent
// to /v1/feedback, and the adapters' manifests and nightly runs. Plain browser JavaScript, no
// build step, no dependencies. Every data call goes to the server's API with the key typed in;
// text from the server is only ever set with textContent (never parsed as HTML).
"use strict";

(() => {
  const KEY_STORAGE = "adapter-chat.api-key";
  const MODEL_STORAGE = "adapter-chat.model.";
  const PANES = [["a", "Left"], ["b", "Right"]];

  const $ = (selector, root = document) => root.querySelector(selector);

  /** A DOM element with properties and children (strings become text nodes). */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "title") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function randomId(prefix) {
    const bytes = crypto.getRandomValues(new Uint8Array(8)); // randomUUID needs a secure context
    return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ------------------------------------------------------------------ API key and calls

  const state = { key: "", connected: false, models: [], busy: false, controller: null, retry: null };

  function loadKey() {
    const remembered = localStorage.getItem(KEY_STORAGE);
    if (remembered !== null) return { key: remembered, remember: true };
    return { key: sessionStorage.getItem(KEY_STORAGE) || "", remember: false };
  }

  function storeKey(key, remember) {
    localStorage.removeItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    if (key) (remember ? localStorage : sessionStorage).setItem(KEY_STORAGE, key);
  }

  function authHeaders() {
    return state.key ? { Authorization: `Bearer ${state.key}` } : {};
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function errorFrom(response) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      /* not JSON: keep the status */
    }
    return new ApiError(response.status, message);
  }

  async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
    const init = { method, signal, headers: { ...authHeaders(), ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  function describeError(err) {
    if (err instanceof ApiError && err.status === 401) {
      return state.key ? `the server refused the key: ${err.message}` : "this server needs an API key: type it above and press Connect";
    }
    if (err instanceof ApiError && err.status === 503) return `the server is not ready: ${err.message}`;
    if (err instanceof ApiError) return err.message;
    return `cannot reach the server: ${err.message || err}`;
  }

  function setStatus(text, kind = "") {
    const node = $("#status");
    node.textContent = text;
    node.className = `status ${kind}`;
  }

  // ------------------------------------------------------------------ streaming

  /** The `data:` payloads of a text/event-stream body, one string per event. */
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = /\r?\n\r?\n/.exec(buffer)) !== null) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data; // comment lines (": ping") carry no data
      }
    }
  }

  /**
   * POST /v1/chat/completions with stream: true; calls onText for each delta.
   * Returns {id, headers, usage, finishReason, ttftMs, totalMs}.
   */
  async function streamChat(body, { conversationId, signal, onStart, onText }) {
    const t0 = performance.now();
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      signal,
      headers: { ...authHeaders(), "Content-Type": "application/json", "X-Conversation-Id": conversationId },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw await errorFrom(response);
    const result = {
      id: response.headers.get("X-Request-Id"),
      served: {
        route: response.headers.get("X-Route"),
        path: response.headers.get("X-Route-Path"),
        adapters: response.headers.get("X-Adapters"),
        fallback: response.headers.get("X-Route-Fallback"),
      },
      usage: null,
      finishReason: null,
      ttftMs: null,
      totalMs: null,
      done: false,
    };
    onStart(result);
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") {
        result.done = true;
        break;
      }
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(0, event.error.message || "generation failed");
      if (event.id) result.id = event.id;
      if (event.usage) result.usage = event.usage;
      for (const choice of event.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (result.ttftMs === null) result.ttftMs = performance.now() - t0;
          onText(text);
        }
        if (choice.finish_reason) result.finishReason = choice.finish_reason;
      }
    }
    result.totalMs = performance.now() - t0;
    if (!result.done) throw new ApiError(0, "the stream ended before [DONE]");
    return result;
  }

  // ------------------------------------------------------------------ panes

  function formatMs(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function modelLabel(card) {
    if (card.kind === "base") return `${card.id} (base model)`;
    if (card.kind === "route") {
      const paths = (card.paths || []).join(" + ") || "base";
      return `${card.id}: route, ${paths}${card.split !== undefined && card.split !== null && (card.paths || []).length > 1 ? ` (${card.split}% finetuned)` : ""}`;
    }
    if (card.kind === "adapter" && !card.id.includes("@")) return `${card.id}: adapter, current v${card.version}`;
    return `${card.id}: adapter, pinned v${card.version}`;
  }

  function modelInfo(card) {
    if (!card) return "";
    if (card.kind === "base") return "The bare base model: no system prompt, no adapter.";
    if (card.kind === "route") {
      const parts = [];
      if (card.description) parts.push(card.description);
      const adapters = (card.adapters || []).map((a) => `${a.name}×${a.scale}`).join(", ");
      if ((card.paths || []).includes("prompt")) parts.push("prompt path: a system prompt template");
      if ((card.paths || []).includes("finetuned")) parts.push(`finetuned path: ${adapters}`);
      if ((card.paths || []).length > 1) parts.push(`${card.split}% of conversations take the finetuned path`);
      return parts.join(" · ");
    }
    return `LoRA adapter ${card.id} on the base model, version ${card.version}.`;
  }

  class Pane {
    constructor(key, label) {
      this.key = key;
      this.node = $("#pane-template").content.firstElementChild.cloneNode(true);
      this.node.id = `pane-${key}`;
      this.node.dataset.pane = key;
      $(".pane-label", this.node).textContent = `${label} `;
      this.select = $("select.model", this.node);
      this.info = $(".model-info", this.node);
      this.transcript = $(".transcript", this.node);
      this.select.addEventListener("change", () => {
        localStorage.setItem(MODEL_STORAGE + key, this.select.value);
        this.info.textContent = modelInfo(state.models.find((c) => c.id === this.select.value));
      });
      this.reset();
    }

    reset() {
      this.history = [];
      this.conversationId = randomId(`pg-${this.key}-`);
      this.transcript.replaceChildren();
    }

    fill(cards, fallback) {
      const groups = [["Base model", "base"], ["Routes", "route"], ["Adapters", "adapter"]];
      const keep = this.select.value || localStorage.getItem(MODEL_STORAGE + this.key);
      this.select.replaceChildren();
      for (const [title, kind] of groups) {
        const members = cards.filter((c) => c.kind === kind);
        if (!members.length) continue;
        this.select.append(el("optgroup", { label: title }, members.map((c) => el("option", { value: c.id, text: modelLabel(c) }))));
      }
      this.select.value = cards.some((c) => c.id === keep) ? keep : fallback;
      this.info.textContent = modelInfo(cards.find((c) => c.id === this.select.value));
    }

    addUser(text) {
      this.history.push({ role: "user", content: text });
      this.transcript.append(el("div", { class: "msg user" }, el("div", { class: "text", text })));
      this.transcript.scrollTop = this.transcript.scrollHeight;
    }

    async ask(options, signal) {
      const view = new Answer(this.select.value);
      this.transcript.append(view.node);
      const messages = options.system ? [{ role: "system", content: options.system }, ...this.history] : [...this.history];
      const body = { model: this.select.value, messages, max_tokens: options.maxTokens };
      if (options.temperature !== null) body.temperature = options.temperature;
      if (options.seed !== null) body.seed = options.seed;
      let text = "";
      try {
        const result = await streamChat(body, {
          conversationId: this.conversationId,
          signal,
          onStart: (r) => view.started(r),
          onText: (delta) => {
            text += delta;
            view.text.textContent = text;
            this.transcript.scrollTop = this.transcript.scrollHeight;
          },
        });
        this.history.push({ role: "assistant", content: text });
        view.finished(result, text);
      } catch (err) {
        view.failed(err.name === "AbortError" ? "stopped" : describeError(err));
      }
    }
  }

  /** One streamed answer: its text, what served it, its timings and token counts, its rating. */
  class Answer {
    constructor(model) {
      this.node = $("#answer-template").content.firstElementChild.cloneNode(true);
      this.node.dataset.model = model;
      this.node.classList.add("streaming");
      this.text = $(".text", this.node);
      this.stats = $(".stats", this.node);
      this.rating = $(".rating", this.node);
      this.rating.hidden = true;
      this.id = null;
      for (const [cls, value] of [["up", 1], ["down", -1]]) {
        $(`.thumb.${cls}`, this.node).addEventListener("click", () => this.rate(value));
      }
    }

    started(result) {
      this.id = result.id;
      this.node.dataset.responseId = result.id || "";
      const s = result.served;
      const parts = [`route ${s.route}`, `path ${s.path}`];
      if (s.adapters) parts.push(`adapters ${s.adapters}`);
      $(".served", this.node).textContent = parts.join(" · ");
      if (s.fallback) $(".served", this.node).append(el("span", { class: "warn", text: ` · fell back: ${s.fallback}` }));
    }

    finished(result, text) {
      this.node.classList.remove("streaming");
      this.node.classList.add("done");
      this.id = result.id;
      if (!text) this.text.append(el("span", { class: "muted", text: "(empty answer)" }));
      const u = result.usage || {};
      const genMs = result.totalMs - (result.ttftMs || 0);
      const rate = u.completion_tokens > 1 && genMs > 0 ? ((u.completion_tokens - 1) / genMs) * 1000 : null;
      const cached = u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens;
      const parts = [
        el("span", { class: "stat ttft", title: "time to first token" }, "TTFT ", el("b", { text: formatMs(result.ttftMs) })),
        el("span", { class: "stat total", title: "until the last token" }, "total ", el("b", { text: formatMs(result.totalMs) })),
        el("span", { class: "stat prompt-tokens" }, el("b", { text: u.prompt_tokens ?? "?" }), " prompt tokens",
          cached ? ` (${cached} cached)` : ""),
        el("span", { class: "stat completion-tokens" }, el("b", { text: u.completion_tokens ?? "?" }), " completion tokens"),
        rate ? el("span", { class: "stat rate" }, el("b", { text: rate.toFixed(1) }), " tok/s") : null,
        result.finishReason === "length" ? el("span", { class: "stat warn", text: "cut off by max_tokens" }) : null,
      ];
      this.stats.replaceChildren(...parts.filter(Boolean));
      this.rating.hidden = !this.id;
    }

    failed(message) {
      this.node.classList.remove("streaming");
      this.node.classList.add("failed");
      this.stats.replaceChildren(el("span", { class: "error", text: message }));
    }

    async rate(rating) {
      const status = $(".rating-status", this.node);
      const corrected = $(".corrected", this.node).value.trim();
      const body = { response_id: this.id, rating };
      if (corrected) body.corrected = corrected;
      status.textContent = "sending…";
      try {
        await api("/v1/feedback", { method: "POST", body });
        for (const [cls, value] of [["up", 1], ["down", -1]]) {
          $(`.thumb.${cls}`, this.node).setAttribute("aria-pressed", String(value === rating));
        }
        status.textContent = `saved: ${rating > 0 ? "good" : "bad"}${corrected ? " with your correction" : ""}`;
        status.className = "rating-status ok";
      } catch (err) {
        status.textContent = `not saved: ${describeError(err)}`;
        status.className = "rating-status error";
      }
    }
  }

  const panes = PANES.map(([key, label]) => new Pane(key, label));

  // ------------------------------------------------------------------ compare view

  function options() {
    const number = (id) => {
      const raw = $(id).value.trim();
      return raw === "" ? null : Number(raw);
    };
    return {
      maxTokens: number("#opt-max-tokens") || 128,
      temperature: number("#opt-temperature"),
      seed: number("#opt-seed"),
      system: $("#opt-system").value.trim(),
    };
  }

  function setBusy(busy) {
    state.busy = busy;
    $("#send").disabled = busy || !state.connected;
    $("#stop").disabled = !busy;
    $("#new-chat").disabled = busy;
  }

  async function send() {
    const text = $("#prompt").value.trim();
    if (!text || state.busy || !state.connected) return;
    $("#prompt").value = "";
    const opts = options();
    state.controller = new AbortController();
    setBusy(true);
    try {
      for (const pane of panes) pane.addUser(text);
      await Promise.allSettled(panes.map((pane) => pane.ask(opts, state.controller.signal)));
    } finally {
      state.controller = null;
      setBusy(false);
    }
  }

  // ------------------------------------------------------------------ adapters view

  function num(v, digits = 3) {
    return typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–";
  }

  function lossCell(metrics) {
    const base = metrics.val_loss_base;
    const adapter = metrics.val_loss_adapter;
    if (typeof base !== "number" || typeof adapter !== "number") return "–";
    const change = base ? ((adapter - base) / base) * 100 : 0;
    return el("span", {}, `${num(base)} → ${num(adapter)} `,
      el("span", { class: change < 0 ? "ok" : "warn", text: `(${change >= 0 ? "+" : ""}${change.toFixed(1)}%)` }));
  }

  function gateCell(metrics) {
    const gate = metrics && metrics.gate;
    if (!gate || typeof gate !== "object" || gate.passed === undefined) return el("span", { class: "muted", text: "no gate recorded" });
    return el("span", { class: "gate" },
      el("span", { class: `badge ${gate.passed ? "ok" : "bad"}`, text: gate.passed ? "passed" : "refused" }),
      gate.reason ? ` ${gate.reason}` : "");
  }

  function jsonDetails(title, value) {
    return el("details", { class: "json" }, el("summary", { text: title }), el("pre", { text: JSON.stringify(value, null, 2) }));
  }

  function renderAdapters(payload) {
    const root = $("#adapters");
    root.replaceChildren();
    if (!payload.data.length) root.append(el("p", { class: "muted", text: "No adapters published yet." }));
    for (const adapter of payload.data) {
      const rows = [...adapter.versions].sort((a, b) => b.version - a.version).map((m) => {
        const metrics = m.metrics || {};
        const window = m.data_window || {};
        const key = `${adapter.name}@${m.version}`;
        const marks = [m.version === adapter.current ? "current" : null, adapter.loaded.includes(key) ? "loaded" : null].filter(Boolean);
        return el("tr", { "data-version": m.version },
          el("td", {}, el("b", { text: `v${m.version}` }), marks.map((t) => el("span", { class: "badge", text: t }))),
          el("td", { text: m.created || "–" }),
          el("td", { text: `${m.rank}${m.alpha !== null && m.alpha !== undefined ? ` / ${m.alpha}` : ""}` }),
          el("td", { text: window.items !== undefined ? `${window.items}` : "–" }),
          el("td", {}, lossCell(metrics)),
          el("td", { class: "gate-cell" }, gateCell(metrics)),
          el("td", {}, jsonDetails("manifest", m)));
      });
      root.append(el("div", { class: "adapter", "data-adapter": adapter.name },
        el("h3", {}, adapter.name, el("span", { class: "muted", text: ` current v${adapter.current}` })),
        el("table", {},
          el("thead", {}, el("tr", {}, ["version", "created", "rank / alpha", "items", "val loss base → adapter", "gate", ""].map((h) => el("th", { text: h })))),
          el("tbody", {}, rows))));
    }
    const refused = Object.entries(payload.refused || {});
    if (refused.length) {
      root.append(el("h3", { text: "Refused files" }),
        el("ul", { class: "refused" }, refused.map(([what, why]) => el("li", {}, el("code", { text: what }), `: ${why}`))));
    }
  }

  function renderRuns(payload) {
    const root = $("#runs");
    root.replaceChildren();
    if (!payload.data.length) {
      root.append(el("p", { class: "muted", text: "No nightly runs recorded in this server's database yet." }));
      return;
    }
    const rows = payload.data.map((run) => {
      const metrics = run.metrics || {};
      const ev = metrics.eval || {};
      const ds = metrics.dataset || {};
      const duration = run.finished_at ? formatMs((run.finished_at - run.started_at) * 1000) : "running";
      return el("tr", { "data-run": run.id },
        el("td", { text: new Date(run.started_at * 1000).toLocaleString() }),
        el("td", { text: run.adapter }),
        el("td", {}, el("span", { class: `badge status-${run.status}`, text: run.status })),
        el("td", { text: run.version ? `v${run.version}` : "–" }),
        el("td", { text: duration }),
        el("td", { text: ds.train_items !== undefined ? `${ds.train_items} / ${ds.val_items}` : "–" }),
        el("td", {}, lossCell(ev)),
        el("td", { class: "reason", text: run.reason || "" }),
        el("td", {}, jsonDetails("metrics", metrics)));
    });
    root.append(el("table", { class: "runs" },
      el("thead", {}, el("tr", {}, ["started", "adapter", "status", "version", "took", "train / val items", "val loss base → adapter", "reason", ""].map((h) => el("th", { text: h })))),
      el("tbody", {}, rows)));
  }

  async function loadAdapters() {
    if (!state.connected) return;
    const [adapters, runs] = await Promise.allSettled([api("/v1/adapters"), api("/v1/runs?limit=20")]);
    if (adapters.status === "fulfilled") renderAdapters(adapters.value);
    else $("#adapters").replaceChildren(el("p", { class: "error", text: describeError(adapters.reason) }));
    if (runs.status === "fulfilled") renderRuns(runs.value);
    else $("#runs").replaceChildren(el("p", { class: "error", text: describeError(runs.reason) }));
  }

  function showView(name) {
    for (const view of ["compare", "adapters"]) {
      $(`#view-${view}`).hidden = view !== name;
      $(`#tab-${view}`).setAttribute("aria-selected", String(view === name));
    }
    if (name === "adapters") loadAdapters();
  }

  // ------------------------------------------------------------------ connecting

  async function connect(retries = 30) {
    clearTimeout(state.retry);
    state.connected = false;
    setBusy(state.busy);
    setStatus("Connecting…");
    try {
      const models = await api("/v1/models");
      state.models = models.data;
      const base = models.data.find((c) => c.kind === "base");
      const other =
        models.data.find((c) => c.kind === "route" && (c.paths || []).includes("finetuned")) ||
        models.data.find((c) => c.kind === "adapter") ||
        models.data.find((c) => c.kind === "route") ||
        base;
      panes[0].fill(models.data, base ? base.id : "");
      panes[1].fill(models.data, other ? other.id : "");
      const count = (kind) => models.data.filter((c) => c.kind === kind && !c.id.includes("@")).length;
      state.connected = true;
      setStatus(`Connected: ${base ? base.id : "?"}, ${count("route")} routes, ${count("adapter")} adapters.`, "ok");
      if (!$("#view-adapters").hidden) loadAdapters();
    } catch (err) {
      setStatus(`Not connected: ${describeError(err)}`, "error");
      if (err instanceof ApiError && err.status === 503 && retries > 0) {
        state.retry = setTimeout(() => connect(retries - 1), 2000); // the model is still loading
      }
    }
    setBusy(state.busy);
  }

  function init() {
    const panesRoot = $("#panes");
    for (const pane of panes) panesRoot.append(pane.node);
    const saved = loadKey();
    state.key = saved.key;
    $("#api-key").value = saved.key;
    $("#remember-key").checked = saved.remember;

    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.key = $("#api-key").value.trim();
      storeKey(state.key, $("#remember-key").checked);
      connect();
    });
    $("#forget-key").addEventListener("click", () => {
      storeKey("", false);
      state.key = "";
      $("#api-key").value = "";
      $("#remember-key").checked = false;
      connect();
    });
    $("#composer").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("#prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        send();
      }
    });
    $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("#new-chat").addEventListener("click", () => panes.forEach((pane) => pane.reset()));
    $("#tab-compare").addEventListener("click", () => showView("compare"));
    $("#tab-adapters").addEventListener("click", () => showView("adapters"));
    $("#refresh-adapters").addEventListener("click", loadAdapters);
    connect();
  }

  init();
})();
