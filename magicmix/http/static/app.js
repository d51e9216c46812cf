// MagicMix playground: plain JS over the public API, no build step, no network but this server.
"use strict";

const API = "/api/v1/enterprise/image_editing";
const KEY_STORE = "magicmix.key";
const MAX_UPLOAD_SIDE = 1024; // outputs are at most 1024 px, so bigger uploads only cost time
const MAX_SWEEP_CELLS = 64;
const POLL_MS = 700;

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const state = {
  image: null, // {value: what the API gets (URL or data URI), label: for captions}
  history: [],
  current: null, // the history or sweep entry shown in the result panel
  busy: false,
  toyDefaults: false, // the toy model's prompt and size were filled in once
};

class ApiError extends Error {}

// --- talking to the API -------------------------------------------------------------------

async function post(url, body) {
  let response;
  try {
    response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch {
    throw new ApiError("Could not reach the server. Is it still running?");
  }
  let data;
  try {
    data = await response.json();
  } catch {
    throw new ApiError(`The server answered HTTP ${response.status} without a JSON body.`);
  }
  return { status: response.status, data };
}

// The same origin serves the page and the API; fetch_result may name the public URL instead.
function sameOrigin(url) {
  return location.origin + new URL(url, location.href).pathname;
}

// POST magic_mix, wait out 429s, then poll fetch until the job is no longer processing.
async function mixOnce(body, onProgress) {
  let reply = await post(`${API}/magic_mix`, body);
  while (reply.status === 429) {
    const wait = Number(reply.data.retry_after) || 2;
    onProgress(`Server busy; retrying in ${wait} s`);
    await sleep(wait * 1000);
    reply = await post(`${API}/magic_mix`, body);
  }
  let data = reply.data;
  while (data.status === "processing") {
    onProgress(`Job ${data.id} is running${data.eta ? ` (about ${Math.round(data.eta)} s)` : ""}`);
    await sleep(POLL_MS);
    data = (await post(sameOrigin(data.fetch_result), { key: body.key })).data;
  }
  if (data.status !== "success") {
    throw new ApiError(data.message || `The job ended as "${data.status}".`);
  }
  return data;
}

// --- key and system details ---------------------------------------------------------------

function savedKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

async function checkKey() {
  const key = savedKey();
  const status = $("key-status");
  status.classList.remove("error-text");
  if (!key) {
    status.textContent = "No key saved yet.";
    return;
  }
  const { data } = await post(`${API}/system_details`, { key }).catch((err) => ({
    data: { status: "error", message: err.message },
  }));
  if (data.status !== "success") {
    status.textContent = `Key not accepted: ${data.message}`;
    status.classList.add("error-text");
    return;
  }
  status.textContent = "Key saved in this browser; the server accepted it.";
  $("system").textContent = `model ${data.model} · ${data.device} · ${data.dtype} · v${data.version}`;
  $("tiny-banner").hidden = !/tiny/i.test(data.model);
  const toy = data.model === "toy";
  $("toy-banner").hidden = !toy;
  if (toy && !state.toyDefaults) {
    // What the toy model can draw, unless the user already typed something of their own.
    state.toyDefaults = true;
    if ($("prompt").value === $("prompt").defaultValue) $("prompt").value = "a red circle";
    if ($("negative-prompt").value === $("negative-prompt").defaultValue) {
      $("negative-prompt").value = "";
    }
    $("size").value = "256x256";
  }
}

function setupKey() {
  $("key").value = savedKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("key").value.trim());
    checkKey();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    $("key").value = "";
    $("system").textContent = "";
    checkKey();
  });
  checkKey();
}

// --- the layout image ---------------------------------------------------------------------

