// cxrlabel web page: upload a film, show one bar per observation and a Grad-CAM heatmap.
// Plain JavaScript against the service's own JSON API; nothing is loaded from elsewhere.
"use strict";

const TOKEN_KEY = "cxrlabel-token";
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  result: null,
  filmFailed: false, // the browser could not show the file itself (DICOM)
  urls: {},
};
const $ = (id) => document.getElementById(id);

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), ...authHeaders() },
  });
  if (response.status === 401) {
    $("token-form").hidden = false;
  }
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${body.detail || response.statusText} (${response.status} ${body.error || ""})`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setObjectUrl(key, img, blob) {
  if (state.urls[key]) URL.revokeObjectURL(state.urls[key]);
  state.urls[key] = URL.createObjectURL(blob);
  img.src = state.urls[key];
  img.hidden = false;
}

function formatBytes(n) {
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(0)} kB`;
  return `${n} B`;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// ------------------------------------------------------------------------------------------
// Model

async function loadModel() {
  const response = await api("/model");
  if (!response.ok) {
    $("model-name").textContent = "model unavailable";
    if (response.status !== 401) showError(await errorText(response));
    return;
  }
  const info = await response.json();
  state.model = info;
  $("token-form").hidden = true;
  $("model-name").textContent = info.name;
  $("model-kind").textContent = info.kind;
  $("model-kind").hidden = false;
  const tta = info.tta > 1 ? ` · test-time augmentation over ${info.tta} transforms` : "";
  $("model-meta").textContent = `model ${info.id} · cxrlabel ${info.version}${tta}`;
  $("max-upload").textContent = formatBytes(info.max_upload_bytes);
  document.body.dataset.state = "ready";
}

// ------------------------------------------------------------------------------------------
// Upload and findings

async function labelFile(file) {
  showError("");
  document.body.dataset.state = "busy";
  $("busy").hidden = false;
  // The browser shows PNG and JPEG itself at once; DICOM is shown from the server's decoding.
  state.result = null;
  state.filmFailed = false;
  $("flags").hidden = true; // no stale warning while the next film is labelled
  setObjectUrl("film", $("film"), file);
  $("dropzone-empty").hidden = true;
  $("dropzone").classList.add("has-film");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await api("/predict?heatmaps=true", { method: "POST", body: form });
    if (!response.ok) {
      showError(`${file.name}: ${await errorText(response)}`);
      document.body.dataset.state = "error";
      return;
    }
    const result = await response.json();
    state.result = result;
    if (state.filmFailed) loadServerFilm(result);
    renderFileMeta(result);
    renderFlags(result);
    renderFindings(result);
    setupHeatmaps(result);
    document.body.dataset.state = "done";
  } catch (error) {
    showError(`${file.name}: the service did not answer (${error})`);
    document.body.dataset.state = "error";
  } finally {
    $("busy").hidden = true;
  }
}

