// visiontune web page: pick or drop an image, POST it to /v1/predict, draw the top-k bars.
"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("apikey");
keyBox.value = localStorage.getItem("visiontune-key") || "";
keyBox.addEventListener("change", () => localStorage.setItem("visiontune-key", keyBox.value));

function headers() {
  return keyBox.value ? { "X-API-Key": keyBox.value } : {};
}

async function showModel() {
  try {
    const r = await fetch("/v1/model", { headers: headers() });
    if (!r.ok) { $("model").textContent = r.status === 503 ? "model loading…" : "model info unavailable"; return; }
    const m = await r.json();
    $("model").textContent = `${m.name || "model"} · ${m.num_classes} classes`;
  } catch (e) { $("model").textContent = ""; }
}

function render(pred) {
  // a multi-label model answers with a label set and every label's score; a single-label one with one label
  const multi = Array.isArray(pred.labels);
  $("label").textContent = pred.unknown
    ? `unknown: like none of the training images (score ${pred.unknown_score.toPrecision(4)})`
    : multi ? (pred.labels.length ? pred.labels.join(", ") : "(no label)") : pred.label;
  const bars = $("bars");
  bars.replaceChildren();
  const ranked = multi
    ? Object.entries(pred.scores).map(([label, probability]) => ({ label, probability }))
        .sort((a, b) => b.probability - a.probability)
    : pred.top_k;
  for (const t of ranked) {
    const li = document.createElement("li");
    if (multi && pred.labels.includes(t.label)) li.className = "chosen";
    const name = document.createElement("span");
    name.textContent = multi && pred.labels.includes(t.label) ? `✓ ${t.label}` : t.label;
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("div"); fill.style.width = `${(t.probability * 100).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span"); pct.textContent = `${(t.probability * 100).toFixed(1)}%`;
    li.append(name, bar, pct);
    bars.append(li);
  }
  $("status").textContent = pred.calibrated ? "calibrated probabilities" : "";
}

async function classify(file) {
  if (!file) return;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file); img.hidden = false;
  $("status").className = ""; $("status").textContent = "classifying…"; $("label").textContent = "";
  $("bars").replaceChildren();
  const form = new FormData(); form.append("file", file);
  try {
    const r = await fetch("/v1/predict?top_k=5", { method: "POST", body: form, headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.detail || body.error || `HTTP ${r.status}`);
    render(body.predictions[0]);
  } catch (e) {
    $("status").className = "error"; $("status").textContent = `Error: ${e.message}`;
  }
}

$("file").addEventListener("change", (e) => classify(e.target.files[0]));
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => classify(e.dataTransfer.files[0]));
showModel();
