// The page at /: pick a model and an image, predict or adapt, and draw what the API answers.
// Plain JS, no build step, nothing fetched from outside this server. <body data-state> is
// loading | ready | busy | done | error (for tests and for CSS).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], image: null, imageName: "", inputUrl: null, answers: {} };

// Slot colours: tta_runtime/visual.py palette(), so the table, the overlays and the flat masks agree.
const BASE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180], [70, 240, 240],
  [245, 130, 48], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40], [128, 0, 0]];
const SAT_VAL = [[0.85, 0.95], [0.55, 0.80], [0.95, 0.65], [0.40, 0.95]];
function rgb(j) {  // [r, g, b] 0..255 of slot j
  if (j < BASE.length) return BASE[j];
  const i = j - BASE.length, [s, v] = SAT_VAL[Math.floor(i / 7) % SAT_VAL.length];
  const h = ((0.05 + i * (Math.sqrt(5) - 1) / 2) % 1) * 6, f = h - Math.floor(h);
  const [p, q, t] = [v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))];
  const c = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][Math.floor(h) % 6];
  return c.map((x) => Math.round(x * 255));
}
const colour = (j) => `rgb(${rgb(j).join(",")})`;

// The label map (8-bit gray PNG of slot ids) painted in the slot colours: a data:image/png URL.
async function flatMasks(b64) {
  const img = new Image();
  img.src = `data:image/png;base64,${b64}`;
  await img.decode();
  const canvas = Object.assign(document.createElement("canvas"), { width: img.naturalWidth, height: img.naturalHeight });
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < px.data.length; i += 4) px.data.set(rgb(px.data[i]), i);
  g.putImageData(px, 0, 0);
  return canvas.toDataURL("image/png");
}

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
};
const svg = (tag, attrs = {}, text) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
};
const pct = (x) => `${(100 * x).toFixed(1)}%`;
const num = (x, digits = 3) => (x === null || x === undefined ? "n/a" : x.toFixed(digits));

// One API call; a non-2xx answer throws with the JSON error's message (and its status, type, request id).
async function api(path, options) {
  let res;
  try {
    res = await fetch(path, options);
  } catch (e) {
    throw Object.assign(new Error(`the server did not answer (${e.message})`), { detail: path });
  }
  const body = await res.json().catch(() => null);
  if (res.ok && body) return body;
  const err = body && body.error;
  throw Object.assign(new Error(err ? err.message : `HTTP ${res.status} from ${path}`),
    { detail: err ? `${err.status} ${err.type} · request ${body.request_id}` : path });
}

function upload(route, query) {
  const form = new FormData();
  form.append("image", state.image, state.imageName);
  return api(`${route}?${new URLSearchParams(query)}`, { method: "POST", body: form });
}

function setState(name, message) {
  document.body.dataset.state = name;
  $("status").textContent = message;
  const busy = name === "busy" || name === "loading";
  for (const c of document.querySelectorAll("#controls select, #controls input, #controls button")) c.disabled = busy;
  $("run").disabled = busy || !state.image || !state.models.length;
  $("results").setAttribute("aria-busy", String(busy));
}

function showError(e) {
  $("error").replaceChildren(el("strong", {}, "Error: "), el("span", { id: "error-message" }, e.message),
    ...(e.detail ? [el("small", {}, e.detail)] : []));
  $("error").hidden = false;
}

function setImage(blob, name) {
  state.image = blob;
  state.imageName = name;
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.inputUrl = URL.createObjectURL(blob);
  $("file-name").textContent = name;
  $("thumb").src = state.inputUrl;
  $("thumb").hidden = false;
  $("results").hidden = true;
  $("error").hidden = true;
  setState("ready", `Ready: ${name}. Press Run.`);
}

function currentModel() {
  return state.models.find((m) => m.name === $("model").value);
}

function showOOD(ood) {
  $("ood-score").textContent = num(ood.score);
  $("ood-score").dataset.value = ood.score === null ? "" : String(ood.score);
  const [cls, text] = ood.is_ood === null ? ["none", "no calibration"]
    : ood.is_ood ? ["out", "out of distribution"] : ["in", "in distribution"];
  $("ood-verdict").className = `badge ${cls}`;
  $("ood-verdict").textContent = text;
  const gauge = $("ood-gauge");
  gauge.hidden = ood.threshold === null || ood.score === null;
  if (!gauge.hidden) gauge.querySelector(".fill").style.width = pct(Math.min(1, ood.score / (2 * ood.threshold)));
  gauge.className = `gauge ${cls}`;
  $("ood-detail").textContent = ood.threshold === null
    ? `scorer ${ood.scorer}; this model has no calibrated threshold`
    : `threshold ${num(ood.threshold)} (${ood.scorer}): ${ood.is_ood ? "above it, the image is unlike the training data"
      : "below it, the image is like the training data"}; higher = further away`;
}

