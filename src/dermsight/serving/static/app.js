// DermSight pages: upload, result cards, patient view. Everything goes through the JSON API.
"use strict";

/** fetch() that returns parsed JSON (or null for 204) and throws the API's `detail` on 4xx/5xx. */
async function api(url, options = {}) {
  // The custom header is the signed-in page's proof against cross-site request forgery.
  const headers = { ...(options.headers || {}), "X-Requested-With": "DermSight" };
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401 && document.body.dataset.auth === "on") {
    // The session ended (expired, key revoked, server restarted): sign in again, then come back.
    location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
    throw new Error("Your session has ended: sign in again.");
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : `${response.status} ${response.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return body;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

const percent = (value) => `${(100 * value).toFixed(value < 0.1 ? 1 : 0)}%`;
const REFERRAL_LABELS = { urgent: "Refer urgently", routine: "Refer", not_prompted: "No referral prompted" };

function figure(img, caption) {
  return el("figure", {}, img, el("figcaption", {}, caption));
}

/** The photo's quality warnings (measured before scoring), or null when there are none. */
function qualityNotes(prediction) {
  const warnings = prediction.quality_warnings || [];
  if (!warnings.length) return null;
  return el("div", { class: "quality", role: "note" }, el("strong", {}, "About the photo:"),
    el("ul", {}, ...warnings.map((w) => el("li", { "data-warning": w.code }, w.message))));
}

/** "robust-lite0-...@2026-12-01T22:40:55Z" -> its name and training date, the full id on demand. */
function modelLabel(version) {
  const [name, created] = version.split("@");
  const summary = el("summary", {}, "Model ", el("span", { class: "token" }, name));
  if (created) summary.append(", trained ", el("span", { class: "token" }, created.slice(0, 10)));
  return el("details", { class: "model-id muted" }, summary, el("code", {}, version));
}

/** The photo and the heat map in the same framing, with the map's colour scale and what it shows. */
function pictures(prediction) {
  const photo = el("img", { src: prediction.image_url, alt: "the uploaded lesion image" });
  const map = el("img", { src: prediction.heatmap_url, alt: "heat map of melanoma-like features" });
  if (document.body.dataset.heatmapFit === "squash") {
    // The network saw the whole frame squashed to a square: show the map stretched back to the photo's frame.
    photo.addEventListener("load", () => {
      for (const img of [photo, map]) {
        img.style.aspectRatio = `${photo.naturalWidth} / ${photo.naturalHeight}`;
        img.classList.add("whole-frame");
      }
    });
  }
  return el("div", { class: "pictures-block" },
    el("div", { class: "pictures" }, figure(photo, "Image"), figure(map, "Heat map")),
    el("div", { class: "scale", "aria-hidden": "true" }, el("span", {}, "none"), el("span", { class: "ramp" }),
      el("span", {}, "strongest in this image")),
    el("p", { class: "caption" }, "The heat map shows where the network found melanoma-like features, relative to " +
      "this image's strongest; it is not the lesion's outline, and no colour does not mean benign."));
}

/** What the risk meant on held-out images, or null when the API has no figures for this model. */
function riskMeaning(prediction) {
  const meaning = prediction.risk_meaning;
  // issue 27 (site profile): "calibrated on N cases at <site>" / "threshold from other clinics" goes here.
  if (!meaning) return null;
  const share = Math.round((100 * meaning.melanomas) / meaning.images);
  return el("div", { class: "meaning" },
    el("p", {}, `What this risk means: of the ${meaning.images.toLocaleString("en")} validation images whose risks ` +
      `were nearest (${percent(meaning.risk_low)} to ${percent(meaning.risk_high)}), ` +
      `${meaning.melanomas.toLocaleString("en")} (${share}%) were melanoma.`),
    el("details", {}, el("summary", {}, "Which images"), el("p", {}, `${meaning.measured_on}. A clinic whose ` +
      "patients, dermatoscope or melanoma rate differ can see other shares.")));
}

/** One result card: decision first, then what the risk means, how sure the model is, the photo. */
function renderCard(prediction, title, context = null) {
  const ood = !prediction.looks_dermoscopic;
  const state = ood ? "ood" : prediction.above_threshold ? "above" : "below";
  const card = el("article", { class: `card ${state}`, "data-prediction-id": prediction.id });
  card.append(el("h3", {}, title));
  if (context) card.append(el("p", { class: "context" }, ...[].concat(context)));
  const quality = qualityNotes(prediction);
  if (ood) {
    // A refused image: the refusal and its reason only (no risk, heat map, differential or photo advice).
    card.append(
      el("p", { class: "decision refusal", "data-refusal": prediction.refusal.code }, "Refused: no risk given."),
      el("p", { class: "reason" }, prediction.refusal.message),
    );
    return card;
  } else {
    const ranked = el("ol", { class: "differential" }, ...prediction.differential.map((d) =>
      el("li", {}, `${d.name} ${percent(d.probability)}`, d.malignant ? el("span", { class: "malignant" }, " malignant") : "")));
    card.append(
      el("p", { class: "verdict" }, el("span", { class: "badge", "data-referral": prediction.referral },
        REFERRAL_LABELS[prediction.referral]), " ", el("span", { class: "decision" }, prediction.decision)),
      el("p", { class: "risk" }, el("span", { class: "risk-value" }, percent(prediction.melanoma_risk)),
        " melanoma risk", el("span", { class: "muted" }, ` · referral threshold ${percent(prediction.threshold)}`)),
      riskMeaning(prediction) || "",
      prediction.uncertainty ? el("p", { class: prediction.unsure ? "uncertainty unsure" : "uncertainty" },
        prediction.uncertainty) : "",
      prediction.non_melanoma_cancer_likely
        ? el("p", { class: "decision" }, "A non-melanoma skin cancer (basal or squamous cell carcinoma) is likely: refer.")
        : "",
      el("p", {}, "Most similar to:"), ranked,
      quality || "",
      pictures(prediction),
      modelLabel(prediction.model_version),
    );
  }
  card.append(el("p", { class: "disclaimer" }, prediction.disclaimer));
  return card;
}

/** The card of an uploaded file that was left out (nothing of it stored). */
function rejectedCard(rejected) {
  return el("article", { class: "card rejected", "data-rejected": rejected.number },
    el("h3", {}, rejected.filename),
    el("p", { class: "decision" }, "Not scored, not stored"),
    el("p", {}, rejected.reason));
}

// -- file names: kept in this browser tab only -----------------------------------------
// The server never stores a file's name (it can carry a patient's name). The page that uploads a patient's images
// remembers each stored image's name in sessionStorage (this tab only; gone when the tab closes or on sign-out),
// keyed by the image's id and its upload time from the server, so that a reused id never shows another file's name.

const FILE_NAMES = "dermsight.file-names";

function fileNames() {
  try { return JSON.parse(sessionStorage.getItem(FILE_NAMES)) || {}; } catch { return {}; }
}

function rememberFileNames(predictions, names) {
  const known = fileNames();
  predictions.forEach((p, i) => { known[p.image_id] = { name: names[i], uploaded_at: p.image_uploaded_at }; });
  sessionStorage.setItem(FILE_NAMES, JSON.stringify(known));
}

/** The name this tab uploaded the prediction's image with, or null. */
function fileName(prediction) {
  const entry = fileNames()[prediction.image_id];
  // The same instant, whatever offset the database hands the time back in.
  return entry && Date.parse(entry.uploaded_at) === Date.parse(prediction.image_uploaded_at) ? entry.name : null;
}

// -- upload page ----------------------------------------------------------------------

function setUpUpload(form) {
  const select = form.elements.patient_id;
  const wanted = new URLSearchParams(location.search).get("patient");
  if (wanted) select.value = wanted;

  document.getElementById("new-patient").addEventListener("click", async () => {
    const reference = prompt("Pseudonymous reference for the new patient (never a name), or leave empty:");
    if (reference === null) return;
    try {
      const patient = await api("/api/patients", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reference }),
      });
      const label = `#${patient.id}${patient.reference ? " · " + patient.reference : ""}`;
      select.append(el("option", { value: patient.id }, label));
      select.value = String(patient.id);
      showError("");
    } catch (error) { showError(error.message); }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const files = [...form.elements.files.files];
    if (!files.length) { showError("Choose at least one image."); return; }
    const data = new FormData();
    for (const file of files) data.append("files", file);
    for (const name of ["age", "sex", "site", "patient_id"]) {
      const value = form.elements[name].value.trim();
      if (value) data.append(name, value);
    }
    const button = form.querySelector("button[type=submit]");
    const busy = document.getElementById("busy");
    const results = document.getElementById("results");
    const link = document.getElementById("patient-link");
    button.disabled = true; busy.hidden = false; showError("");
    results.replaceChildren(); link.hidden = true;
    try {
      const result = await api("/api/images", { method: "POST", body: data });
      // One card per file, in upload order: the stored ones with their result, the others with their reason.
      const left = new Map(result.rejected.map((r) => [r.number, r]));
      const stored = [...result.predictions];
      if (result.patient_id !== null) {
        rememberFileNames(stored, files.filter((_, i) => !left.has(i + 1)).map((file) => file.name));
      }
      results.replaceChildren(...files.map((file, i) => left.has(i + 1)
        ? rejectedCard(left.get(i + 1)) : renderCard(stored.shift(), file.name)));
      link.hidden = !result.patient_url;
      if (result.patient_url) link.replaceChildren(el("a", { href: result.patient_url }, "Open the patient view: all lesions ranked"));
    } catch (error) {
      showError(error.message);
    } finally {
      button.disabled = false; busy.hidden = true;
    }
  });
}

