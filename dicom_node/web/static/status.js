// The status page: the jobs from /api/jobs, a state filter, previews, and retry.
// Plain browser JavaScript, served by the node; nothing is loaded from elsewhere.
"use strict";

const tbody = document.querySelector("#jobs tbody");
const filters = document.getElementById("filters");
const message = document.getElementById("message");
const tokenInput = document.getElementById("token");
const REFRESH_MS = 5000;
let shown = null;  // what the table shows now: rows are rebuilt only when it changes

tokenInput.value = sessionStorage.getItem("dicom-node-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("dicom-node-token", tokenInput.value));

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function cell(row, content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.appendChild(content); else td.textContent = text(content);
  row.appendChild(td);
  return td;
}

function lines(...parts) {
  const span = document.createElement("span");
  parts.filter((part) => part).forEach((part, index) => {
    if (index) span.appendChild(document.createElement("br"));
    if (part instanceof Node) span.appendChild(part); else span.appendChild(document.createTextNode(part));
  });
  return span;
}

function seconds(value) {
  return value === null || value === undefined ? "-" : value.toFixed(1) + " s";
}

function time(value) {
  return value ? value.replace("T", " ").replace("+00:00", "Z") : "-";
}

function selectedStates() {
  return Array.from(filters.querySelectorAll("input:checked")).map((box) => box.value);
}

function buildFilters(states) {
  if (filters.querySelector("input")) return;
  const wanted = new URLSearchParams(location.search).getAll("state");
  for (const state of states) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = state;
    box.checked = wanted.includes(state);
    box.addEventListener("change", () => {
      const query = new URLSearchParams();
      selectedStates().forEach((s) => query.append("state", s));
      history.replaceState(null, "", query.toString() ? "?" + query : location.pathname);
      load();
    });
    label.append(box, " " + state);
    filters.appendChild(label);
  }
}

function sendState(job) {
  if (job.state === "sent") return "sent " + time(job.sent_at);
  if (job.state === "sending") {
    return job.attempts ? "waiting: attempt " + (job.attempts + 1) + " at " + time(job.next_attempt_at) : "due";
  }
  if (job.state === "failed" && job.last_error) return "failed";
  return "-";
}

function render(data) {
  buildFilters(data.states);
  document.getElementById("destination").textContent = "Destinations: " + data.destinations.map(
    (d) => d.name + " (" + d.peer + "; " + d.pending + " pending, " + d.failed + " failed)").join(", ");
  const signature = JSON.stringify(data.jobs.map((j) => [j.id, j.state, j.updated_at, j.series_description]));
  if (signature === shown) return;
  shown = signature;
  tbody.replaceChildren();
  for (const job of data.jobs) {
    const row = document.createElement("tr");
    row.id = "job-" + job.id;
    row.dataset.state = job.state;
    cell(row, lines("#" + job.id, job.reprocess_of ? "again from #" + job.reprocess_of : ""));
    const state = document.createElement("span");
    state.className = "state state-" + job.state;
    state.textContent = job.state;
    const reason = document.createElement("span");
    reason.className = "reason";
    reason.textContent = text(job.reason);
    let lastError = null;
    if (job.last_error) {
      lastError = document.createElement("span");
      lastError.className = "error";
      lastError.textContent = "last error: " + job.last_error;
    }
    cell(row, lines(state, reason, lastError));
    cell(row, lines(text(job.series_description) || "(no description)", "from " + job.calling_ae_title,
                    "series " + job.series_instance_uid, "study " + job.study_instance_uid), "uid");
    cell(row, lines(text(job.sequence_class) || "-", text(job.preprocessing) || "not segmented"));
    const t = job.durations;
    cell(row, lines("received " + time(job.received_at),
                    "completed " + time(job.completed_at) + " (" + seconds(t.receiving) + ")",
                    job.processing_at && "processing " + time(job.processing_at) + " (queued " + seconds(t.queued) + ")",
                    job.processed_at && "processed " + time(job.processed_at) + " (" + seconds(t.processing) + ")",
                    job.sent_at && "sent " + time(job.sent_at) + " (" + seconds(t.sending) + ")"), "timings");
    cell(row, lines(sendState(job), job.attempts ? job.attempts + " attempt(s)" : ""));
    const img = document.createElement("img");
    img.className = "preview";
    img.alt = "preview of job " + job.id;
    img.loading = "lazy";
    img.src = "/api/jobs/" + job.id + "/preview.png?v=" + encodeURIComponent(job.state + "-" + job.updated_at);
    cell(row, img);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "retry";
    button.dataset.job = job.id;
    button.textContent = job.state === "failed" ? "Retry" : "Process again";
    button.disabled = !["sent", "skipped", "no_result", "failed"].includes(job.state);
    button.addEventListener("click", () => retry(job.id));
    cell(row, button);
    tbody.appendChild(row);
  }
  document.getElementById("empty").hidden = data.jobs.length > 0;
}

async function load() {
  const query = new URLSearchParams();
  selectedStates().forEach((s) => query.append("state", s));
  if (!filters.querySelector("input")) new URLSearchParams(location.search).getAll("state").forEach((s) => query.append("state", s));
  try {
    const response = await fetch("/api/jobs" + (query.toString() ? "?" + query : ""), { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (error) {
    show("cannot load the jobs: " + error.message, "refused");
  }
}

function show(textContent, kind) {
  message.textContent = textContent;
  message.className = kind;
}

async function retry(jobId) {
  const headers = {};
  const token = tokenInput.value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  let response;
  try {
    response = await fetch("/api/jobs/" + jobId + "/retry", { method: "POST", headers: headers });
  } catch (error) {
    show("retry of job " + jobId + ": " + error.message, "refused");
    return;
  }
  let body = {};
  try { body = await response.json(); } catch (error) { /* not JSON */ }
  if (response.ok) {
    show("job " + jobId + " queued again as job " + body.job + " (" + body.state + ")", "queued");
  } else {
    show("retry of job " + jobId + " refused: HTTP " + response.status + ": " + text(body.error), "refused");
  }
  message.dataset.status = String(response.status);
  load();
}

document.getElementById("refresh").addEventListener("click", load);
load();
setInterval(load, REFRESH_MS);
