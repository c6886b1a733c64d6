// cnnserve demo page: classify an image with POST /v1/classify and show the model card.
// No framework and no build step; every request goes to this origin, with
// "Authorization: Bearer <key>" once a key is entered. Text from the server is only
// ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = [["decode", "decode"], ["queue_wait", "queue"], ["inference", "inference"],
  ["encode", "encode"]];
const KEY_STORE = "cnnserve-demo-api-key";

const state = { models: [], run: 0, errorFrom: null };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// --- talking to the server ---------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function api(url, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network", `could not reach the server (${err.message})`, null);
  }
  if (!response.ok) {
    let code = response.headers.get("X-Error-Code") || "error";
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      // TF Serving's routes answer {"error": "<message>"}, the others {"error": {code, message}}.
      if (body && typeof body.error === "string") message = body.error;
      else if (body && body.error) ({ code, message } = body.error);
    } catch (_) { /* not JSON: keep the status text */ }
    throw new ApiError(response.status, code, message, response.headers.get("Retry-After"));
  }
  return response;
}

async function apiJson(url) {
  return (await api(url)).json();
}

async function apiImage(url, img) {
  const blob = await (await api(url)).blob();
  img.src = URL.createObjectURL(blob);
  return blob;
}

// --- errors, as the API states them -------------------------------------------------

// What a person at the page can do about the errors an upload meets, in words of the
// page rather than the API's (those, for API clients, follow below it).
const IN_PLAIN_WORDS = {
  unsupported_media_type: "That file is not an image this service reads: choose a JPEG, PNG, WebP, BMP, GIF or TIFF file.",
  invalid_image: "That image could not be read: the file may be damaged or cut short. Try another file.",
  image_too_large: "That image has more pixels than this server accepts: choose a smaller one.",
  payload_too_large: "That file is larger than this server accepts: choose a smaller one.",
  overloaded: "The server is busy right now.",
};

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const status = err.status ? `${err.status} ` : "";
  if (IN_PLAIN_WORDS[err.code]) box.append(el("p", { class: "plain", text: IN_PLAIN_WORDS[err.code] }));
  box.append(el("p", {}, el("strong", { text: `${status}${err.code}` }), `: ${err.message}`));
  if (err.retryAfter !== null && err.retryAfter !== undefined) {
    box.append(el("p", { class: "retry", text: `The server asks to retry in ${err.retryAfter} s.` }));
  }
  if (err.status === 401 || err.status === 403) {
    box.append(el("p", { text: "Enter an API key below and try again." }));
    $("key-box").open = true;
    $("api-key").focus();
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
  state.errorFrom = null;
}

// ``from`` names what failed, so that a background refresh clears its own error only,
// never a classification's (a 503 and its Retry-After vanished within 2 s).
function report(err, from = "page") {
  if (err instanceof ApiError) showError(err);
  else showError(new ApiError(0, "page_error", String(err), null));
  state.errorFrom = from;
}

// --- models, versions, labels -------------------------------------------------------

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

// The version the server answers a request naming none: the one labelled stable when
// it is served, else the newest (docs/serving.md).
function defaultVersion(model) {
  const stable = model.labels.stable;
  return model.versions.includes(stable) ? stable : Math.max(...model.versions);
}

// The version a choice means: a number, a label's version, or the server's default.
function currentVersion() {
  const model = currentModel();
  const choice = $("version").value;
  if (!model || model.versions.length === 0) return null;
  if (choice.startsWith("v:")) return Number(choice.slice(2));
  if (choice.startsWith("l:")) return model.labels[choice.slice(2)];
  return defaultVersion(model);
}

// The versions that may answer the current choice: with a traffic split on, a request
// naming no version may go to canary.
function answeringVersions() {
  const model = currentModel();
  const versions = [currentVersion()];
  const canary = model && model.labels.canary;
  if ($("version").value === "" && model && model.versions.includes(canary)) versions.push(canary);
  return versions;
}

