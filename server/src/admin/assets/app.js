// edge dashboard: confirmations, copy buttons, and the live nodes table.
// Loaded from /assets/app.js (the Content-Security-Policy allows no inline code).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (e) => {
      if (!window.confirm(form.dataset.confirm)) e.preventDefault();
    });
  }
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (_) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
  const table = document.querySelector("table[data-live]");
  if (table) live(table);
});

function fmtTime(t) {
  if (t === null || t === undefined) return "—";
  return new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function fmtRate(bytesPerSec) {
  const units = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
  let v = bytesPerSec, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function cell(row, field, label) {
  const td = document.createElement("td");
  td.dataset.f = field;
  td.dataset.label = label;
  row.appendChild(td);
  return td;
}

function newRow(tbody, name) {
  const row = document.createElement("tr");
  row.id = "node-" + name;
  row.dataset.node = name;
  const first = document.createElement("td");
  first.dataset.label = "Name";
  const a = document.createElement("a");
  a.href = "/ui/nodes/" + encodeURIComponent(name);
  a.textContent = name;
  first.appendChild(a);
  row.appendChild(first);
  cell(row, "servers", "Connected to");
  cell(row, "mode", "Mode");
  cell(row, "cert", "Certificate expires");
  cell(row, "open", "Open connections");
  cell(row, "rate", "Traffic");
  tbody.appendChild(row);
  return row;
}

function live(table) {
  const tbody = table.tBodies[0];
  const last = new Map();
  const tick = async () => {
    let nodes;
    try {
      const r = await fetch(table.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json", "X-Edge-Background": "1" } });
      if (r.status === 401) { window.location.href = "/ui/login"; return; }
      if (!r.ok) return;
      nodes = await r.json();
    } catch (_) {
      return;
    }
    const now = Date.now() / 1000;
    const seen = new Set();
    for (const n of nodes) {
      seen.add(n.name);
      const row = document.getElementById("node-" + n.name) || newRow(tbody, n.name);
      row.dataset.connected = String(n.connected);
      row.querySelector('[data-f="servers"]').textContent = n.servers.length ? n.servers.join(", ") : (n.connected ? "yes" : "—");
      row.querySelector('[data-f="mode"]').textContent = n.mode;
      row.querySelector('[data-f="cert"]').textContent = fmtTime(n.cert_not_after);
      row.querySelector('[data-f="open"]').textContent = String(n.open_connections);
      const bytes = n.bytes_to_node + n.bytes_from_node;
      const prev = last.get(n.name);
      if (prev && now > prev.at) {
        row.querySelector('[data-f="rate"]').textContent = fmtRate(Math.max(0, bytes - prev.bytes) / (now - prev.at));
      }
      last.set(n.name, { bytes, at: now });
    }
    for (const row of Array.from(tbody.rows)) {
      if (!seen.has(row.dataset.node)) row.remove();
    }
    const empty = document.getElementById("no-nodes");
    if (empty && nodes.length) empty.remove();
    table.dataset.updated = String(now);
  };
  tick();
  window.setInterval(tick, 1000);
}