function renderFileMeta(result) {
  const f = result.file;
  const rows = [
    ["file", f.name],
    ["format", `${f.format.toUpperCase()} · ${f.width} × ${f.height}`],
    ["size", formatBytes(f.bytes)],
    ["time", `${(result.timing_ms.read_and_decode + result.timing_ms.predict).toFixed(0)} ms`],
  ];
  const meta = $("file-meta");
  meta.replaceChildren();
  for (const [key, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    meta.append(dt, dd);
  }
}

function findingRow(r) {
  const li = document.createElement("li");
  li.className = `finding ${r.text}`;
  li.dataset.label = r.label;
  li.dataset.probability = String(r.probability);
  li.dataset.value = String(r.value);
  li.tabIndex = 0;
  li.title = `${r.label}: probability ${r.probability.toFixed(4)}, threshold ${r.threshold}`;

  const name = document.createElement("span");
  name.className = "finding-name";
  name.textContent = r.label;

  const track = document.createElement("div");
  track.className = "track";
  if (r.band) {
    const band = document.createElement("div");
    band.className = "band";
    band.style.left = percent(r.band[0]);
    band.style.width = percent(r.band[1] - r.band[0]);
    track.append(band);
  }
  const fill = document.createElement("div");
  fill.className = "fill";
  fill.style.width = percent(r.probability);
  const tick = document.createElement("div");
  tick.className = "tick";
  tick.style.left = percent(r.threshold);
  tick.title = `threshold ${r.threshold}`;
  track.append(fill, tick);

  const prob = document.createElement("span");
  prob.className = "finding-prob";
  prob.textContent = percent(r.probability);

  const chip = document.createElement("span");
  chip.className = `chip ${r.text}`;
  chip.textContent = r.text;

  li.append(name, track, prob, chip);
  li.addEventListener("click", () => chooseHeatmap(r.label));
  li.addEventListener("keydown", (event) => {
    if (event.key === "Enter") chooseHeatmap(r.label);
  });
  return li;
}

// The input checks' flags (cxrlabel.data.sanity), in words; thresholds from /model.
function flagText(flag) {
  const limits = (state.model && state.model.input_checks) || {};
  const [code, value] = flag.split(":");
  const words = {
    small: `smallest side under ${limits.min_side ?? "the minimum"} px`,
    aspect: `sides more than ${limits.max_aspect ?? "the maximum"}:1 (not a chest film's shape)`,
    colour: "a colour image, not a grey radiograph",
    constant: "nearly constant pixels (blank or binary)",
    modality: `DICOM Modality ${value}, not a radiograph (CR/DX)`,
    body_part: `DICOM body part ${value}, not the chest`,
  };
  return words[code] || flag;
}

function renderFlags(result) {
  const box = $("flags");
  const flags = result.flags || [];
  document.body.dataset.flags = flags.join(";");
  box.replaceChildren();
  box.hidden = flags.length === 0;
  if (!flags.length) return;
  const title = document.createElement("strong");
  title.textContent = "Check this film: the labels may not be trustworthy.";
  const list = document.createElement("ul");
  for (const flag of flags) {
    const li = document.createElement("li");
    li.dataset.flag = flag;
    li.textContent = flagText(flag);
    list.append(li);
  }
  box.append(title, list);
}

function renderFindings(result) {
  $("findings-empty").hidden = true;
  $("findings").replaceChildren(...result.results.map(findingRow));
  const t = result.thresholds;
  const how = t.rule === "fixed" ? "fixed thresholds" : `thresholds chosen by ${t.rule}`;
  const band = t.band ? "; shaded: uncertainty band" : "";
  $("thresholds-note").textContent = `Labels from ${how}${t.chosen_on ? ` on ${t.chosen_on}` : ""}` +
    `${band}. Model ${result.model.name} (${result.model.kind}).`;
}

// ------------------------------------------------------------------------------------------
// Heatmaps

async function loadServerFilm(result) {
  if (!result.heatmaps.film) return;
  const response = await api(result.heatmaps.film);
  if (response.ok) setObjectUrl("film", $("film"), await response.blob());
}

function setupHeatmaps(result) {
  const select = $("heatmap-label");
  const info = result.heatmaps;
  if (!info.available) {
    select.disabled = true;
    select.replaceChildren();
    $("heatmap").hidden = true;
    $("heatmap-caption").textContent = "";
    $("heatmap-note").textContent = `No heatmaps: ${info.reason || "not available"}.`;
    return;
  }
  select.replaceChildren(
    ...result.results.map((r) => {
      const option = document.createElement("option");
      option.value = r.label;
      option.textContent = `${r.label} · ${percent(r.probability)}`;
      return option;
    }),
  );
  select.disabled = false;
  // Start with the most probable finding other than "No Finding".
  const candidates = result.results.filter((r) => r.label !== "No Finding");
  const pool = candidates.length ? candidates : result.results;
  const top = pool.reduce((a, b) => (b.probability > a.probability ? b : a));
  chooseHeatmap(top.label);
}

async function chooseHeatmap(label) {
  const result = state.result;
  if (!result || !result.heatmaps.available) return;
  $("heatmap-label").value = label;
  for (const li of document.querySelectorAll(".finding")) {
    li.classList.toggle("selected", li.dataset.label === label);
  }
  $("heatmap-caption").textContent = `computing the heatmap for ${label}…`;
  const response = await api(result.heatmaps.links[label]);
  if (state.result !== result || $("heatmap-label").value !== label) return; // superseded
  if (!response.ok) {
    $("heatmap").hidden = true;
    $("heatmap-caption").textContent = "";
    $("heatmap-note").textContent = `No heatmap for ${label}: ${await errorText(response)}`;
    return;
  }
  setObjectUrl("heatmap", $("heatmap"), await response.blob());
  // Grad-CAM explains one forward pass: with TTA it is the untransformed film's.
  const noTta = state.model && state.model.tta > 1 ? " (without test-time augmentation)" : "";
  $("heatmap-caption").textContent = `${label}: Grad-CAM of the first checkpoint, on the ` +
    `film as the model sees it${noTta}.`;
  document.body.dataset.heatmap = label;
}

// ------------------------------------------------------------------------------------------
// Wiring

function setup() {
  const input = $("file-input");
  const zone = $("dropzone");
  $("choose").addEventListener("click", () => input.click());
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  input.addEventListener("change", () => {
    if (input.files.length) labelFile(input.files[0]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) labelFile(event.dataTransfer.files[0]);
  });
  // A film the browser cannot show itself (DICOM): show the server's decoding instead.
  $("film").addEventListener("error", () => {
    if (state.filmFailed) return; // the server's film failed too: keep the message
    state.filmFailed = true;
    if (state.result) loadServerFilm(state.result);
  });
  $("heatmap-label").addEventListener("change", (event) => chooseHeatmap(event.target.value));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    loadModel();
  });
  loadModel();
}

setup();
