// The status page: the jobs from /api/jobs, a state filter, previews, and retry.
// Plain browser JavaScript, served by the node; nothing is loaded from elsewhere.
// Every read and action sends the token typed into the page as "Authorization: Bearer",
// never in a URL; previews are fetched the same way and shown as blob: images.
"use strict";

const tbody = document.querySelector("#jobs tbody");
const filters = document.getElementById("filters");
const message = document.getElementById("message");
const locked = document.getElementById("locked");
const REFRESH_MS = 5000;
const MAX_TEXT = 200;  // characters of a description, reason or error shown in a row (all of it on hover)
let shown = null;  // what the table shows now: rows are rebuilt only when it changes
let previewUrls = [];  // blob: URLs of the previews shown, let go when the rows are rebuilt

onTokenChange(() => {
  shown = null;
  load();
});

function cut(value) {
  const span = document.createElement("span");
  const whole = text(value);
  span.className = "cut";
  span.textContent = whole.length > MAX_TEXT ? whole.slice(0, MAX_TEXT - 1) + "\u2026" : whole;
  if (whole.length > MAX_TEXT) span.title = whole;
  return span;
}

const previews = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    previews.unobserve(entry.target);
    loadPreview(entry.target);
  }
});

async function loadPreview(img) {
  try {
    const response = await fetch(img.dataset.src, { headers: authorization(), cache: "no-store" });
    if (!response.ok) {
      img.alt = "no preview (HTTP " + response.status + ")";
      img.dataset.status = String(response.status);
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    previewUrls.push(url);
    img.src = url;
    img.dataset.status = "200";
  } catch (error) {
    img.alt = "no preview: " + error.message;
  }
}

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
  const block = document.createElement("div");
  for (const part of parts.filter((part) => part)) {
    const line = document.createElement("div");
    if (part instanceof Node) line.appendChild(part); else line.textContent = part;
    block.appendChild(line);
  }
  return block;
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

// What the attempts count, in the words of `dicom-node status`: objects delivered (one per
// object and destination) and send attempts (each try of each, failed or not).
function sendsCount(job) {
  const sends = job.sends || [];
  if (!sends.length) return job.attempts ? job.attempts + " send attempt(s)" : "";
  const sent = sends.filter((item) => item.state === "sent").length;
  const tries = sends.reduce((total, item) => total + item.attempts, 0);
  return sent + " of " + sends.length + " object(s) delivered in " + tries + " send attempt(s)";
}

function sendState(job) {
  if (job.state === "sent") return "sent " + time(job.sent_at);
  if (job.state === "sending") {
    return job.attempts ? "waiting: attempt " + (job.attempts + 1) + " at " + time(job.next_attempt_at) : "due";
  }
  if (job.state === "failed" && job.last_error) return "failed";
  if (job.state === "review") return "waiting for review";
  return "-";
}

function render(data) {
  buildFilters(data.states);
  document.getElementById("destination").textContent = "Destinations: " + data.destinations.map(
    (d) => d.name + " (" + d.peer + "; " + d.pending + " pending, " + d.failed + " failed"
      + (d.held ? ", " + d.held + " held for review" : "") + ")").join(", ");
  const signature = JSON.stringify(data.jobs.map((j) => [j.id, j.state, j.updated_at, j.series_description]));
  if (signature === shown) return;
  shown = signature;
  previews.disconnect();
  previewUrls.forEach((url) => URL.revokeObjectURL(url));
  previewUrls = [];
  tbody.replaceChildren();
  for (const job of data.jobs) {
    const row = document.createElement("tr");
    row.id = "job-" + job.id;
    row.dataset.state = job.state;
    cell(row, lines("#" + job.id, job.reprocess_of ? "again from #" + job.reprocess_of : ""));
    const state = document.createElement("span");
    state.className = "state state-" + job.state;
    state.textContent = job.state;
    const reason = cut(job.reason);
    reason.classList.add("reason");
    let lastError = null;
    if (job.last_error) {
      lastError = cut("last error: " + job.last_error);
      lastError.classList.add("error");
    }
    cell(row, lines(state, reason, lastError));
    const description = cut(text(job.series_description) || "(no description)");
    description.classList.add("description");
    cell(row, lines(description, "from " + job.calling_ae_title,
                    "series " + job.series_instance_uid, "study " + job.study_instance_uid), "uid");
    cell(row, lines(text(job.sequence_class) || "-", text(job.preprocessing) || "not segmented"));
    const t = job.durations;
    cell(row, lines("received " + time(job.received_at),
                    "completed " + time(job.completed_at) + " (" + seconds(t.receiving) + ")",
                    job.processing_at && "processing " + time(job.processing_at) + " (queued " + seconds(t.queued) + ")",
                    job.processed_at && "processed " + time(job.processed_at) + " (" + seconds(t.processing) + ")",
                    job.sent_at && "sent " + time(job.sent_at) + " (" + seconds(t.sending) + ")"), "timings");
    cell(row, lines(sendState(job), sendsCount(job)));
    if (data.previews) {
      const img = document.createElement("img");
      img.className = "preview";
      img.alt = "preview of job " + job.id;
      img.dataset.src = "/api/jobs/" + job.id + "/preview.png";
      cell(row, img);
      previews.observe(img);
    } else {
      cell(row, "-");
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "retry";
    button.dataset.job = job.id;
    button.textContent = job.state === "failed" ? "Retry" : "Process again";
    button.disabled = !["sent", "skipped", "no_result", "failed", "rejected", "expired"].includes(job.state);
    if (!data.can_act) button.title = "needs the action token";
    button.addEventListener("click", () => retry(job.id));
    cell(row, reviewLink(job) ? lines(button, reviewLink(job)) : button);
    tbody.appendChild(row);
  }
  document.getElementById("empty").hidden = data.jobs.length > 0;
}

// A job whose objects wait for a reviewer links to its review view (/review/ID).
function reviewLink(job) {
  if (!(job.sends || []).some((item) => item.state === "held") || !["review", "sending"].includes(job.state)) {
    return null;
  }
  const link = document.createElement("a");
  link.className = "review";
  link.href = "/review/" + job.id;
  link.textContent = "Review";
  return link;
}

async function load() {
  const query = new URLSearchParams();
  selectedStates().forEach((s) => query.append("state", s));
  if (!filters.querySelector("input")) new URLSearchParams(location.search).getAll("state").forEach((s) => query.append("state", s));
  try {
    const response = await fetch("/api/jobs" + (query.toString() ? "?" + query : ""),
                                 { cache: "no-store", headers: authorization() });
    document.body.dataset.jobsStatus = String(response.status);
    if (!response.ok) {
      let body = {};
      try { body = await response.json(); } catch (error) { /* not JSON */ }
      locked.hidden = response.status !== 401 && response.status !== 403;
      if (!locked.hidden || response.status === 429) {
        shown = null;
        tbody.replaceChildren();
      }
      throw new Error("HTTP " + response.status + (body.error ? ": " + body.error : ""));
    }
    locked.hidden = true;
    if (message.className === "refused" && !message.dataset.status) show("", "");
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
  let response;
  try {
    response = await fetch("/api/jobs/" + jobId + "/retry", { method: "POST", headers: authorization() });
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
