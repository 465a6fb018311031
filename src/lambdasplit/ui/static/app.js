// lambdasplit web UI: chat and image tabs over server-sent events from /api/chat and /api/image.
// The conversation lives in localStorage; answers are rendered as markdown (marked) and sanitised
// (DOMPurify) so a model's output can never run script in the page.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "lambdasplit.chat.v1";
let chat = loadChat();
let info = null;
let running = null; // the AbortController of the turn in flight
const gallery = [];

function newId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function loadChat() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE));
    if (saved && typeof saved.conversation === "string" && Array.isArray(saved.messages)) return saved;
  } catch (err) { /* a damaged entry starts a new conversation */ }
  return {conversation: newId(), system: "", messages: []};
}

function saveChat() {
  localStorage.setItem(STORE, JSON.stringify(chat));
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1 << 20)).toFixed(2)} MiB`;
}

// What the UI server said about a refused request, without the HTTP plumbing.
async function refusal(response) {
  const text = await response.text();
  try {
    const data = JSON.parse(text);
    if (typeof data.error === "string") return data.error;
  } catch (err) { /* not JSON: a proxy or a crash page */ }
  return `the UI server answered HTTP ${response.status}${text ? ": " + text.slice(0, 200) : ""}`;
}

// POST a JSON body and call onEvent for each `data:` event. `controller` aborts it (Stop); a silent
// server and a refused request get clear messages. Returns "done", "stopped" or "error".
async function stream(url, body, onEvent, controller, timeoutMs = 180000) {
  let timedOut = false;
  const expire = () => { timedOut = true; controller.abort(); };
  let timer = setTimeout(expire, timeoutMs);
  try {
    const response = await fetch(url, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      onEvent({type: "error", message: await refusal(response)});
      return "error";
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      clearTimeout(timer);
      timer = setTimeout(expire, timeoutMs);
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (chunk.startsWith("data: ")) onEvent(JSON.parse(chunk.slice(6)));
      }
    }
    return "done";
  } catch (err) {
    if (err.name === "AbortError" && !timedOut) return "stopped";
    const message = timedOut
      ? `no answer for ${timeoutMs / 1000} s: the body server may be down or overloaded`
      : `cannot reach the UI server (is lambdasplit ui still running?): ${err.message}`;
    onEvent({type: "error", message});
    return "error";
  } finally {
    clearTimeout(timer);
  }
}

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
});

// Markdown to sanitised HTML; images and forms are dropped too (a picture would fetch a URL the
// model chose, which is a way out of the page for the conversation's text).
function renderMarkdown(el, text) {
  const html = marked.parse(text, {gfm: true, breaks: true});
  el.innerHTML = DOMPurify.sanitize(html, {
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "video", "audio", "iframe"],
    FORBID_ATTR: ["style", "id", "name"],  // no id/name: model output must not shadow the page's own elements
    SANITIZE_NAMED_PROPS: true,
  });
  el.querySelectorAll("pre").forEach((pre) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "copy";
    button.addEventListener("click", () => copy(pre.querySelector("code")?.textContent ?? pre.textContent, button));
    pre.appendChild(button);
  });
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (err) { // no clipboard permission (plain http on another host): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.dataset.copied = "1";
  const label = button.textContent;
  button.textContent = "copied";
  setTimeout(() => { button.textContent = label; delete button.dataset.copied; }, 1200);
}

function actionButton(label, cls, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `action ${cls}`;
  button.textContent = label;
  button.addEventListener("click", onClick);
  return button;
}

function messageView(message, index) {
  const div = document.createElement("div");
  div.className = `msg ${message.role}`;
  div.dataset.index = index;
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "assistant") renderMarkdown(content, message.content);
  else content.textContent = message.content;
  div.appendChild(content);
  if (message.stats) {
    const meta = document.createElement("div");
    meta.className = "meta";
    const s = message.stats;
    meta.textContent = `${bytes(s.up)} to the cloud, ${bytes(s.down)} back; prompt: ${s.sent} positions sent, ${s.reused} already cached` +
      (message.stopped ? " · stopped" : "");
    div.appendChild(meta);
  } else if (message.stopped) {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "stopped";
    div.appendChild(meta);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.appendChild(actionButton("copy", "copy", (e) => copy(message.content, e.target)));
  if (message.role === "user") actions.appendChild(actionButton("edit", "edit", () => startEdit(div, index)));
  if (index === chat.messages.length - 1) actions.appendChild(actionButton("retry", "retry", retry));
  div.appendChild(actions);
  return div;
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  chat.messages.forEach((m, i) => box.appendChild(messageView(m, i)));
  const last = box.querySelector(".msg.assistant:last-child");
  if (last) { last.id = "answer"; last.dataset.state = "done"; }
  box.scrollTop = box.scrollHeight;
}

function startEdit(div, index) {
  if (running) return;
  const content = div.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = chat.messages[index].content;
  content.replaceWith(editor);
  const actions = div.querySelector(".actions");
  actions.innerHTML = "";
  actions.appendChild(actionButton("save & send", "save", () => {
    const text = editor.value.trim();
    if (!text) return;
    chat.messages = chat.messages.slice(0, index).concat([{role: "user", content: text}]);
    runTurn();
  }));
  actions.appendChild(actionButton("cancel", "cancel", renderMessages));
  editor.focus();
}

function retry() {
  if (running) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (chat.messages.length) runTurn();
}

function number(id) {
  const raw = $(id).value;
  return raw === "" ? null : Number(raw);
}

function setRunning(controller) {
  running = controller;
  $("send").hidden = !!controller;
  $("stop").hidden = !controller;
  document.querySelectorAll(".msg .actions button").forEach((b) => { b.disabled = !!controller; });
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || running) return;
  $("chat-input").value = "";
  chat.messages.push({role: "user", content: text});
  await runTurn();
}

// Ask for an answer to chat.messages (which end with the user's turn) and stream it in.
async function runTurn() {
  showError("");
  saveChat();
  renderMessages();
  const answer = document.createElement("div");
  answer.className = "msg assistant";
  answer.id = "answer";
  answer.dataset.state = "streaming";
  const content = document.createElement("div");
  content.className = "content";
  answer.appendChild(content);
  document.querySelectorAll("#messages .msg").forEach((m) => m.removeAttribute("id"));
  $("messages").appendChild(answer);
  const system = chat.system.trim() ? [{role: "system", content: chat.system.trim()}] : [];
  const request = {
    conversation: chat.conversation, messages: system.concat(chat.messages.map(({role, content: c}) => ({role, content: c}))),
    max_new_tokens: number("max-new-tokens") ?? 64, temperature: number("temperature") ?? 0,
    top_p: number("top-p") ?? 1, top_k: number("top-k") ?? 0, seed: number("seed"),
    speculate: $("speculate").checked ? $("speculate-mode").value : false,
  };
  let text = "";
  let stats = null;
  const controller = new AbortController();
  setRunning(controller);
  const outcome = await stream("/api/chat", request, (ev) => {
    if (ev.type === "token") {
      text += ev.text;
      renderMarkdown(content, text);
      $("messages").scrollTop = $("messages").scrollHeight;
    } else if (ev.type === "done") {
      text = ev.text;
      stats = ev;
      showStats(ev);
    } else if (ev.type === "error") {
      showError(ev.message);
    }
  }, controller);
  setRunning(null);
  if (stats) {
    chat.messages.push({role: "assistant", content: text, stats: {up: stats.bytes_to_cloud, down: stats.bytes_from_cloud,
      sent: stats.prompt_positions - stats.reused_positions, reused: stats.reused_positions}});
  } else if (outcome === "stopped" && text) {
    chat.messages.push({role: "assistant", content: text, stopped: true});
  } else if (outcome !== "stopped") {
    content.textContent = text || "(no answer)";
    answer.dataset.state = "error";
    saveChat();
    return; // the user's message stays: retry or edit it
  }
  saveChat();
  renderMessages();
  const last = $("answer");
  if (last && outcome === "stopped") last.dataset.state = "stopped";
}

function stopChat() {
  if (running) running.abort();
}

function clearChat() {
  if (running) running.abort();
  fetch(`/api/conversations/${chat.conversation}`, {method: "DELETE"}).catch(() => {});
  chat = {conversation: newId(), system: chat.system, messages: []};
  localStorage.removeItem(STORE);
  renderMessages();
  showError("");
}

function showStats(ev) {
  drawLayers(ev.split);
  $("bytes-up").textContent = bytes(ev.bytes_to_cloud);
  $("bytes-up").dataset.bytes = ev.bytes_to_cloud;
  $("bytes-down").textContent = bytes(ev.bytes_from_cloud);
  $("bytes-down").dataset.bytes = ev.bytes_from_cloud;
  $("tps").textContent = ev.tokens_per_second.toFixed(1);
  const t = ev.per_token_ms;
  $("latency").textContent = `${t.total.toFixed(1)} ms: device ${t.device.toFixed(1)}, cloud + network ${t.cloud_network.toFixed(1)}`;
  const bar = $("latency-bar").children;
  bar[0].style.width = `${100 * t.device / Math.max(t.total, 1e-9)}%`;
  bar[1].style.width = `${100 * t.cloud_network / Math.max(t.total, 1e-9)}%`;
  const sent = ev.prompt_positions - ev.reused_positions;
  $("turn").textContent = ev.reused_positions
    ? `sent ${sent} new prompt positions; ${ev.reused_positions} were already in the body's cache`
    : `sent the whole prompt (${sent} positions)`;
  $("turn").dataset.reused = ev.reused_positions;
  $("turn").dataset.sent = sent;
  $("round-trips").textContent = `${ev.round_trips} for ${ev.tokens} tokens (${ev.tokens_per_round_trip.toFixed(2)} per trip` +
    (ev.speculate ? `, drafting: ${ev.speculate})` : ", no drafting)");
  $("round-trips").dataset.roundTrips = ev.round_trips;
  $("round-trips").dataset.perTrip = ev.tokens_per_round_trip;
  drawHeatmap(ev.saw);
  const recoverable = $("cloud-prompt");
  recoverable.hidden = !ev.cloud_prompt;
  recoverable.textContent = ev.cloud_prompt
    ? `What a curious cloud can recover (pseudonymised${ev.rows > 1 ? `, hidden among ${ev.rows - 1} decoy rows` : ""}):\n${ev.cloud_prompt}`
    : "";
  $("kept").innerHTML = "";
  ev.kept_tokens.forEach((tok) => {
    const li = document.createElement("li");
    li.textContent = JSON.stringify(tok);
    $("kept").appendChild(li);
  });
}

