// mj-relay admin UI: plain JavaScript, no build step, nothing loaded from elsewhere. Every text from the API is
// put into the page as text (textContent), never as markup.
"use strict";

(() => {
  const TOKEN = "mj-relay-admin-token";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (selector) => document.querySelector(selector);
  let keyNames = new Map(); // key id -> name
  let jobsCursor = null;
  let jobsQuery = null; // the filters of the jobs shown
  let jobsSearch = 0; // which search they are of
  let session = 0; // which sign-in the page is of: an answer to a request of an earlier one is dropped

  // -- helpers ----------------------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "className") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function when(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function status(message, isError) {
    const node = $("#status");
    node.textContent = message || "";
    node.className = isError ? "error" : "";
  }

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || `HTTP ${status}`);
      this.status = status;
    }
  }

  // An answer to a request made before the page signed out: shown nowhere (`guarded` ignores it).
  class SignedOut extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const begun = session;
    const response = await fetch(`api/${path}`, init);
    if (begun !== session) throw new SignedOut();
    if (response.status === 401) {
      signOut("The admin token was refused; sign in again.");
      throw new ApiError(401, await response.json().catch(() => null));
    }
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
    const answer = await (path.endsWith(".csv") ? response.blob() : response.json());
    if (begun !== session) throw new SignedOut();
    return answer;
  }

  // Runs an action, showing its error (if any) in the status line. The button that started it (a form's submit
  // buttons) is disabled until it is done, so a double click or a second Enter tops up or creates once.
  function guarded(action) {
    return async (event) => {
      if (event && event.preventDefault) event.preventDefault();
      const controls = busyControls(event);
      if (controls.some((control) => control.disabled)) return;
      for (const control of controls) control.disabled = true;
      try {
        await action(event);
      } catch (error) {
        if (!(error instanceof SignedOut || (error instanceof ApiError && error.status === 401))) {
          status(error.message, true);
        }
      } finally {
        for (const control of controls) control.disabled = false;
      }
    };
  }

  function busyControls(event) {
    const target = event && event.currentTarget;
    if (!target || !target.tagName) return [];
    if (target.tagName === "FORM") return [...target.querySelectorAll("button:not([type=button])")];
    return target.tagName === "BUTTON" ? [target] : [];
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // -- sign in / views ----------------------------------------------------------------------------------------------

  function signOut(message) {
    sessionStorage.removeItem(TOKEN);
    forget();
    $("#nav").hidden = true;
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
    $("#login").hidden = false;
    status(message || "", Boolean(message));
  }

  // What the page was shown with the token goes with it, not only the token: a new key's secret (shown once), the
  // keys, the usage, the jobs (with their signed image links) and the providers stay for no one who uses the tab next.
  function forget() {
    $("#new-key").hidden = true;
    for (const id of ["#new-key-label", "#new-key-secret", "#new-key-hook", "#usage-total", "#usage-chart", "#jobs-list"]) {
      $(id).replaceChildren();
    }
    for (const tbody of document.querySelectorAll("main table tbody")) tbody.replaceChildren();
    for (const id of ["#usage-key", "#jobs-key"]) $(id).replaceChildren(el("option", { value: "", text: "all keys" }));
    for (const form of document.querySelectorAll("main form")) form.reset();
    keyNames = new Map();
    jobsCursor = null;
    jobsQuery = null;
    jobsSearch += 1;
    session += 1; // the answers still to come are of the token gone
    $("#jobs-more").hidden = true;
  }

  async function signIn(token) {
    sessionStorage.setItem(TOKEN, token);
    await loadKeys(); // proves the token
    $("#login").hidden = true;
    $("#nav").hidden = false;
    status("");
    show("keys");
  }

  const loaders = { keys: loadKeys, usage: loadUsage, jobs: () => searchJobs(false), providers: loadProviders };

  async function show(name) {
    for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
    for (const button of document.querySelectorAll("#nav [data-view]")) {
      button.classList.toggle("active", button.dataset.view === name);
    }
    await loaders[name]();
  }

  // -- keys -------------------------------------------------------------------------------------------------------

  function keySelects(keys) {
    for (const id of ["#usage-key", "#jobs-key"]) {
      const select = $(id);
      const chosen = select.value;
      const options = [el("option", { value: "", text: "all keys" })];
      for (const key of keys) options.push(el("option", { value: key.id, text: `${key.name} (${key.id})` }));
      select.replaceChildren(...options);
      select.value = keys.some((k) => k.id === chosen) ? chosen : "";
    }
  }

  async function loadKeys() {
    const { data } = await api("GET", "keys");
    keyNames = new Map(data.map((key) => [key.id, key.name]));
    keySelects(data);
    fill($("#keys-table tbody"), data.map(keyRow));
  }

  function keyRow(key) {
    const amount = el("input", { type: "number", min: "1", step: "1", className: "topup-amount", "aria-label": "Credits" });
    const topUp = el("button", {
      type: "button",
      className: "topup",
      text: "Top up",
      onclick: guarded(async () => {
        const value = Number(amount.value);
        if (!Number.isInteger(value) || value < 1) throw new Error("Top up by a whole number of credits, 1 or more.");
        await api("POST", `keys/${encodeURIComponent(key.id)}/topup`, { amount: value });
        status(`Topped up ${key.name} by ${value} credits.`);
        await loadKeys();
      }),
    });
    const revoke = el("button", { type: "button", className: "revoke danger", text: "Revoke" });
    revoke.addEventListener(
      "click",
      guarded(async () => {
        if (!revoke.classList.contains("confirm")) {
          revoke.classList.add("confirm");
          revoke.textContent = "Really revoke?";
          return;
        }
        await api("POST", `keys/${encodeURIComponent(key.id)}/revoke`);
        status(`Revoked ${key.name}.`);
        await loadKeys();
      }),
    );
    const live = !key.revoked && !(key.expires_at && key.expires_at * 1000 < Date.now());
    const state = key.revoked ? "revoked" : live ? "active" : "expired";
    return el(
      "tr",
      { "data-key-id": key.id, "data-key-name": key.name, className: state },
      el("td", { className: "name", text: key.name }),
      el("td", {}, el("code", { text: key.id })),
      el("td", {}, el("code", { text: `${key.prefix}…` })),
      el("td", { className: "balance num", text: key.balance }),
      el("td", { className: "held num", text: key.held }),
      el("td", { className: "available num", text: key.available }),
      el("td", { text: key.models ? key.models.join(", ") : "all" }),
      el("td", { className: "num", text: key.rpm ?? "-" }),
      el("td", { text: key.expires_at ? when(key.expires_at) : "never" }),
      el("td", { className: "state", text: state }),
      el("td", {}, ...(key.revoked ? [] : [amount, topUp])),
      el("td", {}, key.revoked ? null : revoke),
    );
  }

  async function createKey(event) {
    const form = event.target;
    const body = { name: $("#new-key-name").value.trim(), quota: Number($("#new-key-quota").value || 0) };
    const models = $("#new-key-models").value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) body.models = models;
    if ($("#new-key-rpm").value) body.rpm = Number($("#new-key-rpm").value);
    if ($("#new-key-expires").value) body.expires_at = $("#new-key-expires").value;
    const key = await api("POST", "keys", body);
    $("#new-key-label").textContent = `${key.name} (${key.id})`;
    $("#new-key-secret").textContent = key.secret;
    $("#new-key-hook").textContent = key.hook_secret;
    $("#new-key").hidden = false;
    form.reset();
    status(`Created ${key.name}.`);
    await loadKeys();
  }

  async function exportLedger() {
    const blob = await api("GET", "ledger.csv");
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: "mj-relay-ledger.csv" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // -- usage ------------------------------------------------------------------------------------------------------

  function sumBy(rows, field) {
    const totals = new Map();
    for (const row of rows) {
      const entry = totals.get(row[field]) || { jobs: 0, credits: 0, name: row.key_name };
      entry.jobs += row.jobs;
      entry.credits += row.credits;
      totals.set(row[field], entry);
    }
    return [...totals.entries()].sort((a, b) => b[1].credits - a[1].credits);
  }

  async function loadUsage() {
    if (!keyNames.size) await loadKeys();
    const days = Number($("#usage-days").value);
    const until = Date.now() / 1000; // the relay's own clock ends the window: nothing captured just now is cut off
    const since = Math.floor(until) - days * 86400;
    const params = new URLSearchParams({ since: String(since) });
    if ($("#usage-key").value) params.set("key", $("#usage-key").value);
    const usage = await api("GET", `usage?${params}`);
    $("#usage-total").textContent =
      `${usage.total.credits} credits over ${usage.total.jobs} jobs`;
    const line = (label, entry) =>
      el("tr", {}, el("td", { text: label }), el("td", { className: "num", text: entry.jobs }),
        el("td", { className: "num", text: entry.credits }));
    fill($("#usage-by-key tbody"), sumBy(usage.data, "key").map(([id, e]) => line(e.name || id, e)));
    fill($("#usage-by-model tbody"), sumBy(usage.data, "model").map(([model, e]) => line(model, e)));
    fill($("#usage-by-action tbody"), sumBy(usage.data, "action").map(([action, e]) => line(action, e)));
    drawChart(usage.data, since, until);
  }

  function drawChart(rows, since, until) {
    const perDay = new Map();
    for (const row of rows) perDay.set(row.day, (perDay.get(row.day) || 0) + row.credits);
    const days = [];
    for (let t = Math.floor(since / 86400) * 86400; t < until; t += 86400) {
      days.push(new Date(t * 1000).toISOString().slice(0, 10));
    }
    const width = 720, height = 200, left = 48, bottom = 24, top = 10;
    const max = Math.max(1, ...days.map((d) => perDay.get(d) || 0));
    const step = (width - left) / Math.max(1, days.length);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Credits per day" });
    chart.append(svg("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
    const label = (x, y, text, anchor) => {
      const node = svg("text", { x, y, "text-anchor": anchor, class: "label" });
      node.textContent = text;
      chart.append(node);
    };
    label(left - 6, top + 10, String(max), "end");
    label(left - 6, height - bottom, "0", "end");
    if (days.length) {
      label(left, height - 6, days[0], "start");
      label(width, height - 6, days[days.length - 1], "end");
    }
    days.forEach((day, i) => {
      const credits = perDay.get(day) || 0;
      if (!credits) return;
      const h = ((height - bottom - top) * credits) / max;
      const bar = svg("rect", {
        x: left + i * step + step * 0.1,
        y: height - bottom - h,
        width: Math.max(1, step * 0.8),
        height: h,
        class: "bar",
        "data-day": day,
        "data-credits": credits,
      });
      const title = svg("title");
      title.textContent = `${day}: ${credits} credits`;
      bar.append(title);
      chart.append(bar);
    });
    $("#usage-chart").replaceChildren(chart);
  }

  // -- jobs -------------------------------------------------------------------------------------------------------

  function dateToSeconds(value, endOfDay) {
    if (!value) return null;
    return Math.floor(Date.parse(`${value}T00:00:00Z`) / 1000) + (endOfDay ? 86400 : 0);
  }

  function jobsFilters() {
    const params = new URLSearchParams({ limit: "24" });
    if ($("#jobs-key").value) params.set("key", $("#jobs-key").value);
    if ($("#jobs-state").value) params.set("state", $("#jobs-state").value);
    const since = dateToSeconds($("#jobs-since").value, false);
    const until = dateToSeconds($("#jobs-until").value, true);
    if (since !== null) params.set("since", String(since));
    if (until !== null) params.set("until", String(until));
    return params.toString();
  }

  // More continues the search whose list is shown, with its filters (not those chosen since without a Search); the
  // answer to a search (or its More) that a newer search replaced meanwhile is dropped. A new search hides More until
  // its own list is shown: the list on show is the last search's, and More then had no cursor to go on from, so it
  // read the new search's first page again and put it under that list a second time.
  async function searchJobs(more) {
    if (!keyNames.size) await loadKeys();
    if (!more || jobsQuery === null) {
      jobsQuery = jobsFilters();
      jobsCursor = null;
      jobsSearch += 1;
      $("#jobs-more").hidden = true;
    }
    const search = jobsSearch;
    const params = new URLSearchParams(jobsQuery);
    if (more && jobsCursor) params.set("cursor", jobsCursor);
    const page = await api("GET", `jobs?${params}`);
    if (search !== jobsSearch) return;
    const cards = page.data.map(jobCard);
    if (more) $("#jobs-list").append(...cards);
    else $("#jobs-list").replaceChildren(...cards);
    if (!page.data.length && !more) $("#jobs-list").append(el("p", { text: "No jobs." }));
    jobsCursor = page.next_cursor;
    $("#jobs-more").hidden = !page.has_more;
  }

  function jobCard(job) {
    const main = job.images.find((image) => image.name === "grid.png" || image.name === "image.png");
    const picture = main
      ? el("a", { href: main.url, target: "_blank", rel: "noopener noreferrer" },
          el("img", { src: main.url, alt: `${job.action} ${job.id}`, className: "thumb", loading: "lazy" }))
      : el("div", { className: "thumb empty", text: job.result_text ? "text" : job.state.toLowerCase() });
    const tiles = job.images.filter((image) => /^[1-4]\.png$/.test(image.name));
    return el(
      "article",
      { className: `job ${job.state.toLowerCase()}`, "data-job-id": job.id, "data-key-id": job.key_id },
      picture,
      el("div", { className: "meta" },
        el("p", {}, el("code", { text: job.id })),
        el("p", { className: "state", text: `${job.state} · ${job.action} · ${job.model}` }),
        el("p", { text: `${keyNames.get(job.key_id) || job.key_id} · ${job.price} credits (${job.hold_state})` }),
        el("p", { text: `created ${when(job.created_at)}` }),
        el("p", { className: "prompt", text: job.prompt || job.result_text || "" }),
        job.fail_reason ? el("p", { className: "error", text: `${job.error_code || ""} ${job.fail_reason}` }) : null,
        tiles.length
          ? el("p", { className: "tiles" }, "tiles: ", ...tiles.map((tile) =>
              el("a", { href: tile.url, target: "_blank", rel: "noopener noreferrer", text: tile.name[0] })))
          : null,
      ),
    );
  }

  // -- providers ----------------------------------------------------------------------------------------------------

  async function loadProviders() {
    const { data } = await api("GET", "providers");
    fill(
      $("#providers-table tbody"),
      data.map((p) =>
        el("tr", { "data-provider": p.name, className: p.state },
          el("td", { text: p.name }),
          el("td", { text: p.dialect }),
          el("td", { text: p.modes.join(", ") }),
          el("td", { className: "state", text: p.state }),
          el("td", { text: when(p.since) }),
          el("td", { text: when(p.until) }),
          el("td", { text: p.reason || "-" }),
          el("td", { className: "num", text: p.in_flight + p.in_flight_elsewhere }),
          el("td", { className: "num", text: p.max_in_flight ?? "-" }),
          el("td", { className: "num", text: p.priority }),
          el("td", { className: "num", text: p.weight }),
        ),
      ),
    );
  }

  // -- wiring -----------------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("#login-form").addEventListener("submit", guarded(async () => {
      const token = $("#token").value.trim();
      $("#token").value = "";
      await signIn(token);
    }));
    $("#sign-out").addEventListener("click", () => signOut(""));
    for (const button of document.querySelectorAll("#nav [data-view]")) {
      button.addEventListener("click", guarded(() => show(button.dataset.view)));
    }
    $("#create-key-form").addEventListener("submit", guarded(createKey));
    $("#ledger-export").addEventListener("click", guarded(exportLedger));
    $("#usage-form").addEventListener("submit", guarded(loadUsage));
    $("#jobs-form").addEventListener("submit", guarded(() => searchJobs(false)));
    $("#jobs-more").addEventListener("click", guarded(() => searchJobs(true)));
    $("#providers-refresh").addEventListener("click", guarded(loadProviders));
    if (sessionStorage.getItem(TOKEN)) guarded(() => signIn(sessionStorage.getItem(TOKEN)))();
  });
})();
