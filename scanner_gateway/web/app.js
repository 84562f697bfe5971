// Pixel Agent scan terminal: choose a task, add photos, scan, read the typed result.
// Plain ES module, no build step, no CDN (stores are often offline).

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "scanner-api-key";
const TASK_STORAGE = "scanner-task"; // a store that scans price tags all day keeps that task
const DEFAULT_TASK = "product_scan";
const state = { tasks: [], files: [], history: [], busy: false };

function apiHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function text(tag, content, className) {
  const el = document.createElement(tag);
  if (content !== undefined && content !== null) el.textContent = String(content);
  if (className) el.className = className;
  return el;
}

function showError(message, code, hint) {
  const box = $("error");
  box.replaceChildren(text("strong", message));
  if (code) box.append(" ", text("code", `(${code})`));
  if (hint) box.append(text("p", hint));
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
}

async function readError(response) {
  let code = `http_${response.status}`;
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch { /* not JSON: keep the status */ }
  const retry = response.headers.get("Retry-After");
  const hints = {
    401: "This gateway needs an API key: open \u201cAPI key\u201d below the form.",
    408: "The upload stalled: check the connection and scan again.",
    413: "The photo is too large: send a smaller one (under 20 MB, 64 megapixels).",
    415: "That file is not a photo the scanner reads (JPEG, PNG, WebP, HEIC, AVIF, GIF, BMP, TIFF).",
    422: "The photo could not be read: it may be damaged or cut off.",
    429: `The scanner is busy. Try again in ${retry || "a few"} second(s).`,
    503: "No scan engine is available right now. Try again shortly.",
    504: "The scan took too long. Try again.",
  };
  return { code, message, hint: hints[response.status] };
}

async function loadTasks() {
  const response = await fetch("/v1/tasks", { headers: apiHeaders() });
  if (!response.ok) {
    const err = await readError(response);
    showError(err.message, err.code, err.hint);
    if (response.status === 401) $("key-box").open = true;
    return;
  }
  clearError();
  state.tasks = (await response.json()).data;
  const select = $("task");
  const previous = select.value;
  select.replaceChildren(...state.tasks.map((t) => {
    const option = text("option", t.name.replace(/_/g, " "));
    option.value = t.name;
    return option;
  }));
  // A link or bookmark may name the task (/?task=price_tags); else the last one used here.
  const wanted = [previous, new URLSearchParams(location.search).get("task"), rememberedTask(), DEFAULT_TASK];
  const chosen = wanted.find((name) => name && state.tasks.some((t) => t.name === name));
  if (chosen) select.value = chosen;
  describeTask();
}

function rememberedTask() {
  try { return localStorage.getItem(TASK_STORAGE); } catch { return null; } // storage off: no memory
}

function rememberTask() {
  try { localStorage.setItem(TASK_STORAGE, $("task").value); } catch { /* storage off: no memory */ }
}

function describeTask() {
  const task = state.tasks.find((t) => t.name === $("task").value);
  $("task-help").textContent = task ? `${task.description} (up to ${task.max_images} photo(s))` : "";
  updateButton();
}

function updateButton() {
  $("scan-button").disabled = state.busy || state.files.length === 0 || !$("task").value;
}

// The gateway's own sizing rule (scan/images.py target_size): the largest size in whole
// 32 px tiles within the task's pixel budget, aspect kept. A photo shrunk here to exactly
// that size is passed on by the gateway byte for byte, so a 12 MP phone photo costs
// ~150 KB of a store's mobile data instead of several MB.
const TILE = 32;

function targetSize(width, height, budget) {
  const factor = Math.sqrt(budget.max_pixels / (width * height));
  let w = Math.max(TILE, Math.round((width * factor) / TILE) * TILE);
  let h = Math.max(TILE, Math.round((height * factor) / TILE) * TILE);
  while (w * h > budget.max_pixels && (w > TILE || h > TILE)) {
    if (w >= h && w > TILE) w -= TILE; else if (h > TILE) h -= TILE; else w -= TILE;
  }
  return [w, h];
}

async function shrink(file, budget) {
  // The photo at the task's size as a JPEG, or the file itself: when shrinking is off, when
  // it is within the budget already, or when this browser cannot decode it (HEIC outside
  // Safari): the gateway then does the work.
  if (!budget || !$("shrink").checked) return file;
  try {
    return await shrunkCopy(file, budget);
  } catch {
    return file;
  }
}

