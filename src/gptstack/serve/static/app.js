// gptstack serve: Chat, Compare and Label views over the /api of serve/app.py.
// Model output is untrusted text: it is only ever written with textContent (and the server's
// Content-Security-Policy allows no inline script), so "<script>" in a response is shown, not run.
"use strict";

const $ = (id) => document.getElementById(id);
let token = null;
let info = null;

// --- plumbing -------------------------------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function errorText(status, data) {
  if (data && data.error) return data.error;
  if (data && typeof data.detail === "string") return data.detail;
  if (data && data.detail) return JSON.stringify(data.detail);
  return "HTTP " + status;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(body !== undefined),
                                body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    if (r.status === 401) $("token-form").hidden = false;
    throw new Error(`${r.status}: ${errorText(r.status, data)}`);
  }
  return data;
}

function number(id) { return Number($(id).value); }

function fillStages(select, names, selected) {
  select.replaceChildren(...names.map((n) => { const o = el("option", null, n); o.value = n; return o; }));
  if (selected && names.includes(selected)) select.value = selected;
}

function showView(name) {
  for (const v of ["chat", "compare", "label"]) {
    $("view-" + v).hidden = v !== name;
    $("tab-" + v).classList.toggle("active", v === name);
  }
  sessionStorage.setItem("gptstack-view", name);
  if (name === "label") startLabeling();
}

// --- chat -----------------------------------------------------------------------------------

let chatHistory = [];
let chatBusy = false;