function drawLayers(split) {
  const box = $("layers");
  box.innerHTML = "";
  for (let i = 0; i < split.layers; i++) {
    const cell = document.createElement("span");
    const inBody = i >= split.body[0] && i < split.body[1];
    cell.className = inBody ? "cloud" : "device";
    cell.title = `layer ${i}: ${inBody ? "body (cloud)" : i < split.head[1] ? "head (device)" : "tail (device)"}`;
    box.appendChild(cell);
  }
}

function drawHeatmap(saw) {
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!saw) return;
  const w = canvas.width / saw.channels, h = canvas.height / saw.positions;
  saw.values.forEach((row, p) => row.forEach((v, c) => {
    const a = Math.min(1, Math.abs(v) * 3);
    ctx.fillStyle = v >= 0 ? `rgba(231,111,81,${a})` : `rgba(42,157,143,${a})`;
    ctx.fillRect(c * w, p * h, Math.ceil(w), Math.ceil(h));
  }));
  canvas.title = `first ${saw.positions} positions x ${saw.channels} channels of h_K, shape ${saw.of.join(" x ")}`;
}

function imageName(ev) {
  const slug = ev.prompt.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "image";
  return `lambdasplit-${slug}-seed${ev.seed}-${ev.mode}.png`;
}

function showImage(entry) {
  $("image-out").src = entry.src;
  const link = $("image-download");
  link.href = entry.src;
  link.download = entry.name;
  link.hidden = false;
}

