// lambdasplit web UI: chat and image tabs over server-sent events from /api/chat and /api/image.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let info = null;

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

// POST a JSON body and call onEvent for each `data:` event; a silent server gets a clear message.
async function stream(url, body, onEvent, timeoutMs = 180000) {
  const controller = new AbortController();
  let timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(url, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const detail = await response.text();
      throw new Error(`the UI server answered HTTP ${response.status}: ${detail.slice(0, 300)}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      clearTimeout(timer);
      timer = setTimeout(() => controller.abort(), timeoutMs);
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (chunk.startsWith("data: ")) onEvent(JSON.parse(chunk.slice(6)));
      }
    }
  } catch (err) {
    const message = err.name === "AbortError"
      ? `no answer for ${timeoutMs / 1000} s: the body server may be down or overloaded`
      : `lost the UI server: ${err.message}`;
    onEvent({type: "error", message});
  } finally {
    clearTimeout(timer);
  }
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

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function number(id) {
  const raw = $(id).value;
  return raw === "" ? null : Number(raw);
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  showError("");
  $("chat-input").value = "";
  $("send").disabled = true;
  history.push({role: "user", content: text});
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.id = "answer";
  document.querySelectorAll(".msg.assistant").forEach((m) => { if (m !== answer) m.removeAttribute("id"); });
  answer.dataset.state = "streaming";
  const request = {
    messages: history, max_new_tokens: number("max-new-tokens") || 64, temperature: number("temperature") || 0,
    top_p: number("top-p") || 1, top_k: number("top-k") || 0, seed: number("seed"),
  };
  await stream("/api/chat", request, (ev) => {
    if (ev.type === "token") {
      answer.textContent += ev.text;
    } else if (ev.type === "done") {
      answer.textContent = ev.text;
      answer.dataset.state = "done";
      history.push({role: "assistant", content: ev.text});
      showStats(ev);
    } else if (ev.type === "error") {
      answer.dataset.state = "error";
      answer.textContent = answer.textContent || "(no answer)";
      history.pop();
      showError(ev.message);
    }
  });
  if (answer.dataset.state === "streaming") answer.dataset.state = "error";
  $("send").disabled = false;
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
  drawHeatmap(ev.saw);
  $("kept").innerHTML = "";
  ev.kept_tokens.forEach((tok) => {
    const li = document.createElement("li");
    li.textContent = JSON.stringify(tok);
    $("kept").appendChild(li);
  });
}

async function makeImage(event) {
  event.preventDefault();
  showError("");
  $("image-go").disabled = true;
  $("image-state").textContent = "starting";
  $("image-state").dataset.state = "running";
  const request = {
    prompt: $("image-prompt").value, steps: number("image-steps") || 12, seed: number("image-seed") || 0,
    guidance: number("image-guidance") ?? 5, mode: $("image-mode").value, k: number("image-k") || 1,
  };
  await stream("/api/image", request, (ev) => {
    if (ev.type === "step") {
      $("image-state").textContent = `step ${ev.step} / ${ev.total}`;
      if (ev.preview) $("image-out").src = ev.preview;
      if (ev.tensor) $("image-tensor").src = ev.tensor;
    } else if (ev.type === "done") {
      $("image-out").src = ev.image;
      $("image-state").textContent = `done in ${ev.seconds.toFixed(1)} s (${ev.mode}): ${bytes(ev.bytes_to_cloud)} to the cloud, ${bytes(ev.bytes_from_cloud)} back`;
      $("image-state").dataset.state = "done";
    } else if (ev.type === "error") {
      $("image-state").textContent = "failed";
      $("image-state").dataset.state = "error";
      showError(ev.message);
    }
  }, 600000);
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
  $("clear").addEventListener("click", () => { history.length = 0; $("messages").innerHTML = ""; });
  $("image-form").addEventListener("submit", makeImage);
  try {
    info = await (await fetch("/api/info")).json();
  } catch (err) {
    showError(`cannot reach the UI server: ${err.message}`);
    return;
  }
  const s = info.split;
  $("model").textContent = `${info.model} · K=${s.head[1]}, M=${s.layers - s.tail[0]} of ${s.layers} layers`;
  $("where").textContent = info.server ? `body at ${info.server}` : "body in this process";
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