// The loss before each update, then the final loss after the last one, on labelled axes.
function drawLoss(a) {
  const W = 560, H = 220, L = 66, R = 12, T = 12, B = 40;
  const pts = a.losses.map((y, i) => [i, y]);
  if (a.final_loss !== null && a.steps_run > 0) pts.push([a.steps_run, a.final_loss]);
  const finite = pts.filter((p) => p[1] !== null);
  const box = $("loss");
  if (!finite.length) {
    box.replaceChildren(el("p", { class: "hint" }, a.skipped ? `No step ran: ${a.skipped}.` : "No loss to draw."));
    return;
  }
  const xMax = Math.max(1, pts.length - 1), yMax = Math.max(...finite.map((p) => p[1])) * 1.08 || 1;
  const x = (i) => L + (i / xMax) * (W - L - R), y = (v) => T + (1 - v / yMax) * (H - T - B);
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%" });
  for (const f of [0, 0.5, 1]) {
    s.append(svg("line", { x1: L, x2: W - R, y1: y(f * yMax), y2: y(f * yMax), class: "grid" }));
    s.append(svg("text", { x: L - 6, y: y(f * yMax) + 4, "text-anchor": "end" }, (f * yMax).toPrecision(2)));
  }
  for (const i of new Set([0, Math.round(xMax / 2), xMax])) {
    s.append(svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle" }, String(i)));
  }
  s.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  s.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  s.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, "step"));
  s.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
    transform: `rotate(-90 14 ${(T + H - B) / 2})` }, "loss"));
  let d = "", pen = "M";  // a non-finite loss (null) breaks the line
  for (const [i, v] of pts) {
    if (v === null) { pen = "M"; continue; }
    d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
    pen = "L";
  }
  s.append(svg("path", { d, id: "loss-line", class: "line", "data-points": String(finite.length) }));
  if (a.final_loss !== null && a.steps_run > 0) {
    const [fx, fy] = [x(a.steps_run), y(a.final_loss)];
    s.append(svg("circle", { cx: fx, cy: fy, r: 4, class: "final" }));
    s.append(svg("text", { x: fx - 6, y: fy + 18 < H - B ? fy + 18 : fy - 8, "text-anchor": "end", class: "final-label" }, `final ${a.final_loss.toPrecision(2)}`));
  }
  box.replaceChildren(s);
}

function showAdaptation(a, before, after) {
  const bits = [`${a.steps_run} of ${a.steps_requested} steps in ${a.time_s.toFixed(2)} s`,
    `recipe ${a.recipe} (${a.method}, ${a.mode})`];
  if (before.segmentation && after.segmentation && before.segmentation.recon_mse !== null && after.segmentation.recon_mse !== null) {
    bits.push(`reconstruction error ${before.segmentation.recon_mse.toPrecision(3)} → ${after.segmentation.recon_mse.toPrecision(3)}`);
  }
  if (a.stopped_early) bits.push("stopped early");
  if (a.rolled_back) bits.push(`rolled back: ${a.rollback_reason}`);
  if (a.skipped) bits.push(`skipped: ${a.skipped}`);
  $("adapt-summary").replaceChildren(...bits.flatMap((b, i) => (i ? [el("br"), b] : [b])));
  drawLoss(a);
}

function stackedBar(areas, label) {
  const bar = el("div", { class: "stack", role: "img", "aria-label": `slot areas ${label}` });
  areas.forEach((a, j) => { if (a > 0) bar.append(el("span", { style: `width:${pct(a)};background:${colour(j)}`, title: `slot ${j}: ${pct(a)}` })); });
  return el("div", { class: "stack-row" }, el("span", { class: "stack-label" }, label), bar);
}

