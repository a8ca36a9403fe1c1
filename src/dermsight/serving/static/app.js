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

function figure(src, alt, caption) {
  return el("figure", {}, el("img", { src, alt, loading: "lazy" }), el("figcaption", {}, caption));
}

/** The photo's quality warnings (measured before scoring), or null when there are none. */
function qualityNotes(prediction) {
  const warnings = prediction.quality_warnings || [];
  if (!warnings.length) return null;
  return el("div", { class: "quality", role: "note" }, el("strong", {}, "About the photo:"),
    el("ul", {}, ...warnings.map((w) => el("li", { "data-warning": w.code }, w.message))));
}

/** One result card; `title` names the lesion, `context` (patient view) goes under it. */
function renderCard(prediction, title, context = null) {
  const ood = !prediction.looks_dermoscopic;
  const state = ood ? "ood" : prediction.above_threshold ? "above" : "below";
  const card = el("article", { class: `card ${state}`, "data-prediction-id": prediction.id });
  card.append(el("h3", {}, title));
  if (context) card.append(el("p", { class: "context" }, context));
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
    const agreement = prediction.uncertainty
      ? el("p", { class: prediction.unsure ? "unsure" : "muted" }, prediction.uncertainty) : null;
    card.append(
      el("div", { class: "pictures" },
        figure(prediction.image_url, "lesion image", "Image"),
        figure(prediction.heatmap_url, "melanoma heat map over the lesion", "Heat map")),
      quality || "",
      el("p", { class: "risk" }, el("span", { class: "risk-value" }, percent(prediction.melanoma_risk)),
        " melanoma risk"),
      el("p", { class: "decision" }, prediction.decision),
      prediction.non_melanoma_cancer_likely
        ? el("p", { class: "decision" }, "A non-melanoma skin cancer (basal or squamous cell carcinoma) is likely: refer.")
        : "",
      el("p", {}, "Most similar to:"), ranked,
      agreement || "",
      el("p", { class: "muted" }, `Referral threshold ${percent(prediction.threshold)} · model ${prediction.model_version}`),
    );
  }
  card.append(el("p", { class: "disclaimer" }, prediction.disclaimer));
  return card;
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
      results.replaceChildren(...result.predictions.map((p, i) => renderCard(p, files[i] ? files[i].name : `Image ${i + 1}`)));
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

/** "Rank 1 · torso · ugly-duckling score 0.42" (no score for a lone or non-dermoscopic image). */
function contextLine(lesion) {
  const parts = [`Rank ${lesion.rank}`, lesion.site || "site unknown"];
  const score = lesion.ugly_duckling_score;
  if (lesion.prediction.looks_dermoscopic && score !== null) parts.push(`ugly-duckling score ${score.toFixed(2)}`);
  return parts.join(" · ");
}

function setUpPatient(root) {
  const id = root.dataset.patientId;
  const status = document.getElementById("status");
  let order = "risk";

  async function load() {
    try {
      const patient = await api(`/api/patients/${id}?order=${order}`);
      const cards = patient.lesions.map((l) => renderCard(l.prediction, `Lesion ${l.lesion_id}`, contextLine(l)));
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
  const upload = document.getElementById("upload-form");
  if (upload) setUpUpload(upload);
  const patients = document.getElementById("patient-form");
  if (patients) setUpPatients(patients);
  const patient = document.getElementById("patient");
  if (patient) setUpPatient(patient);
});