// -- patients page --------------------------------------------------------------------

function setUpPatients(form) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const patient = await api("/api/patients", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reference: form.elements.reference.value }),
      });
      location.href = patient.url;
    } catch (error) { showError(error.message); }
  });
}

// -- patient view ---------------------------------------------------------------------

/** "IMG_0042.jpg", as this tab uploaded it, or why the page cannot name the file. */
function fileLine(prediction) {
  const name = fileName(prediction);
  return name
    ? el("p", { class: "file-name" }, "File ", el("span", { class: "token", title: name }, name))
    : el("p", { class: "file-name muted" }, "File name not known here: only the browser tab that uploaded it shows it.");
}

/** "Rank 1 · torso · uploaded 2026-12-07 09:41 · ugly-duckling score 1.28 (stands out)", as text and a span (no score for a lone
 * or non-dermoscopic image). The score is in standard deviations around this patient's average lesion (0). */
function contextLine(lesion) {
  const stamp = lesion.uploaded_at;  // UTC, from the server; SQLite's come back without the offset
  const uploaded = new Date(/(Z|[+-]\d\d:\d\d)$/.test(stamp) ? stamp : `${stamp}Z`);
  const when = `${uploaded.toLocaleDateString("en-CA")} ${uploaded.toTimeString().slice(0, 5)}`;
  const parts = [`Rank ${lesion.rank}`, lesion.site || "site unknown", el("span", { class: "nowrap" }, `uploaded ${when}`)];
  const score = lesion.ugly_duckling_score;
  if (lesion.prediction.looks_dermoscopic && score !== null) {
    const reading = score >= 1 ? "stands out" : score > 0 ? "a little unusual" : "typical for this patient";
    parts.push(`ugly-duckling score ${score.toFixed(2)} (${reading})`);
  }
  return parts.flatMap((part, i) => (i ? [" · ", part] : [part]));  // the date and time never break apart
}