function showOutputs(before, after) {
  const seg = before.segmentation, cls = before.classification;
  $("outputs-title").textContent = seg ? `Slots (${seg.slots_used} of ${seg.num_slots} used)` : "Top classes";
  $("areas").hidden = !seg;
  $("topk").hidden = !cls;
  if (seg) {
    const rows = [stackedBar(seg.slot_areas, "before")];
    if (after) rows.push(stackedBar(after.segmentation.slot_areas, "after"));
    const table = el("table", { id: "area-table" }, el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "slot"),
      el("th", { scope: "col" }, "area before"), ...(after ? [el("th", { scope: "col" }, "after")] : []))));
    const body = el("tbody");
    seg.slot_areas.forEach((a, j) => {
      const b = after ? after.segmentation.slot_areas[j] : 0;
      if (a === 0 && b === 0) return;
      body.append(el("tr", {}, el("td", {}, el("i", { class: "swatch", style: `background:${colour(j)}` }), ` ${j}`),
        el("td", {}, pct(a)), ...(after ? [el("td", {}, pct(b))] : [])));
    });
    table.append(body);
    $("areas").replaceChildren(...rows, table);
  } else {
    $("topk").querySelector("thead th:last-child").hidden = !after;
    $("topk").tBodies[0].replaceChildren(...cls.top_k.map((t) => el("tr", {}, el("td", {}, t.name),
      el("td", {}, pct(t.prob)), ...(after ? [el("td", {}, pct(after.classification.probs[t.label]))] : []))));
  }
}

async function run(event) {
  event.preventDefault();
  const model = currentModel(), adapt = $("mode").value === "adapt", steps = $("steps").value.trim();
  $("error").hidden = $("results").hidden = $("view").hidden = $("adaptation").hidden = true;
  state.answers = {};
  for (const id of ["masks-before", "masks-after"]) $(id).removeAttribute("src");
  $("input").src = state.inputUrl;
  $("after-figure").hidden = !adapt;
  $("before-caption").textContent = adapt ? "Before adaptation" : "Prediction";
  const t0 = performance.now();
  try {
    setState("busy", "Working… predicting");
    const before = await upload("/v1/predict", { model: model.name, overlay: 1 });
    state.answers.before = before;
    await showMasks();
    showOOD(before.ood);
    showOutputs(before, null);
    $("results").hidden = false;
    if (adapt) {
      setState("busy", `Working… adapting (${steps || "default"} steps)`);
      const after = await upload("/v1/adapt", { model: model.name, overlay: 1, ...(steps ? { steps } : {}) });
      state.answers.after = after;
      await showMasks();
      showAdaptation(after.adaptation, before, after);
      showOutputs(before, after);
      $("adaptation").hidden = false;
    }
    setState("done", `Done in ${((performance.now() - t0) / 1000).toFixed(1)} s.`);
  } catch (e) {
    $("after-figure").hidden = !state.answers.after;
    showError(e);
    setState("error", "Failed; see the error below.");
  }
}

// Each answer's masks: the API's overlay PNG, or its label map in flat slot colours.
async function showMasks() {
  const seg = state.answers.before && state.answers.before.segmentation;
  $("view").hidden = !seg;
  const flat = seg && $("view-flat").checked;
  for (const [key, id] of [["before", "masks-before"], ["after", "masks-after"]]) {
    const a = state.answers[key];
    if (a) $(id).src = flat ? await flatMasks(a.segmentation.label_map_png) : `data:image/png;base64,${a.overlay_png}`;
  }
}

function pickFile(files) {
  if (files && files.length) setImage(files[0], files[0].name);
}

async function loadSample(sample) {
  try {
    const res = await fetch(sample.url);
    if (!res.ok) throw new Error(`GET ${sample.url} answered ${res.status}`);
    setImage(await res.blob(), sample.name);
  } catch (e) {
    showError(e);
  }
}

async function init() {
  setState("loading", "Loading models…");
  $("controls").addEventListener("submit", run);
  $("file").addEventListener("change", () => pickFile($("file").files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pickFile(e.dataTransfer.files); });
  for (const r of document.querySelectorAll("#view input")) r.addEventListener("change", () => showMasks().catch(showError));
  $("thumb").addEventListener("error", () => { $("thumb").hidden = true; });
  $("model").addEventListener("change", () => {
    $("steps").title = `empty: the default number of steps of the recipe ${currentModel().default_recipe}`;
  });
  try {
    const [models, samples] = await Promise.all([api("/v1/models"), api("/v1/samples")]);
    state.models = models.models;
    $("model").replaceChildren(...state.models.map((m) => el("option", { value: m.name }, `${m.name} (${m.task})`)));
    $("model").value = (state.models.find((m) => m.default) || state.models[0]).name;
    $("model").dispatchEvent(new Event("change"));
    $("samples").replaceChildren(...samples.samples.map((s, i) => {
      const b = el("button", { type: "button", class: "secondary", title: s.description, ...(i ? {} : { id: "sample" }) },
        samples.samples.length > 1 ? s.name : "Use the sample");
      b.addEventListener("click", () => loadSample(s));
      return b;
    }));
    setState("ready", "Choose or drop an image, or use the sample.");
  } catch (e) {
    showError(e);
    setState("error", "The server's models could not be listed.");
  }
}

document.addEventListener("DOMContentLoaded", init);
