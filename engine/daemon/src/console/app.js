// mint's console: signs in with an operator token (kept in this tab's sessionStorage),
// draws each tier's K instances, the nodes and the event log, and redraws when the event
// stream says something changed. Everything from the daemon is put in the page as text,
// never as markup.
"use strict";

const KEY = "mint-token";
let who = null;
let streaming = null;
let redraw = null;

function token() { return sessionStorage.getItem(KEY); }

async function api(method, path, body) {
  const init = { method, headers: { "Authorization": "Bearer " + token() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const v = await r.json().catch(() => ({}));
  if (!r.ok) { throw new Error(v.error || ("HTTP " + r.status)); }
  return v;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") { e.className = v; } else { e.setAttribute(k, v); }
  }
  for (const c of children) { e.append(c instanceof Node ? c : document.createTextNode(String(c))); }
  return e;
}

async function signIn(t) {
  sessionStorage.setItem(KEY, t);
  try {
    who = await api("GET", "/v1/whoami");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    document.getElementById("signin-error").textContent = e.message;
    return;
  }
  document.getElementById("signin-error").textContent = "";
  document.getElementById("signin-section").hidden = true;
  document.getElementById("site").hidden = false;
  document.getElementById("signout").hidden = false;
  document.getElementById("who").textContent = who.name + " (" + who.role + ")";
  await draw();
  follow();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  if (streaming) { streaming.abort(); streaming = null; }
  who = null;
  document.getElementById("site").hidden = true;
  document.getElementById("signout").hidden = true;
  document.getElementById("signin-section").hidden = false;
  document.getElementById("who").textContent = "";
  document.getElementById("tiers").replaceChildren();
  document.getElementById("events").replaceChildren();
}

async function draw() {
  const [tiers, nodes] = await Promise.all([api("GET", "/v1/tiers"), api("GET", "/v1/nodes")]);
  const boxes = [];
  for (const t of tiers) {
    const name = t.tier.name;
    const instances = await api("GET", "/v1/tiers/" + encodeURIComponent(name) + "/instances");
    const c = t.status.counts;
    const depth = c.pooled + c.failed;
    const box = el("div", { class: "tier", id: "tier-" + name },
      el("h3", {}, name),
      el("p", { class: "summary" },
        c.deployed + " of " + t.tier.max_instances + " running, desired " + t.tier.desired +
        ", pool depth ", el("span", { class: "pool-depth" }, depth),
        (t.status.settled ? "; settled" : "; in progress") + (t.status.blocked ? "; blocked: " + t.status.blocked : "")));
    const grid = el("div", { class: "grid" });
    for (const i of instances) {
      grid.append(el("div", { class: "cell state-" + i.state, "data-index": i.id.index, title: i.state },
        el("b", {}, "#" + i.id.index + " " + i.state), i.hostname, el("br"), i.address, el("br"), i.node || "no node"));
    }
    box.append(grid);
    if (who && who.role === "admin") {
      const input = el("input", { type: "number", min: "0", max: String(t.tier.max_instances), value: String(t.tier.desired), id: "scale-" + name, "aria-label": "instances of " + name });
      const button = el("button", { id: "scale-" + name + "-button" }, "Scale");
      const said = el("span", { class: "error" });
      button.addEventListener("click", async () => {
        said.textContent = "";
        try { await api("POST", "/v1/tiers/" + encodeURIComponent(name) + "/scale", { instances: Number(input.value) }); }
        catch (e) { said.textContent = e.message; }
      });
      box.append(el("div", { class: "scale" }, "Instances:", input, button, said));
    }
    boxes.push(box);
  }
  document.getElementById("tiers").replaceChildren(...boxes);
  const rows = nodes.map(n => el("tr", { "data-node": n.name },
    el("td", {}, n.name), el("td", {}, n.state),
    el("td", {}, n.instance ? n.instance.tier + "/" + n.instance.index : "-"),
    el("td", {}, n.cpus), el("td", {}, n.memory_mib),
    el("td", {}, Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(" "))));
  document.querySelector("#nodes tbody").replaceChildren(...rows);
  const by = {};
  for (const n of nodes) { by[n.state] = (by[n.state] || 0) + 1; }
  document.getElementById("node-counts").textContent =
    Object.entries(by).map(([s, n]) => n + " " + s).join(", ");
}

function later() {
  // Many events come at once (a scale of many instances): draw once they pause.
  clearTimeout(redraw);
  redraw = setTimeout(() => draw().catch(e => console.warn(e)), 300);
}

function shown(e) {
  const list = document.getElementById("events");
  list.prepend(el("li", { value: e.seq }, new Date(e.at_ms).toLocaleTimeString() + "  " + e.kind + "  " + e.message));
  while (list.children.length > 200) { list.lastChild.remove(); }
}

// The event stream: server-sent events read with fetch, since EventSource cannot send a
// bearer token. A dropped stream is opened again from the last event seen.
async function follow() {
  const recent = await api("GET", "/v1/events?limit=10000").catch(() => []);
  let after = recent.length ? recent[recent.length - 1].seq : null;
  recent.slice(-50).forEach(shown);
  const state = document.getElementById("stream-state");
  while (token()) {
    streaming = new AbortController();
    try {
      const path = "/v1/events?follow=true" + (after === null ? "" : "&after=" + after);
      const r = await fetch(path, { headers: { "Authorization": "Bearer " + token() }, signal: streaming.signal });
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      state.textContent = "(live)";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { break; }
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = frame.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("");
          if (!data) { continue; }
          const e = JSON.parse(data);
          if (e.seq !== undefined) { after = e.seq; shown(e); later(); }
        }
      }
    } catch (e) {
      if (!token()) { return; }
      state.textContent = "(reconnecting: " + e.message + ")";
    }
    await new Promise(r => setTimeout(r, 1000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin").addEventListener("submit", ev => {
    ev.preventDefault();
    signIn(document.getElementById("token").value.trim());
  });
  document.getElementById("signout").addEventListener("click", signOut);
  if (token()) { signIn(token()); }
});