function addMessage(role, text) {
  const m = el("div", "msg " + role, text);
  $("chat-log").append(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

// Server-Sent Events over fetch (EventSource cannot POST or send the token header).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function sendChat(text) {
  if (chatBusy) return;
  chatBusy = true;
  $("chat-send").disabled = true;
  chatHistory.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  bubble.dataset.pieces = "0";
  const body = {
    stage: $("chat-stage").value, messages: chatHistory, temperature: number("chat-temperature"),
    top_k: number("chat-top-k"), top_p: number("chat-top-p"), max_new_tokens: number("chat-max-new"),
    seed: number("chat-seed") + chatHistory.length,
  };
  try {
    const r = await fetch("/api/chat", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
    if (!r.ok) {
      let data = null;
      try { data = await r.json(); } catch (e) { data = null; }
      if (r.status === 401) $("token-form").hidden = false;
      throw new Error(`${r.status}: ${errorText(r.status, data)}`);
    }
    setStatus("streaming from " + body.stage + " …");
    for await (const { event, data } of sseEvents(r)) {
      if (event === "token") {
        bubble.textContent += data.text;
        bubble.dataset.pieces = String(Number(bubble.dataset.pieces) + 1);
      } else if (event === "done") {
        bubble.textContent = data.text;  // the authoritative reply (the pieces add up to it)
        chatHistory.push({ role: "assistant", content: data.text });
        const meta = `${data.stage} · ${data.seconds} s` + (data.finished ? "" : " · cut off at the length limit")
          + (data.dropped_messages ? ` · ${data.dropped_messages} oldest messages left out (context)` : "");
        bubble.append(el("div", "meta", meta));
        bubble.dataset.done = "1";
        setStatus("");
      } else if (event === "error") {
        throw new Error(data.detail);
      }
    }
  } catch (e) {
    chatHistory.pop();
    bubble.append(el("div", "meta", "error: " + e.message));
    setStatus(e.message, true);
  } finally {
    bubble.classList.remove("streaming");
    chatBusy = false;
    $("chat-send").disabled = false;
  }
}

// --- compare --------------------------------------------------------------------------------

function figure(label, value, good) {
  const f = el("span", good === undefined ? "" : good ? "good" : "badval", `${label} ${value}`);
  return f;
}

async function runCompare() {
  const prompt = $("compare-prompt").value.trim();
  if (!prompt) { setStatus("type a prompt, or take a world prompt", true); return; }
  const body = { prompt, stages: [$("compare-a").value, $("compare-b").value],
                 temperature: number("compare-temperature"), max_new_tokens: number("compare-max-new"),
                 seed: number("compare-seed") };
  setStatus("sampling …");
  $("compare-run").disabled = true;
  try {
    const data = await api("POST", "/api/compare", body);
    $("compare-answer").textContent = data.world ? "World prompt; correct answer: " + data.answer
                                                 : "Not a world prompt: no gold reward.";
    $("compare-out").replaceChildren(...data.results.map((r) => {
      const card = el("div", "card");
      card.dataset.stage = r.stage;
      card.append(el("div", "meta", r.stage + (r.finished ? "" : " · cut off")));
      card.append(el("div", "text", r.text));
      const figs = el("div", "figures");
      if (r.gold !== null) {
        figs.append(figure("gold", r.gold.toFixed(3), r.correct));
        figs.append(figure("", r.correct ? "correct" : "wrong", r.correct));
      }
      if (r.rm !== null) figs.append(figure("RM", r.rm.toFixed(3)));
      card.append(figs);
      return card;
    }));
    setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("compare-run").disabled = false;
  }
}

// --- label ----------------------------------------------------------------------------------

let item = null;
let picks = [];
let labelBusy = false;
let loading = false;

function annotator() { return $("annotator").value.trim(); }

function ordinal(n) { return n <= 3 ? ["1st", "2nd", "3rd"][n - 1] : n + "th"; }

function renderItem() {
  const box = $("label-item");
  if (!item) { box.hidden = true; return; }
  box.hidden = false;
  box.dataset.itemId = String(item.item_id);
  $("label-item-id").textContent = "item " + item.item_id;
  $("label-model").textContent = `· sampled by ${item.model} · prompt ${item.prompt_index + 1} of ${item.source}`;
  $("label-prompt").replaceChildren(...item.prompt.map((m) => el("div", "turn", `${m.role}: ${m.content}`)));
  $("label-responses").replaceChildren(...item.responses.map((text, i) => {
    const li = el("li");
    li.dataset.index = String(i);
    const rank = picks.indexOf(i);
    if (rank >= 0) li.classList.add("picked");
    li.append(el("span", "key", i + 1));
    const body = el("div");
    body.append(el("div", "text", text));
    if (!item.finished[i]) body.append(el("span", "tag", "cut off at the length limit"));
    li.append(body);
    li.append(el("span", "rank", rank >= 0 ? ordinal(rank + 1) : ""));
    li.addEventListener("click", () => pick(i));
    return li;
  }));
  $("label-save").disabled = picks.length !== item.responses.length;
}

function showStats(s) {
  const by = s.by_status || {};
  $("label-progress").textContent = `You: ${s.labeled} labeled (${by.ranked} ranked, ${by.all_bad} all bad, `
    + `${by.skipped} skipped) · everyone: ${s.total} · prompts covered: ${s.prompts_labeled} of ${s.prompt_set_size}`;
  $("label-agreement").textContent = s.gold_pairs
    ? `Agreement with gold: ${(100 * s.gold_agreement).toFixed(0)} % of ${s.gold_pairs} pairs whose gold differs`
    : "Agreement with gold: no world pairs with different gold yet";
}

async function loadNext() {
  const name = annotator();
  if (!name) { item = null; renderItem(); setStatus("enter your name to start labeling", true); return; }
  if (loading) return;
  loading = true;
  setStatus("sampling responses …");
  try {
    const data = await api("POST", "/api/label/next", { annotator: name });
    item = data;
    picks = [];
    renderItem();
    showStats(data.stats);
    setStatus("");
  } catch (e) {
    item = null;
    renderItem();
    setStatus(e.message, true);
  } finally {
    loading = false;
  }
}

function startLabeling() {
  if (!item && info && info.label.available) loadNext();
  else if (info && !info.label.available) setStatus(`no ${info.label.stage} model in this run to sample from`, true);
}

function pick(i) {
  if (!item || labelBusy || picks.includes(i) || i >= item.responses.length) return;
  picks.push(i);
  if (picks.length === item.responses.length - 1) {  // the last one is implied
    picks.push(item.responses.findIndex((_, j) => !picks.includes(j)));
  }
  renderItem();
}

async function saveLabel(status) {
  if (!item || labelBusy) return;
  if (status === "ranked" && picks.length !== item.responses.length) {
    setStatus(`rank all ${item.responses.length} responses first`, true);
    return;
  }
  labelBusy = true;
  try {
    await api("POST", "/api/label", { item_id: item.item_id, annotator: annotator(), status,
                                      ranking: status === "ranked" ? picks : null, responses: item.responses });
    await loadNext();
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    labelBusy = false;
  }
}

async function undoLabel() {
  if (labelBusy || !annotator()) return;
  labelBusy = true;
  try {
    const data = await api("POST", "/api/label/undo", { annotator: annotator() });
    await loadNext();
    setStatus(data.undone ? `undid the label of item ${data.undone.item_id}` : "nothing to undo");
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    labelBusy = false;
  }
}

function onKey(e) {
  if ($("view-label").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
  const target = e.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT")) return;
  if (/^[1-9]$/.test(e.key)) { pick(Number(e.key) - 1); e.preventDefault(); }
  else if (e.key === "Enter") { saveLabel("ranked"); e.preventDefault(); }
  else if (e.key === "Backspace") { picks.pop(); renderItem(); e.preventDefault(); }
  else if (e.key === "b" || e.key === "B") saveLabel("all_bad");
  else if (e.key === "s" || e.key === "S") saveLabel("skipped");
  else if (e.key === "u" || e.key === "U") undoLabel();
}

// --- start ----------------------------------------------------------------------------------

async function start() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {  // from the URL gptstack serve prints; kept for this tab only, and off the address bar
    sessionStorage.setItem("gptstack-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  token = sessionStorage.getItem("gptstack-token");
  try {
    info = await api("GET", "/api/info");
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  $("token-form").hidden = true;
  $("run").textContent = info.run;
  const lms = info.language_models;
  fillStages($("chat-stage"), lms, info.default_stage);
  fillStages($("compare-a"), lms, lms.includes("sft") ? "sft" : lms[0]);
  fillStages($("compare-b"), lms, info.default_stage);
  // the sampling inputs start at the config's `sampling` section (the same defaults as `gptstack chat`)
  const d = info.sampling;
  for (const [id, value] of [["chat-temperature", d.temperature], ["chat-top-k", d.top_k], ["chat-top-p", d.top_p],
                             ["chat-max-new", d.max_new_tokens], ["chat-seed", d.seed],
                             ["compare-temperature", d.temperature], ["compare-max-new", d.max_new_tokens],
                             ["compare-seed", d.seed]]) $(id).value = value;
  $("annotator").value = localStorage.getItem("gptstack-annotator") || "";
  document.body.dataset.ready = "1";
  showView(sessionStorage.getItem("gptstack-view") || "chat");
}

function wire() {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value;
    sessionStorage.setItem("gptstack-token", token);
    $("token-form").hidden = true;
    start();
  });
  for (const v of ["chat", "compare", "label"]) $("tab-" + v).onclick = () => showView(v);
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value;
    if (!text.trim()) return;
    $("chat-input").value = "";
    sendChat(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-reset").onclick = () => { chatHistory = []; $("chat-log").replaceChildren(); };
  $("compare-form").addEventListener("submit", (e) => { e.preventDefault(); runCompare(); });
  $("compare-world").onclick = async () => {
    try { $("compare-prompt").value = (await api("GET", "/api/world/prompt")).prompt; } catch (e) { setStatus(e.message, true); }
  };
  $("annotator").addEventListener("change", () => {
    localStorage.setItem("gptstack-annotator", annotator());
    item = null;
    startLabeling();
  });
  $("label-save").onclick = () => saveLabel("ranked");
  $("label-clear").onclick = () => { picks = []; renderItem(); };
  $("label-bad").onclick = () => saveLabel("all_bad");
  $("label-skip").onclick = () => saveLabel("skipped");
  $("label-undo").onclick = () => undoLabel();
  document.addEventListener("keydown", onKey);
  start();
}

wire();