function fillVersions() {
  const model = currentModel();
  const select = $("version");
  const previous = select.value;
  let shown = "default";
  if (model && model.versions.length) {
    const which = model.versions.includes(model.labels.stable) ? "stable" : "newest";
    shown = `default: ${which} (version ${defaultVersion(model)})`;
  }
  select.replaceChildren(el("option", { value: "", text: shown }));
  if (model) {
    const numbers = el("optgroup", { label: "Versions" });
    for (const v of model.versions) numbers.append(el("option", { value: `v:${v}`, text: `version ${v}` }));
    select.append(numbers);
    const labels = Object.entries(model.labels);
    if (labels.length) {
      const group = el("optgroup", { label: "Labels" });
      for (const [name, v] of labels) group.append(el("option", { value: `l:${name}`, text: `${name} (version ${v})` }));
      select.append(group);
    }
  }
  // Keep the reader's choice when the list is refreshed; one that is gone means the default.
  select.value = previous;
  if (select.value !== previous) select.value = "";
  select.disabled = !model;
}

async function loadModels() {
  try {
    const answer = await apiJson("/demo/models");
    state.models = answer.models;
    const select = $("model");
    const previous = select.value;
    select.replaceChildren(...answer.models.map((m) => el("option", { value: m.name, text: m.name })));
    select.value = answer.models.some((m) => m.name === previous) ? previous : answer.default_model;
    select.disabled = false;
    $("docs-link").hidden = !answer.links.docs;
    if (answer.links.docs) $("docs-link").href = answer.links.docs;
    $("metrics-link").hidden = !answer.links.metrics;
    if (answer.links.metrics) $("metrics-link").href = answer.links.metrics;
    fillVersions();
    if (state.errorFrom === "models") clearError();
    await versionChanged();
    // A model still loading has no version yet: look again until every one has.
    if (answer.models.some((m) => m.versions.length === 0)) setTimeout(loadModels, 2000);
  } catch (err) {
    report(err, "models");
    if (err.retryAfter) setTimeout(loadModels, Number(err.retryAfter) * 1000);
  }
}

async function versionChanged() {
  await Promise.all([loadSamples(), loadDomainNote()]);
  if (!$("model-card").hidden) await showCard();
}

function versionPath() {
  const model = currentModel();
  const version = currentVersion();
  if (!model || version === null) return null;
  return `/demo/models/${encodeURIComponent(model.name)}/versions/${version}`;
}

// --- samples ------------------------------------------------------------------------

async function loadSamples() {
  const list = $("samples");
  const path = versionPath();
  list.replaceChildren();
  $("samples-box").hidden = true;
  if (!path) return;
  const { about, samples } = await apiJson(`${path}/samples`);
  for (const sample of samples) {
    const name = sample.label || sample.source;
    const img = el("img", { alt: "" });
    const button = el("button", { type: "button", "aria-label": `Sample: ${name} (${sample.source})` },
      img, el("span", { text: sample.label || "sample" }));
    button.addEventListener("click", async () => {
      try {
        const blob = await (await api(sample.url)).blob();
        await classify(blob, `${name} (${sample.source})`);
      } catch (err) { report(err); }
    });
    list.append(el("li", {}, button));
    apiImage(sample.url, img).catch(report);
  }
  $("samples-source").textContent = about;
  $("samples-box").hidden = samples.length === 0;
}

// --- classification ------------------------------------------------------------------

function showPreview(blob, name) {
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  img.alt = `Preview of ${name}`;
  img.hidden = false;
  $("preview-caption").textContent = `${name}, ${blob.type || "unknown type"}, ${blob.size} bytes`;
}

function parseServerTiming(header) {
  const stages = {};
  for (const part of (header || "").split(",")) {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && dur) stages[name] = Number(dur.slice(4));
  }
  return stages;
}

function showTiming(stages, roundTrip) {
  const list = $("timing");
  list.replaceChildren();
  for (const [key, name] of STAGES) {
    if (key in stages) list.append(el("div", {}, el("dt", { text: name }), el("dd", { text: `${stages[key].toFixed(2)} ms` })));
  }
  list.append(el("div", {}, el("dt", { text: "round trip" }), el("dd", { text: `${roundTrip.toFixed(1)} ms` })));
  list.hidden = false;
}

// Two decimals, never rounded to a certainty or to nothing the model did not say.
function scoreText(score) {
  if (score > 0 && score < 0.00005) return "<0.01%";
  if (score < 1 && score >= 0.99995) return ">99.99%";
  return `${(score * 100).toFixed(2)}%`;
}