function useImage(value, label) {
  state.image = { value, label };
  const preview = $("input-preview");
  preview.src = value;
  preview.alt = `Chosen layout image: ${label}`;
  preview.hidden = false;
  $("drop-text").textContent = `${label}. Drop or choose another to replace it.`;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// Scale big pictures down in the browser: smaller uploads, same result at output sizes.
async function loadFile(file) {
  if (!file.type.startsWith("image/")) {
    showError(`${file.name} is not an image.`);
    return;
  }
  const dataUrl = await readAsDataUrl(file);
  const img = new Image();
  img.src = dataUrl;
  try {
    await img.decode();
  } catch {
    showError(`This browser cannot decode ${file.name}; try a PNG or JPEG.`);
    return;
  }
  const scale = MAX_UPLOAD_SIDE / Math.max(img.naturalWidth, img.naturalHeight);
  if (scale >= 1) {
    useImage(dataUrl, file.name);
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  const type = file.type === "image/jpeg" ? "image/jpeg" : "image/png";
  useImage(canvas.toDataURL(type, 0.92), `${file.name} (scaled to ${canvas.width}×${canvas.height})`);
}

function setupImage() {
  const zone = $("drop-zone");
  $("image-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) {
      $("image-url").value = "";
      loadFile(file);
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const [file] = event.dataTransfer.files;
    const url = event.dataTransfer.getData("text/uri-list");
    if (file) {
      loadFile(file);
    } else if (url) {
      $("image-url").value = url;
      useImage(url, url);
    }
  });
  $("image-url").addEventListener("change", (event) => {
    const url = event.target.value.trim();
    if (url) useImage(url, url);
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) loadFile(file);
  });
}

// --- parameters ---------------------------------------------------------------------------

const SLIDERS = ["steps", "guidance", "kmin", "kmax", "mix-factor"];

function showSliderValues() {
  for (const id of SLIDERS) $(`${id}-value`).textContent = $(id).value;
}

function setupSliders() {
  for (const id of SLIDERS) $(id).addEventListener("input", showSliderValues);
  // kmin <= kmax always: moving one past the other pushes the other along.
  $("kmin").addEventListener("input", () => {
    if (Number($("kmin").value) > Number($("kmax").value)) $("kmax").value = $("kmin").value;
    showSliderValues();
  });
  $("kmax").addEventListener("input", () => {
    if (Number($("kmax").value) < Number($("kmin").value)) $("kmin").value = $("kmax").value;
    showSliderValues();
  });
  $("seed").addEventListener("input", () => {
    $("seed-lock").checked = $("seed").value !== "";
  });
  showSliderValues();
}

function requestBody() {
  const typed = $("key").value.trim();
  if (typed && typed !== savedKey()) {
    // Typed but not saved: a newcomer pressed Mix straight away; keep it as if saved.
    localStorage.setItem(KEY_STORE, typed);
    checkKey();
  }
  const key = savedKey();
  if (!key) return invalid("Enter your API key in step 1 and press Save key.", "key");
  if (!state.image) return invalid("Pick, drop or paste a layout image first.", "image-file");
  const prompt = $("prompt").value.trim();
  if (!prompt) return invalid("Type a prompt: what the image should become.", "prompt");
  let seed = null;
  if ($("seed-lock").checked) {
    seed = Number($("seed").value);
    if (!Number.isSafeInteger(seed) || seed < 0) {
      return invalid("The seed must be a whole number of 0 or more.", "seed");
    }
  }
  const [width, height] = $("size").value.split("x").map(Number);
  return {
    key,
    prompt,
    negative_prompt: $("negative-prompt").value,
    image: state.image.value,
    width,
    height,
    kmin: Number($("kmin").value),
    kmax: Number($("kmax").value),
    mix_factor: Number($("mix-factor").value),
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    seed,
    samples: 1,
  };
}

function invalid(message, focusId) {
  showError(message);
  $(focusId).focus();
  return null;
}

function loadParams(body) {
  $("prompt").value = body.prompt;
  $("negative-prompt").value = body.negative_prompt;
  $("size").value = `${body.width}x${body.height}`;
  $("kmin").value = body.kmin;
  $("kmax").value = body.kmax;
  $("mix-factor").value = body.mix_factor;
  $("steps").value = body.steps;
  $("guidance").value = body.guidance_scale;
  $("seed").value = body.seed;
  $("seed-lock").checked = true;
  showSliderValues();
}

function describe(body) {
  return (
    `kmin ${body.kmin} · kmax ${body.kmax} · mix_factor ${body.mix_factor} · ` +
    `${body.steps} steps · guidance ${body.guidance_scale} · seed ${body.seed} · ` +
    `${body.width}×${body.height}`
  );
}

