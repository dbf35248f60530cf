// The inspection page: send images to /predict, show each picture with its score and label; the threshold
// slider relabels on the page; normal images can become references or calibrate the thresholds.
"use strict";
let last = [];          // the files of the last drop
let results = [];       // their rows
let threshold = null;   // the slider's value (null: none)
const $ = (id) => document.getElementById(id);

function status(text) { $("status").textContent = text; }

async function post(path, files) {
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const res = await fetch(path, { method: "POST", body: form });
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

async function model() {
  const name = (await (await fetch("/v2/models")).json()).models[0];
  const m = await (await fetch("/v2/models/" + encodeURIComponent(name))).json();
  $("model").textContent = `${m.name}: ${m.backbone}, ${m.image_size} px, ${m.device} ${m.dtype}, ` +
    `references ${m.references}, threshold ${m.image_threshold === null ? "none" : m.image_threshold.toFixed(4)}` +
    (m.calibrated_mode ? ` (${m.calibrated_mode} mode)` : "");
  if (m.image_threshold !== null) setThreshold(m.image_threshold);
}

function setThreshold(value) {
  threshold = value;
  $("threshold-value").textContent = value === null ? "none" : value.toFixed(4);
  render();
}

function render() {
  const box = $("results");
  box.innerHTML = "";
  for (const r of results) {
    const card = document.createElement("div");
    card.className = "card";
    if (r.error) {
      card.innerHTML = `<div>${r.path}</div><div class="error">${r.error}</div>`;
    } else {
      const flagged = threshold === null ? null : r.score >= threshold;
      const label = flagged === null ? "no threshold" : (flagged ? "ANOMALOUS" : "normal");
      card.innerHTML = `<img alt="${r.path}" src="data:image/png;base64,${r.overlay_png}">` +
        `<div>${r.path}</div><div>score <span class="score">${r.score.toFixed(4)}</span> ` +
        `<span class="${flagged ? "bad" : "good"}">${label}</span> (${r.mode} mode, ` +
        `${r.regions.length} region${r.regions.length === 1 ? "" : "s"})</div>`;
    }
    box.appendChild(card);
  }
}

function range() {
  const scores = results.filter((r) => !r.error).map((r) => r.score);
  if (!scores.length) return;
  const lo = Math.min(...scores, threshold ?? Infinity), hi = Math.max(...scores, threshold ?? -Infinity);
  const s = $("threshold");
  s.min = lo; s.max = hi; s.step = (hi - lo) / 1000 || 0.001; s.disabled = false;
  if (threshold !== null) s.value = threshold;
}

async function score(files) {
  last = Array.from(files).filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp|tiff?|webp)$/i.test(f.name));
  if (!last.length) { status("no images"); return; }
  status(`scoring ${last.length} image(s)...`);
  try {
    results = (await post(`/predict?overlay=png&mode=${$("mode").value}`, last)).results;
    status(`${results.length} image(s) scored`);
    $("as-references").disabled = $("calibrate").disabled = false;
    range(); render();
  } catch (e) { status("error: " + e.message); }
}

$("files").addEventListener("change", (e) => score(e.target.files));
$("folder").addEventListener("change", (e) => score(e.target.files));
$("threshold").addEventListener("input", (e) => setThreshold(parseFloat(e.target.value)));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); score(e.dataTransfer.files); });
$("as-references").addEventListener("click", async () => {
  try { const r = await post("/references", last); status(`${r.references} references set`); await model(); }
  catch (e) { status("error: " + e.message); }
});
$("calibrate").addEventListener("click", async () => {
  try {
    const r = await post(`/calibrate?mode=${$("mode").value}`, last);
    status(`calibrated on ${r.images} normal image(s) in ${r.mode} mode`);
    await model();
  } catch (e) { status("error: " + e.message); }
});
model().catch((e) => status("error: " + e.message));