function showPredictions(answer) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of answer.predictions) {
    const percent = scoreText(p.score);
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(100, p.score * 100))}%`;
    list.append(el("li", { class: "prediction" },
      el("span", { class: "name", text: p.label }),
      el("span", { class: "pct", text: percent }),
      el("span", { class: "bar", "aria-hidden": "true" }, fill)));
  }
  $("status").textContent = `${answer.model}, version ${answer.version}`;
}

async function classify(blob, name) {
  const run = ++state.run;
  showPreview(blob, name);
  clearError();
  $("predictions").replaceChildren();
  $("timing").hidden = true;
  $("status").textContent = "Classifying…";
  const params = new URLSearchParams();
  const model = currentModel();
  if (model) params.set("model", model.name);
  const choice = $("version").value;
  if (choice.startsWith("v:")) params.set("version", choice.slice(2));
  if (choice.startsWith("l:")) params.set("label", choice.slice(2));
  const started = performance.now();
  try {
    const response = await api(`/v1/classify?${params}`, {
      method: "POST",
      body: blob,
      headers: { "Content-Type": blob.type || "application/octet-stream" },
    });
    const answer = await response.json();
    if (run !== state.run) return; // a newer image was chosen meanwhile
    showPredictions(answer);
    showTiming(parseServerTiming(response.headers.get("Server-Timing")), performance.now() - started);
    // Another version answered than the page thinks the choice means: a version was
    // loaded or unloaded, or a label moved, since the list was read. Read it again.
    if (model && answer.model === model.name && !answeringVersions().includes(answer.version)) {
      loadModels().catch(report);
    }
  } catch (err) {
    if (run !== state.run) return;
    $("status").textContent = "";
    report(err);
  }
}

function classifyFile(file) {
  if (file) classify(file, file.name || "pasted image");
}

// --- model card ------------------------------------------------------------------------

const pct = (x, digits = 2) => (typeof x === "number" ? `${(x * 100).toFixed(digits)}%` : "—");
const num = (x) => (typeof x === "number" ? x.toLocaleString("en") : String(x));

function definitions(pairs) {
  const list = el("dl");
  for (const [name, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    list.append(el("dt", { text: name }), el("dd", { text: String(value) }));
  }
  return list;
}

function trainedOnFashionMnist(card) {
  return (card.training && card.training.dataset === "fashion_mnist") ||
    (card.dataset && card.dataset.source === "fashion_mnist");
}

const FASHION_NOTE = "This model was trained on Fashion-MNIST: small greyscale pictures of " +
  "one light garment, shoe or bag, centred on a dark background. Product photos on white " +
  "backgrounds, scenes and other objects are outside what it knows; it will still name one " +
  "of its ten classes, often with high confidence.";

async function loadDomainNote() {
  const path = versionPath();
  const note = $("domain-note");
  note.hidden = true;
  if (!path) return;
  const { card } = await apiJson(`${path}/card`);
  note.textContent = trainedOnFashionMnist(card) ? FASHION_NOTE : "";
  note.hidden = !note.textContent;
}

function cardSections(answer) {
  const card = answer.card;
  const parts = [];
  if (Object.keys(card).length === 0) {
    parts.push(el("p", { text: "This version has no model_card.json." }));
  }
  if (trainedOnFashionMnist(card)) parts.push(el("p", { class: "note", text: FASHION_NOTE }));
  if (answer.serving) {
    parts.push(el("h3", { text: "Served by" }), definitions([
      ["runtime", answer.serving.runtime], ["precision", answer.serving.precision],
    ]));
  }
  const arch = card.architecture;
  if (arch) {
    parts.push(el("h3", { text: "Architecture" }), definitions([
      ["name", arch.name], ["parameters", arch.parameters && num(arch.parameters)],
      ["input", arch.height && `${arch.height}×${arch.width} RGB, uint8`],
      ["classes", arch.num_classes], ["width multiplier", arch.width_multiplier],
      ["depth", arch.depth], ["squeeze-and-excitation", arch.squeeze_excite],
      ["dropout", arch.dropout],
    ]));
  }
  const data = card.dataset;
  const training = card.training;
  if (data || training) {
    parts.push(el("h3", { text: "Training data" }), definitions([
      ["dataset", (data && data.source) || (training && training.dataset)],
      ["train / validation / test", data && `${num(data.train)} / ${num(data.validation)} / ${num(data.test)}`],
      ["epochs", training && training.epochs_run],
      ["optimizer", training && `${training.optimizer}, lr ${training.learning_rate}, ${training.schedule} schedule`],
      ["batch size", training && training.batch_size],
      ["training time", training && training.seconds && `${num(Math.round(training.seconds))} s`],
    ]));
    if (card.command) parts.push(el("pre", {}, el("code", { text: card.command })));
  }
  const ev = card.evaluation;
  if (ev) {
    parts.push(el("h3", { text: "Evaluation" }), definitions([
      ["split", ev.split && `${ev.split} (${num(ev.examples)} images)`],
      ["accuracy", pct(ev.accuracy)], ["macro precision", pct(ev.macro_precision)],
      ["macro recall", pct(ev.macro_recall)], ["macro F1", pct(ev.macro_f1)],
      ["mAP", ev.mean_average_precision == null ? null : pct(ev.mean_average_precision)],
    ]));
    if (ev.per_class) parts.push(el("h3", { text: "Per class" }), perClassTable(ev.per_class));
  }
  const figures = el("div", { id: "card-images" });
  for (const name of answer.images) {
    const title = name.replace(/\.png$/i, "").replace(/_/g, " ");
    const img = el("img", { alt: title });
    apiImage(`${versionPath()}/assets/${encodeURIComponent(name)}`, img).catch(report);
    figures.append(el("figure", {}, img, el("figcaption", { class: "hint", text: title })));
  }
  if (answer.images.length) parts.push(el("h3", { text: "Plots" }), figures);
  const whole = el("a", { href: `${versionPath()}/card`, text: "The whole card as JSON" });
  // A plain link sends no Authorization header: with a key, fetch it and show that.
  whole.addEventListener("click", (event) => {
    if (!$("api-key").value.trim()) return;
    event.preventDefault();
    api(whole.href)
      .then((response) => response.blob())
      .then((blob) => window.open(URL.createObjectURL(blob), "_blank"))
      .catch(report);
  });
  parts.push(el("p", {}, whole));
  return parts;
}

function perClassTable(perClass) {
  const head = el("tr", {}, ...["class", "precision", "recall", "F1", "support"].map((h) => el("th", { scope: "col", text: h })));
  const body = el("tbody");
  for (const [name, m] of Object.entries(perClass)) {
    body.append(el("tr", {}, el("th", { scope: "row", text: name }), el("td", { text: pct(m.precision, 1) }),
      el("td", { text: pct(m.recall, 1) }), el("td", { text: pct(m.f1, 1) }), el("td", { text: num(m.support) })));
  }
  return el("div", { class: "table-wrap" }, el("table", { id: "per-class" }, el("thead", {}, head), body));
}

async function showCard() {
  const section = $("model-card");
  section.hidden = false;
  const path = versionPath();
  if (!path) {
    // Nothing to show yet: say so (it read "Loading…" for good); the version poll
    // calls this again once one is available.
    const model = currentModel();
    $("card-title").textContent = "Model card";
    $("card-body").replaceChildren(el("p", {
      text: model ? `${model.name} has no available version yet.` : "No model is loaded yet.",
    }));
    return;
  }
  try {
    const answer = await apiJson(`${path}/card`);
    $("card-title").textContent = `Model card: ${answer.model}, version ${answer.version}`;
    $("card-body").replaceChildren(...cardSections(answer));
  } catch (err) {
    report(err);
  }
}

function onHash() {
  if (location.hash === "#model-card") {
    showCard().then(() => $("card-title").focus());
  }
}

// --- wiring --------------------------------------------------------------------------

function wire() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  $("model").addEventListener("change", () => { fillVersions(); versionChanged().catch(report); });
  $("version").addEventListener("change", () => versionChanged().catch(report));
  $("file").addEventListener("change", (e) => {
    classifyFile(e.target.files[0]);
    e.target.value = ""; // choosing the same file again is a new request, not "no change"
  });

  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    classifyFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) { e.preventDefault(); classifyFile(file); }
  });
  window.addEventListener("hashchange", onHash);
  loadModels().then(onHash);
}

wire();