function addToGallery(entry) {
  gallery.push(entry);
  const box = $("gallery");
  if (gallery.length === 1) box.innerHTML = "";
  const figure = document.createElement("figure");
  figure.className = "thumb";
  const img = document.createElement("img");
  img.src = entry.src;
  img.alt = entry.caption;
  img.title = `${entry.caption} (click to show)`;
  img.addEventListener("click", () => showImage(entry));
  const link = document.createElement("a");
  link.href = entry.src;
  link.download = entry.name;
  link.textContent = "download";
  const caption = document.createElement("figcaption");
  caption.textContent = entry.caption;
  figure.append(img, caption, link);
  box.appendChild(figure);
}

async function makeImage(event) {
  event.preventDefault();
  showError("");
  $("image-go").disabled = true;
  $("image-state").textContent = "starting";
  $("image-state").dataset.state = "running";
  const request = {
    prompt: $("image-prompt").value, steps: number("image-steps") ?? 12, seed: number("image-seed") ?? 0,
    guidance: number("image-guidance") ?? 5, mode: $("image-mode").value, k: number("image-k") ?? 1,
  };
  await stream("/api/image", request, (ev) => {
    if (ev.type === "step") {
      $("image-state").textContent = `step ${ev.step} / ${ev.total}`;
      if (ev.preview) $("image-out").src = ev.preview;
      if (ev.tensor) $("image-tensor").src = ev.tensor;
    } else if (ev.type === "done") {
      const entry = {src: ev.image, name: imageName(ev), caption: `${ev.prompt} · seed ${ev.seed}, ${ev.steps} steps, ${ev.mode}`};
      showImage(entry);
      addToGallery(entry);
      $("image-state").textContent = `done in ${ev.seconds.toFixed(1)} s (${ev.mode}): ${bytes(ev.bytes_to_cloud)} to the cloud, ${bytes(ev.bytes_from_cloud)} back`;
      $("image-state").dataset.state = "done";
    } else if (ev.type === "error") {
      $("image-state").textContent = "failed";
      $("image-state").dataset.state = "error";
      showError(ev.message);
    }
  }, new AbortController(), 600000);
  $("image-go").disabled = false;
}

