// optictx web page: upload an image or PDF to /v1/ocr (stream=true), show the text as it is decoded,
// draw the layout boxes over the page and show the token budget. Plain browser JS, no build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = { options: null, file: null, fileUrl: null, pages: [] };
const KEY_STORE = "optictx-api-key";

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : `HTTP ${resp.status}`;
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

// ---------------------------------------------------------------- options (modes, prompts, limits)
async function loadOptions() {
  const resp = await fetch("/v1/options", { headers: authHeaders() });
  if (resp.status === 401) {
    $("#key-box").hidden = false;
    $("#model").textContent = "this server needs an API key";
    return;
  }
  if (!resp.ok) { setStatus(await errorMessage(resp), true); return; }
  const o = state.options = await resp.json();
  $("#key-box").hidden = !o.auth_required;
  $("#model").textContent = `${o.model} · ${o.backend} backend · up to ${o.limits.max_pages} PDF pages`;
  // reloading the options (a new key) keeps what the user already chose
  fillSelect($("#mode"), o.modes.map((m) => [m, m]), $("#mode").value || o.default_mode);
  fillSelect($("#prompt"), Object.keys(o.prompts).filter((p) => p !== "locate").map((p) => [p, p]),
    $("#prompt").value || o.default_prompt);
  if (!$("#max-tokens").value) $("#max-tokens").value = o.default_max_new_tokens;
  $("#max-tokens").max = o.limits.max_new_tokens;
  showPromptText();
  updateRunButton();
}

function fillSelect(select, items, chosen) {
  select.replaceChildren(...items.map(([value, label]) => {
    const opt = new Option(label, value);
    opt.selected = value === chosen;
    return opt;
  }));
}

function showPromptText() {
  const o = state.options;
  if (o) $("#prompt-text").textContent = (o.prompts[$("#prompt").value] || "").replace("\n", " ⏎ ");
}

function updateRunButton() {
  $("#run").disabled = !(state.options && state.file);
}

