// The review view of one job: its series plane by plane with the segmentation drawn over
// it (PNG planes rendered by the node), a slider and the mouse wheel to scroll, and the
// Approve and Reject buttons. Plain browser JavaScript, built with textContent only.
// The token typed in (shared with the status page) is sent as "Authorization: Bearer",
// never in a URL; planes are fetched with it and shown as blob: images.
"use strict";

const jobId = Number((location.pathname.match(/^\/review\/(\d+)/) || [])[1]);
const message = document.getElementById("message");
const locked = document.getElementById("locked");
const section = document.getElementById("review");
const image = document.getElementById("plane");
const slider = document.getElementById("slider");
const planeLabel = document.getElementById("plane-label");
const approveButton = document.getElementById("approve");
const rejectButton = document.getElementById("reject");
const reasonInput = document.getElementById("reason");
let planes = 0;
let labelled = [];
let shownPlane = -1;
let wanted = -1;
const blobs = new Map();  // plane -> blob: URL

onTokenChange(() => {
  forget();
  load();
});

function text(value) {
  return value === null || value === undefined ? "" : String(value);
}

function show(textContent, kind, status, source) {
  message.textContent = textContent;
  message.className = kind;
  if (status !== undefined) message.dataset.status = String(status); else delete message.dataset.status;
  message.dataset.source = source || "";
}

function forget() {
  blobs.forEach((url) => URL.revokeObjectURL(url));
  blobs.clear();
  shownPlane = -1;
}

function line(parent, content) {
  const div = document.createElement("div");
  div.textContent = content;
  parent.appendChild(div);
  return div;
}

function render(data) {
  const job = data.job;
  document.getElementById("job-title").textContent = "job " + job.id;
  section.hidden = false;
  section.dataset.state = job.state;
  section.dataset.waiting = String(data.waiting);
  const summary = document.getElementById("summary");
  summary.replaceChildren();
  const state = document.createElement("span");
  state.className = "state state-" + job.state;
  state.id = "job-state";
  state.textContent = job.state;
  const first = line(summary, "");
  first.append(state, " " + text(job.reason));
  line(summary, text(job.series_description) || "(no description)").className = "description";
  line(summary, "series " + job.series_instance_uid + " from " + job.calling_ae_title).className = "uid";
  line(summary, "objects: " + data.sends.map((s) => s.object + " to " + s.destination + " " + s.state).join(", "));
  if (data.review && data.review.decision) {
    line(summary, data.review.decision + " by " + text(data.review.reviewer)
         + (data.review.reason ? ": " + data.review.reason : ""));
  }
  const segments = document.getElementById("segments");
  segments.replaceChildren();
  for (const segment of data.segments) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = "rgb(" + segment.rgb.join(",") + ")";
    item.append(swatch, segment.name);
    segments.appendChild(item);
  }
  if (!data.images) {
    image.hidden = true;
    planeLabel.textContent = "images are off (http.ui_previews: false)";
  } else if (data.image_error) {
    image.hidden = true;
    planeLabel.textContent = "no images: " + data.image_error;
  } else {
    image.hidden = false;
    planes = data.planes;
    labelled = data.labelled;
    slider.max = String(Math.max(planes - 1, 0));
    if (wanted < 0) {
      // start on the middle plane that carries a segment (else the middle of the series)
      wanted = labelled.length ? labelled[Math.floor(labelled.length / 2)] : Math.floor(planes / 2);
    }
    goTo(wanted);
  }
  const decides = data.can_act && data.waiting;
  approveButton.disabled = !decides;
  rejectButton.disabled = !decides;
  reasonInput.disabled = !decides;
  const why = !data.waiting ? "nothing of this job waits for review" : (!data.can_act ? "needs the action token" : "");
  approveButton.title = why;
  rejectButton.title = why;
}

function goTo(index) {
  if (!planes) return;
  wanted = Math.max(0, Math.min(planes - 1, index));
  slider.value = String(wanted);
  planeLabel.textContent = "plane " + (wanted + 1) + " of " + planes
    + (labelled.includes(wanted) ? " (segmented)" : "");
  fetchPlane(wanted);
}

async function fetchPlane(index) {
  let url = blobs.get(index);
  if (!url) {
    let response;
    try {
      response = await fetch("/api/jobs/" + jobId + "/review/" + index + ".png",
                             { headers: authorization(), cache: "no-store" });
    } catch (error) {
      show("plane " + (index + 1) + ": " + error.message, "refused");
      return;
    }
    if (!response.ok) {
      image.dataset.status = String(response.status);
      show("plane " + (index + 1) + ": HTTP " + response.status, "refused", response.status);
      return;
    }
    url = URL.createObjectURL(await response.blob());
    blobs.set(index, url);
  }
  if (index !== wanted) return;  // scrolled on meanwhile
  image.src = url;
  image.dataset.plane = String(index);
  image.dataset.status = "200";
  shownPlane = index;
}

slider.addEventListener("input", () => goTo(Number(slider.value)));
image.addEventListener("wheel", (event) => {
  event.preventDefault();
  goTo(wanted + (event.deltaY > 0 ? 1 : -1));
}, { passive: false });
document.addEventListener("keydown", (event) => {
  if (event.target === reasonInput || event.target === tokenInput) return;
  if (event.key === "ArrowDown" || event.key === "ArrowRight") goTo(wanted + 1);
  if (event.key === "ArrowUp" || event.key === "ArrowLeft") goTo(wanted - 1);
});

async function load() {
  if (!jobId) {
    show("no job in the address (/review/JOB)", "refused");
    return;
  }
  try {
    const response = await fetch("/api/jobs/" + jobId + "/review", { headers: authorization(), cache: "no-store" });
    document.body.dataset.reviewStatus = String(response.status);
    let body = {};
    try { body = await response.json(); } catch (error) { /* not JSON */ }
    if (!response.ok) {
      locked.hidden = response.status !== 401 && response.status !== 403;
      section.hidden = true;
      show("cannot load job " + jobId + ": HTTP " + response.status + (body.error ? ": " + body.error : ""),
           "refused", response.status, "load");
      return;
    }
    locked.hidden = true;
    if (message.dataset.source === "load") show("", "");  // a refused read before the token was typed
    render(body);
  } catch (error) {
    show("cannot load job " + jobId + ": " + error.message, "refused", undefined, "load");
  }
}

async function decide(action) {
  const headers = authorization();
  if (action === "reject") {
    const reason = reasonInput.value.trim();
    if (!reason) {
      show("a rejection needs a reason", "refused");
      reasonInput.focus();
      return;
    }
    headers["X-Review-Reason"] = encodeURIComponent(reason);  // a header: never in a URL that logs keep
  }
  let response;
  try {
    response = await fetch("/api/jobs/" + jobId + "/" + action, { method: "POST", headers: headers });
  } catch (error) {
    show(action + " of job " + jobId + ": " + error.message, "refused");
    return;
  }
  let body = {};
  try { body = await response.json(); } catch (error) { /* not JSON */ }
  if (response.ok) {
    show("job " + jobId + " " + body.review + ": " + body.state, "queued", response.status);
  } else {
    show(action + " of job " + jobId + " refused: HTTP " + response.status + ": " + text(body.error), "refused",
         response.status);
  }
  load();
}

approveButton.addEventListener("click", () => decide("approve"));
rejectButton.addEventListener("click", () => decide("reject"));
document.getElementById("refresh").addEventListener("click", load);
load();
setInterval(load, 5000);  // the job's state as its sends go on