// --- running ------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Disable the run buttons and show an elapsed-time progress line until `work` settles;
// `work` may return a summary for the final status line.
async function whileBusy(work) {
  if (state.busy) return;
  state.busy = true;
  showError("");
  $("run").disabled = $("run-sweep").disabled = true;
  $("progress").hidden = false;
  $("progress").removeAttribute("value");
  const started = performance.now();
  let note = "Sending the request";
  const tick = () => {
    $("run-status").textContent = `${note}… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  };
  const timer = setInterval(tick, 200);
  try {
    const summary = await work((message) => {
      note = message;
      tick();
    });
    const took = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
    $("run-status").textContent = summary ? `${took}: ${summary}.` : `${took}.`;
  } catch (err) {
    showError(err.message);
    $("run-status").textContent = "";
  } finally {
    clearInterval(timer);
    $("progress").hidden = true;
    $("run").disabled = $("run-sweep").disabled = false;
    state.busy = false;
  }
}

async function runMix() {
  const body = requestBody();
  if (!body) return;
  await whileBusy(async (progress) => {
    const data = await mixOnce(body, progress);
    const entry = { body: { ...body, seed: data.meta.seed }, output: data.output[0], id: data.id };
    if (!$("seed-lock").checked) $("seed").value = data.meta.seed;
    state.history.unshift(entry);
    renderHistory();
    showEntry(entry);
  });
}

function showEntry(entry) {
  const input = $("result-input");
  const output = $("result-output");
  input.src = entry.body.image;
  input.hidden = false;
  output.src = entry.output;
  output.alt = `Mixed image for "${entry.body.prompt}"`;
  output.hidden = false;
  $("result-caption").textContent = `"${entry.body.prompt}": ${describe(entry.body)}`;
  $("copy-row").hidden = false;
  $("snippet").hidden = true;
  state.current = entry;
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren(
    ...state.history.map((entry) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "history-item";
      const thumb = document.createElement("img");
      thumb.src = entry.output;
      thumb.alt = "";
      const text = document.createElement("span");
      text.textContent = `#${entry.id} "${entry.body.prompt}" ${describe(entry.body)}`;
      button.append(thumb, text);
      button.addEventListener("click", () => {
        showEntry(entry);
        loadParams(entry.body);
      });
      item.append(button);
      return item;
    }),
  );
}

// --- sweep --------------------------------------------------------------------------------

function parseList(id, name) {
  const parts = $(id).value.split(",").map((part) => part.trim());
  const values = parts.map(Number);
  if (parts.some((part) => part === "") || values.some((v) => !(v >= 0 && v <= 1))) {
    throw new ApiError(`${name}: give comma-separated numbers from 0 to 1, like "0.2, 0.3".`);
  }
  return [...new Set(values)];
}

function sweepPlan() {
  const kmins = parseList("sweep-kmin", "kmin values");
  const kmaxs = parseList("sweep-kmax", "kmax values");
  const mixes = parseList("sweep-mix", "mix_factor values");
  const rows = kmins.flatMap((kmin) => kmaxs.map((kmax) => [kmin, kmax]));
  const runnable = rows.filter(([kmin, kmax]) => kmin <= kmax);
  if (!runnable.length) throw new ApiError("Every kmin is above every kmax: nothing to run.");
  if (runnable.length * mixes.length > MAX_SWEEP_CELLS) {
    throw new ApiError(`That is over ${MAX_SWEEP_CELLS} images; shorten a list.`);
  }
  return { rows: runnable, mixes, skipped: rows.length - runnable.length };
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

// The grid as a table: mix_factor across, (kmin, kmax) down, one cell per request.
function sweepTable(plan) {
  const table = $("sweep-table");
  const head = document.createElement("tr");
  const corner = document.createElement("th");
  corner.textContent = "kmin, kmax ↓ / mix_factor →";
  head.append(corner);
  for (const mix of plan.mixes) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = mix;
    head.append(th);
  }
  const cells = [];
  const rows = plan.rows.map(([kmin, kmax]) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = `kmin ${kmin}, kmax ${kmax}`;
    tr.append(th);
    for (const mix of plan.mixes) {
      const td = document.createElement("td");
      td.textContent = "waiting";
      tr.append(td);
      cells.push({ td, kmin, kmax, mix_factor: mix });
    }
    return tr;
  });
  table.replaceChildren(head, ...rows);
  $("sweep-result").hidden = false;
  return cells;
}