async function shrunkCopy(file, budget) {
  const bitmap = await createImageBitmap(file);  // EXIF orientation applied, as the gateway does
  try {
    if (bitmap.width * bitmap.height <= budget.max_pixels) return file;
    const [w, h] = targetSize(bitmap.width, bitmap.height, budget);
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";  // transparency on white, as the gateway flattens it
    ctx.fillRect(0, 0, w, h);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, w, h);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    if (!blob || blob.size >= file.size) return file;
    return new File([blob], file.name.replace(/\.[^./]*$/, "") + ".jpg", { type: "image/jpeg" });
  } finally {
    bitmap.close();
  }
}

function kilobytes(bytes) {
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MB` : `${Math.round(bytes / 1024)} KB`;
}

function setFiles(fileList) {
  state.files = Array.from(fileList);
  $("chosen").replaceChildren(...state.files.map((f) => text("li", `${f.name} (${Math.round(f.size / 1024)} KB)`)));
  updateButton();
}

function label(item) {
  for (const key of ["name", "product_text", "product", "shop_name", "rule", "description", "type", "kind"]) {
    if (typeof item[key] === "string" && item[key]) return item[key];
  }
  const first = Object.values(item).find((v) => typeof v === "string" && v);
  return first || "";
}

function located(result) {
  // Every object with a pixel box, wherever it sits in the result.
  const found = [];
  const walk = (value) => {
    if (Array.isArray(value)) value.forEach(walk);
    else if (value && typeof value === "object") {
      if (value.box && typeof value.box.x1 === "number") found.push(value);
      Object.values(value).forEach(walk);
    }
  };
  walk(result);
  return found;
}

function renderPhotos(scan, urls) {
  const wrap = $("photo-wrap");
  wrap.replaceChildren();
  scan.images.forEach((info, index) => {
    const frame = text("div", undefined, "photo");
    const img = document.createElement("img");
    img.src = urls[index];
    img.alt = `Photo ${index + 1} of ${scan.images.length} with ${scan.task.replace(/_/g, " ")} results marked`;
    // Browsers other than Safari cannot show HEIC: keep the boxes on a blank frame of the photo's shape.
    img.addEventListener("error", () => {
      const blank = text("div", `This browser cannot show ${info.format} photos; the boxes are on a blank frame.`, "photo-blank");
      blank.style.aspectRatio = `${info.width} / ${info.height}`;
      img.replaceWith(blank);
    });
    frame.append(img);
    for (const item of located(scan.result).filter((it) => (it.image || 0) === index)) {
      const { x1, y1, x2, y2 } = item.box;
      const box = text("div", undefined, "bbox");
      // Percentages of the original size: right at any displayed size.
      Object.assign(box.style, {
        left: `${(100 * x1) / info.width}%`, top: `${(100 * y1) / info.height}%`,
        width: `${(100 * (x2 - x1)) / info.width}%`, height: `${(100 * (y2 - y1)) / info.height}%`,
      });
      box.title = label(item);
      box.append(text("span", label(item)));
      frame.append(box);
    }
    wrap.append(frame);
  });
  wrap.hidden = scan.images.length === 0;
}

function cell(value) {
  if (value === null || value === undefined) return "\u2014";
  if (typeof value === "object" && typeof value.x1 === "number") return `${value.x1},${value.y1} \u2192 ${value.x2},${value.y2}`;
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function table(rows) {
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  columns.forEach((c) => head.append(text("th", c.replace(/_/g, " "))));
  const body = t.createTBody();
  rows.forEach((r) => {
    const tr = body.insertRow();
    columns.forEach((c) => tr.append(text("td", cell(r[c]))));
  });
  const wrap = text("div", undefined, "table-wrap");
  wrap.append(t);
  return wrap;
}

function renderResult(scan) {
  const out = $("result");
  out.replaceChildren();
  const facts = document.createElement("dl");
  const fact = (k, v) => facts.append(text("dt", k), text("dd", v));
  for (const [key, value] of Object.entries(scan.result)) {
    if (Array.isArray(value) && value.length && typeof value[0] === "object") {
      out.append(text("h3", `${key.replace(/_/g, " ")} (${value.length})`), table(value));
    } else if (Array.isArray(value)) {
      fact(key.replace(/_/g, " "), value.length ? value.map(cell).join(", ") : "none");
    } else {
      fact(key.replace(/_/g, " "), cell(value));
    }
  }
  out.prepend(facts);
  if (scan.warnings.length) {
    const list = text("ul", undefined, "warnings");
    scan.warnings.forEach((w) => list.append(text("li", w)));
    out.append(text("h3", "Warnings"), list);
  }
  const t = scan.timings_ms;
  out.append(text("p", `Timings: preprocess ${t.preprocess} ms \u00b7 engine ${t.engine} ms \u00b7 total ${t.total} ms \u00b7 model ${scan.model}`, "help"));
}

function show(entry) {
  clearError();
  renderPhotos(entry.scan, entry.urls);
  renderResult(entry.scan);
  const shrunk = entry.sentBytes < entry.originalBytes ? ` (shrunk here from ${kilobytes(entry.originalBytes)})` : "";
  $("status").textContent = `${entry.scan.task.replace(/_/g, " ")}: done at ${entry.time}; sent ${kilobytes(entry.sentBytes)}${shrunk}.`;
}

function addHistory(entry) {
  state.history.unshift(entry);
  const item = document.createElement("li");
  const button = text("button", `${entry.time} \u00b7 ${entry.scan.task.replace(/_/g, " ")} \u00b7 ${entry.names}`);
  button.type = "button";
  button.addEventListener("click", () => show(entry));
  item.append(button);
  $("history").prepend(item);
}

async function scan(event) {
  event.preventDefault();
  if (state.busy || !state.files.length) return;
  clearError();
  state.busy = true;
  updateButton();
  $("status").textContent = "Preparing photos\u2026";
  const task = state.tasks.find((t) => t.name === $("task").value);
  const sent = await Promise.all(state.files.map((f) => shrink(f, task && task.pixel_budget)));
  const form = new FormData();
  form.append("task", $("task").value);
  if ($("locale").value) form.append("locale", $("locale").value);
  sent.forEach((f) => form.append("image", f, f.name));
  const started = performance.now();
  const tick = setInterval(() => {
    $("status").textContent = `Scanning\u2026 ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  try {
    const response = await fetch("/v1/scan", { method: "POST", body: form, headers: apiHeaders() });
    if (!response.ok) {
      const err = await readError(response);
      showError(err.message, err.code, err.hint);
      $("status").textContent = "Scan failed.";
      if (response.status === 401) $("key-box").open = true;
      return;
    }
    const result = await response.json();
    const size = (files) => files.reduce((total, f) => total + f.size, 0);
    const entry = {
      // The photos as sent: the boxes are in their pixels.
      scan: result, urls: sent.map((f) => URL.createObjectURL(f)),
      time: new Date().toLocaleTimeString(), names: state.files.map((f) => f.name).join(", "),
      sentBytes: size(sent), originalBytes: size(state.files),
    };
    addHistory(entry);
    show(entry);
  } catch (err) {
    showError("The gateway could not be reached.", "network_error", String(err));
    $("status").textContent = "Scan failed.";
  } finally {
    clearInterval(tick);
    state.busy = false;
    updateButton();
  }
}

