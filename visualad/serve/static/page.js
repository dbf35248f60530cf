// The inspection page: send images to /predict, show each picture with its score and label; the threshold
// slider relabels on the page; normal images can become references or calibrate the thresholds.
// File names and errors are user text: they go into the page as text (textContent), never as markup. A server
// started with --token answers 401: the page asks for the token, keeps it for this tab and sends it.
"use strict";
let last = [];          // the files of the last drop
let results = [];       // their rows
let threshold = null;   // the slider's value (null: none)
let normalScores = null; // the calibration's out-of-sample normal scores: what each slider position means
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "visualad-token";

function status(text) { $("status").textContent = text; }
function warning(text) { $("warning").textContent = text || ""; }

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

async function call(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (res.status === 401) {
    $("token-bar").classList.add("shown");
    throw new Error((body && body.error) || "this server needs its token");
  }
  if (!res.ok) throw new Error((body && body.error) || res.statusText);
  return body;
}

function post(path, files) {
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  return call(path, { method: "POST", body: form });
}

async function model() {
  const name = (await call("/v2/models")).models[0];
  const m = await call("/v2/models/" + encodeURIComponent(name));
  $("token-bar").classList.remove("shown");
  $("model").textContent = `${m.name}: ${m.backbone}, ${m.image_size} px, ${m.device} ${m.dtype}, ` +
    `references ${m.references}, threshold ${m.image_threshold === null ? "none" : m.image_threshold.toFixed(4)}` +
    (m.calibrated_mode ? ` (${m.calibrated_mode} mode)` : "");
  normalScores = m.normal_scores || null;
  $("operating-point").textContent = m.operating_point ? "operating point: " + m.operating_point : "";
  if (m.image_threshold !== null) setThreshold(m.image_threshold);
}

// The false-alarm rate a threshold means: of the n calibration normals and a new one, how many score at or
// above it (conservatively: a position between two scores counts the next one down), as a share of n + 1.
function falseAlarms(value) {
  if (!normalScores || !normalScores.length) return "";
  const n = normalScores.length;
  const above = normalScores.filter((s) => s >= value).length;
  const onScore = normalScores.includes(value);
  const rate = (onScore ? above : above + 1) / (n + 1);
  return ` (flags about ${(100 * rate).toFixed(rate < 0.1 ? 1 : 0)}% of normal parts, from ${n} calibration normals)`;
}

function setThreshold(value) {
  threshold = value;
  $("threshold-value").textContent = value === null ? "none" : value.toFixed(4) + falseAlarms(value);
  render();
}

function div(text, className) {
  const el = document.createElement("div");
  el.textContent = text;
  if (className) el.className = className;
  return el;
}

function card(r) {
  const el = div("", "card");
  if (r.error) {
    el.append(div(r.path), div(r.error, "error"));
    return el;
  }
  const flagged = threshold === null ? null : r.score >= threshold;
  const img = document.createElement("img");
  img.alt = r.path;
  img.src = "data:image/png;base64," + r.overlay_png;
  const line = div("score ");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = r.score.toFixed(4);
  const label = document.createElement("span");
  label.className = flagged ? "bad" : "good";
  label.textContent = flagged === null ? "no threshold" : (flagged ? "ANOMALOUS" : "normal");
  const n = r.regions.length;
  line.append(score, " ", label, ` (${r.mode} mode, ${n} region${n === 1 ? "" : "s"})`);
  el.append(img, div(r.path), line);
  return el;
}

function render() {
  $("results").replaceChildren(...results.map(card));
}

function range() {
  const scores = results.filter((r) => !r.error).map((r) => r.score);
  if (!scores.length) return;
  const lo = Math.min(...scores, threshold ?? Infinity), hi = Math.max(...scores, threshold ?? -Infinity);
  const s = $("threshold");
  s.min = lo; s.max = hi; s.step = (hi - lo) / 1000 || 0.001; s.disabled = false;
  if (threshold !== null) s.value = threshold;
}

function mode() { return encodeURIComponent($("mode").value); }

async function score(files) {
  last = Array.from(files).filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|tiff?|webp)$/i.test(f.name));
  if (!last.length) { status("no images"); return; }
  status(`scoring ${last.length} image(s)...`);
  warning("");
  try {
    results = (await post(`/predict?overlay=png&mode=${mode()}`, last)).results;
    status(`${results.length} image(s) scored`);
    $("as-references").disabled = $("calibrate").disabled = false;
    range(); render();
  } catch (e) { status("error: " + e.message); }
}

$("token-bar").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  $("token").value = "";
  try { await model(); status("token accepted"); } catch (err) { status("error: " + err.message); }
});
$("files").addEventListener("change", (e) => score(e.target.files));
$("folder").addEventListener("change", (e) => score(e.target.files));
$("threshold").addEventListener("input", (e) => setThreshold(parseFloat(e.target.value)));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); score(e.dataTransfer.files); });
$("as-references").addEventListener("click", async () => {
  try {
    const r = await post("/references", last);
    status(`${r.references} reference${r.references === 1 ? "" : "s"} set` +
           (r.operating_point ? `; threshold from them: ${r.operating_point}` : ""));
    warning(r.warning);
    await model();
  }
  catch (e) { status("error: " + e.message); }
});
$("calibrate").addEventListener("click", async () => {
  try {
    const r = await post(`/calibrate?mode=${mode()}`, last);
    status(`calibrated on ${r.images} normal image(s) in ${r.mode} mode`);
    warning(r.warning);
    await model();
  } catch (e) { status("error: " + e.message); }
});
model().catch((e) => status("error: " + e.message));