function setUpPatient(root) {
  const id = root.dataset.patientId;
  const status = document.getElementById("status");
  let order = "risk";

  async function load() {
    try {
      const patient = await api(`/api/patients/${id}?order=${order}`);
      const cards = patient.lesions.map((l) => {
        const card = renderCard(l.prediction, `Lesion ${l.lesion_id}`, contextLine(l));
        card.querySelector("h3").after(fileLine(l.prediction));
        return card;
      });
      document.getElementById("lesions").replaceChildren(...cards);
      status.hidden = false;
      status.textContent = patient.lesions.length
        ? `${patient.lesions.length} lesion${patient.lesions.length === 1 ? "" : "s"}, ranked by ${order === "risk" ? "melanoma risk" : "ugly-duckling score"}.`
        : "No lesions yet: add some from Check a lesion.";
      showError("");
    } catch (error) { showError(error.message); }
  }

  for (const button of root.querySelectorAll("[data-order]")) {
    button.addEventListener("click", () => {
      order = button.dataset.order;
      for (const other of root.querySelectorAll("[data-order]")) other.setAttribute("aria-pressed", String(other === button));
      load();
    });
  }
  // The buttons a key's role may not use are not on the page (the API would answer 403).
  document.getElementById("rescore")?.addEventListener("click", async (event) => {
    event.target.disabled = true;
    try {
      const result = await api(`/api/patients/${id}/rescore`, { method: "POST" });
      await load();
      status.textContent = `Re-scored ${result.predictions.length} lesions with ${result.model_version}.`;
    } catch (error) { showError(error.message); } finally { event.target.disabled = false; }
  });
  document.getElementById("delete-patient")?.addEventListener("click", async () => {
    if (!confirm("Delete this patient with every image and prediction? This cannot be undone.")) return;
    try {
      await api(`/api/patients/${id}`, { method: "DELETE" });
      location.href = "/patients";
    } catch (error) { showError(error.message); }
  });
  load();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelector("form.signout")?.addEventListener("submit", () => sessionStorage.removeItem(FILE_NAMES));
  const upload = document.getElementById("upload-form");
  if (upload) setUpUpload(upload);
  const patients = document.getElementById("patient-form");
  if (patients) setUpPatients(patients);
  const patient = document.getElementById("patient");
  if (patient) setUpPatient(patient);
});