async function runSweep() {
  const base = requestBody();
  if (!base) return;
  let plan;
  try {
    plan = sweepPlan();
  } catch (err) {
    showError(err.message);
    return;
  }
  if (base.seed === null) {
    base.seed = randomSeed();
    $("seed").value = base.seed;
  }
  const cells = sweepTable(plan);
  await whileBusy(async (progress) => {
    let done = 0;
    const failures = [];
    const bar = $("progress");
    bar.max = cells.length;
    bar.value = 0;
    const skipped = plan.skipped ? `, ${plan.skipped} with kmin > kmax skipped` : "";
    progress(`0 of ${cells.length} done (seed ${base.seed}${skipped})`);
    // All at once: the server batches requests that share a schedule.
    await Promise.all(
      cells.map(async (cell) => {
        const body = { ...base, kmin: cell.kmin, kmax: cell.kmax, mix_factor: cell.mix_factor };
        try {
          const data = await mixOnce(body, () => {});
          cell.td.replaceChildren(sweepCellButton({ body, output: data.output[0], id: data.id }));
        } catch (err) {
          cell.td.textContent = `error: ${err.message}`;
          failures.push(err.message);
        }
        bar.value = ++done;
        progress(`${done} of ${cells.length} done (seed ${base.seed}${skipped})`);
      }),
    );
    if (failures.length) throw new ApiError(`${failures.length} cells failed: ${failures[0]}`);
    return `${cells.length} images with seed ${base.seed}${skipped}`;
  });
}

function sweepCellButton(entry) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "sweep-cell";
  const img = document.createElement("img");
  img.src = entry.output;
  img.alt = `kmin ${entry.body.kmin}, kmax ${entry.body.kmax}, mix_factor ${entry.body.mix_factor}`;
  button.append(img);
  button.addEventListener("click", () => {
    showEntry(entry);
    loadParams(entry.body);
  });
  return button;
}

// --- copy as curl / Python ----------------------------------------------------------------

function curlFor(body) {
  const json = JSON.stringify(body).replaceAll("'", "'\\''");
  return (
    `curl -s -X POST '${location.origin}${API}/magic_mix' \\\n` +
    `  -H 'Content-Type: application/json' \\\n  -d '${json}'`
  );
}

// JSON values as Python literals (JSON string escapes are valid Python string escapes).
function pythonLiteral(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value !== "object") return JSON.stringify(value);
  const inner = `${indent}    `;
  const items = Object.entries(value).map(
    ([k, v]) => `${inner}${JSON.stringify(k)}: ${pythonLiteral(v, inner)},`,
  );
  return `{\n${items.join("\n")}\n${indent}}`;
}

function pythonFor(body) {
  return [
    "import time",
    "",
    "import requests",
    "",
    `URL = "${location.origin}${API}/magic_mix"`,
    `body = ${pythonLiteral(body)}`,
    "reply = requests.post(URL, json=body, timeout=300).json()",
    'while reply["status"] == "processing":',
    "    time.sleep(1)",
    '    reply = requests.post(reply["fetch_result"], json={"key": body["key"]}, timeout=60).json()',
    "print(reply)",
  ].join("\n");
}

async function copySnippet(text, what) {
  const area = $("snippet");
  area.value = text;
  area.hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    $("run-status").textContent = `Copied as ${what}.`;
  } catch {
    area.focus();
    area.select();
    $("run-status").textContent = `Select the ${what} below and copy it.`;
  }
}

// --- tabs ---------------------------------------------------------------------------------

function setupTabs() {
  const tabs = [$("tab-mix"), $("tab-sweep")];
  const select = (chosen) => {
    for (const tab of tabs) {
      const selected = tab === chosen;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(tab.getAttribute("aria-controls")).hidden = !selected;
    }
    chosen.focus();
  };
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -index, End: tabs.length - 1 - index };
      if (event.key in moves) {
        event.preventDefault();
        select(tabs[(index + moves[event.key] + tabs.length) % tabs.length]);
      }
    });
  });
}

function setup() {
  setupKey();
  setupImage();
  setupSliders();
  setupTabs();
  $("run").addEventListener("click", runMix);
  $("run-sweep").addEventListener("click", runSweep);
  for (const id of ["prompt", "negative-prompt"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      ($("pane-mix").hidden ? runSweep : runMix)();
    });
  }
  $("copy-curl").addEventListener("click", () => copySnippet(curlFor(state.current.body), "curl"));
  $("copy-python").addEventListener("click", () =>
    copySnippet(pythonFor(state.current.body), "Python"),
  );
}

setup();