async function download(fileId, name) {
  const response = await fetch(`/v1/files/${encodeURIComponent(fileId)}/content`, { headers: apiHeaders() });
  if (!response.ok) {
    const { code, message, hint } = await readError(response);
    showError(message, code, hint);
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = name;
  link.click();
  URL.revokeObjectURL(link.href);
}

async function loadBatches() {
  const list = $("batches");
  const response = await fetch("/v1/batches?limit=20", { headers: apiHeaders() });
  if (!response.ok) { list.replaceChildren(text("li", "Batches need a valid key.")); return; }
  const batches = (await response.json()).data;
  list.replaceChildren(...(batches.length ? [] : [text("li", "No batches yet.")]));
  for (const batch of batches) {
    const counts = batch.request_counts;
    const item = text("li", `${batch.id} (${batch.endpoint}): ${batch.status}, ${counts.completed} done, ` +
      `${counts.failed} failed of ${counts.total}, created ${new Date(batch.created_at * 1000).toLocaleString()}`);
    item.className = "batch";
    for (const [fileId, name] of [[batch.output_file_id, "output"], [batch.error_file_id, "errors"]]) {
      if (!fileId) continue;
      const button = text("button", name, "button");
      button.type = "button";
      button.addEventListener("click", () => download(fileId, `${batch.id}_${name}.jsonl`));
      item.append(" ", button);
    }
    list.append(item);
  }
}

function setup() {
  $("task").addEventListener("change", () => { rememberTask(); describeTask(); });
  $("photos").addEventListener("change", (e) => setFiles(e.target.files));
  $("camera").addEventListener("change", (e) => setFiles(e.target.files));
  $("scan-form").addEventListener("submit", scan);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setFiles(e.dataTransfer.files); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("photos").click(); } });
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("save-key").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    loadTasks();
    loadBatches();
  });
  $("refresh-batches").addEventListener("click", loadBatches);
  loadTasks();
  loadBatches();
}

setup();