function switchTab(name) {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t.dataset.tab === name));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === name));
}

async function start() {
  document.querySelectorAll(".tab").forEach((t) => t.addEventListener("click", () => switchTab(t.dataset.tab)));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", stopChat);
  $("clear").addEventListener("click", clearChat);
  $("system-prompt").value = chat.system || "";
  $("system-prompt").addEventListener("input", () => { chat.system = $("system-prompt").value; saveChat(); });
  $("image-form").addEventListener("submit", makeImage);
  renderMessages();
  try {
    info = await (await fetch("/api/info")).json();
  } catch (err) {
    showError(`cannot reach the UI server: ${err.message}`);
    return;
  }
  const s = info.split;
  $("model").textContent = `${info.model} · K=${s.head[1]}, M=${s.layers - s.tail[0]} of ${s.layers} layers`;
  $("where").textContent = info.server ? `body at ${info.server}` : "body in this process";
  $("speculate").checked = !!info.speculate;
  if (info.speculate && ![...$("speculate-mode").options].some((o) => o.value === info.speculate)) {
    $("speculate-mode").add(new Option(info.speculate, info.speculate));  // the UI's own --speculate (a draft model)
  }
  if (info.speculate) $("speculate-mode").value = info.speculate;
  drawLayers(s);
  if (info.audit) {
    const a = info.audit;
    $("audit").innerHTML = `Measured for K=${a.k} (<code>${a.command}</code>): a curious cloud recovered ` +
      `${Math.round(100 * a.prompt_token_accuracy)}% of prompt tokens and ${Math.round(100 * a.output_token_accuracy)}% ` +
      `of generated tokens. <a href="${a.link}" target="_blank" rel="noopener">Audit numbers</a>.`;
  } else {
    $("audit").innerHTML = `No audit numbers for this split yet: run <code>lambdasplit audit --split ${s.head[1]},${s.layers - s.tail[0]}</code>.`;
  }
  if (!info.image) {
    $("tab-image").disabled = true;
    $("tab-image").title = "image generation is off (start the UI with --image)";
  } else {
    $("image-note").textContent = info.image_note || "";
  }
}

start();