// ---------------------------------------------------------------- file choice
function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.fileUrl = isPdf(file) ? null : URL.createObjectURL(file);
  $("#file-name").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KiB)`;
  updateRunButton();
}

function isPdf(file) {
  return file.type === "application/pdf" || file.name.toLowerCase().endsWith(".pdf");
}

function wireDropZone() {
  const drop = $("#drop");
  const input = $("#file");
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => chooseFile(input.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    chooseFile(e.dataTransfer.files[0]);
  });
}

// ---------------------------------------------------------------- reading (SSE over fetch)
async function run() {
  const results = $("#results");
  results.replaceChildren();
  results.dataset.state = "running";
  state.pages = [];
  $("#run").disabled = true;
  setStatus("uploading…");
  const form = new FormData();
  form.append("file", state.file, state.file.name);
  form.append("mode", $("#mode").value);
  form.append("prompt", $("#prompt").value);
  if ($("#max-tokens").value) form.append("max_new_tokens", $("#max-tokens").value);
  form.append("stream", "true");
  form.append("return_images", "true");
  try {
    const resp = await fetch("/v1/ocr", { method: "POST", body: form, headers: authHeaders() });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readEvents(resp.body, handleEvent);
    if (results.dataset.state === "running") results.dataset.state = "done";
  } catch (err) {
    results.dataset.state = "error";
    setStatus(err.message, true);
  } finally {
    updateRunButton();
  }
}

async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data && data !== "[DONE]") onEvent(JSON.parse(data));
    }
  }
}

function handleEvent(ev) {
  switch (ev.type) {
    case "start":
      setStatus(`reading ${ev.pages} page(s) with ${ev.model}…`);
      break;
    case "page_start":
      startPage(ev);
      break;
    case "delta": {
      const page = state.pages[ev.index];
      const pre = $(".stream", page.el);
      page.streamed += ev.text;
      pre.textContent = page.streamed;
      pre.dataset.deltas = String(++page.deltas);
      pre.scrollTop = pre.scrollHeight;
      break;
    }
    case "page":
      finishPage(ev.index, ev.result);
      break;
    case "done":
      setStatus(`done: ${ev.usage.completion_tokens} tokens generated`);
      $("#results").dataset.state = "done";
      break;
    case "error":
      $("#results").dataset.state = "error";
      setStatus(ev.error.message, true);
      break;
  }
}

function startPage(ev) {
  const el = $("#page-template").content.firstElementChild.cloneNode(true);
  el.id = `page-${ev.index}`;
  el.dataset.state = "running";
  $(".stream", el).id = `stream-${ev.index}`;
  const where = ev.page ? `page ${ev.page}` : state.file.name;
  $(".page-title", el).textContent = `${where} · ${ev.width}×${ev.height}px · mode ${ev.mode}`;
  setField(el, "vision", ev.budget.vision_tokens);
  setField(el, "slots", ev.budget.decoder_slots);
  $("#results").append(el);
  const page = { el, image: null, blocks: [], streamed: "", deltas: 0 };
  state.pages[ev.index] = page;
  const src = ev.image || state.fileUrl;
  if (src) {
    const img = new Image();
    img.onload = () => { page.image = img; draw(page); };
    img.src = src;
  }
}

function finishPage(index, r) {
  const page = state.pages[index];
  const el = page.el;
  // the deltas joined are the final text; if a delta was lost, show the final text and say so
  el.dataset.streamComplete = String(page.streamed === r.raw);
  if (page.streamed !== r.raw) $(".stream", el).textContent = r.raw;
  $(".markdown", el).replaceChildren(renderMarkdown(r.markdown));
  setField(el, "vision", r.tokens.vision);
  setField(el, "slots", r.tokens.decoder_slots);
  setField(el, "text", r.tokens.text ?? "n/a");
  setField(el, "compression", r.tokens.compression == null ? "n/a" : `${r.tokens.compression}×`);
  setField(el, "output", r.tokens.output);
  setField(el, "finish", r.finish_reason);
  setField(el, "time", `${r.timings.total_s.toFixed(2)} s`);
  page.blocks = r.blocks;
  el.dataset.state = "done";
  draw(page);
}

function setField(el, name, value) {
  $(`[data-field="${name}"]`, el).textContent = String(value);
}

// ---------------------------------------------------------------- page + boxes
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

function colorFor(label) {
  let h = 0;
  for (const c of label) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return COLORS[h % COLORS.length];
}

function draw(page) {
  if (!page.image) return;
  const canvas = $(".canvas", page.el);
  const scale = Math.min(1, 900 / page.image.naturalWidth);
  canvas.width = Math.round(page.image.naturalWidth * scale);
  canvas.height = Math.round(page.image.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(page.image, 0, 0, canvas.width, canvas.height);
  ctx.font = "12px system-ui, sans-serif";
  let n = 0;
  for (const block of page.blocks) {
    const color = colorFor(block.label);
    for (const [x1, y1, x2, y2] of block.boxes_999) {  // 0-999 relative to the original page
      const x = (x1 / 999) * canvas.width, y = (y1 / 999) * canvas.height;
      const w = ((x2 - x1) / 999) * canvas.width, h = ((y2 - y1) / 999) * canvas.height;
      ctx.strokeStyle = color;
      ctx.lineWidth = block.label === "title" ? 3 : 1.5;
      ctx.globalAlpha = 0.12;
      ctx.fillStyle = color;
      ctx.fillRect(x, y, w, h);
      ctx.globalAlpha = 1;
      ctx.strokeRect(x, y, w, h);
      ctx.fillText(block.label, x + 2, Math.max(11, y - 2));
      n += 1;
    }
  }
  canvas.dataset.boxes = String(n);
}

// ---------------------------------------------------------------- a small, safe markdown renderer
// Everything is inserted as text nodes, so model output (HTML tables included) can never run as markup.
function renderMarkdown(md) {
  const root = document.createElement("div");
  const lines = md.split("\n");
  let para = [], list = null, code = null;
  const flush = () => {
    if (para.length) root.append(inline(document.createElement("p"), para.join(" ")));
    para = [];
  };
  for (const line of lines) {
    if (code) {
      if (line.startsWith("```")) { root.append(code); code = null; } else code.textContent += line + "\n";
      continue;
    }
    if (line.startsWith("```")) { flush(); list = null; code = document.createElement("pre"); continue; }
    const h = /^(#{1,6})\s+(.*)$/.exec(line);
    const li = /^\s*(?:[-*+]|\d+[.)])\s+(.*)$/.exec(line);
    if (h) { flush(); list = null; root.append(inline(document.createElement(`h${Math.min(6, h[1].length + 2)}`), h[2])); }
    else if (li) {
      flush();
      if (!list) { list = document.createElement("ul"); root.append(list); }
      list.append(inline(document.createElement("li"), li[1]));
    } else if (!line.trim()) { flush(); list = null; }
    else { list = null; para.push(line); }
  }
  flush();
  if (code) root.append(code);
  return root;
}

function inline(el, text) {
  // **bold** and `code`; the rest stays literal text
  for (const part of text.split(/(\*\*[^*]+\*\*|`[^`]+`)/)) {
    if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      const b = document.createElement("strong"); b.textContent = part.slice(2, -2); el.append(b);
    } else if (part.startsWith("`") && part.endsWith("`") && part.length > 2) {
      const c = document.createElement("code"); c.textContent = part.slice(1, -1); el.append(c);
    } else if (part) {
      el.append(document.createTextNode(part));
    }
  }
  return el;
}

// ---------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, key.value); loadOptions(); });
  $("#prompt").addEventListener("change", showPromptText);
  $("#run").addEventListener("click", run);
  wireDropZone();
  loadOptions().catch((err) => setStatus(`cannot reach the server: ${err.message}`, true));
});
