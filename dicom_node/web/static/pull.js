"use strict";
// The status page's pulls (/api/pulls): start a pull from a source (the action token) and
// see each pull's progress. Shown only when the node has sources. Text only (textContent),
// the token from the page's token field as "Authorization: Bearer", never in a URL.

const pullSection = document.getElementById("pulls");
const pullForm = document.getElementById("pull-form");
const pullSource = document.getElementById("pull-source");
const pullMessage = document.getElementById("pull-message");
const pullRows = document.querySelector("#pull-table tbody");

function pullCell(row, content) {
  const td = document.createElement("td");
  td.textContent = content === null || content === undefined ? "" : String(content);
  row.appendChild(td);
  return td;
}

function pullArguments(args) {
  return Object.keys(args).filter((key) => key !== "source").sort()
    .map((key) => key + " " + args[key]).join(", ");
}

function pullProgress(progress) {
  let line = "found " + progress.found + ", retrieved " + progress.retrieved + "/" + progress.to_retrieve +
             ", processed " + progress.processed + ", sent " + progress.sent;
  if (progress.failed) line += ", failed " + progress.failed;
  if (progress.paused_until) line += ", paused until " + progress.paused_until;
  return line;
}

function renderPulls(data) {
  const chosen = pullSource.value;
  pullSource.replaceChildren(...data.sources.map((name) => {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    return option;
  }));
  if (data.sources.includes(chosen)) pullSource.value = chosen;
  pullForm.querySelector("button").disabled = !data.can_act;
  pullRows.replaceChildren(...data.pulls.map((pull) => {
    const row = document.createElement("tr");
    row.dataset.pull = pull.pull;
    pullCell(row, pull.arguments.source);
    pullCell(row, pullArguments(pull.arguments));
    pullCell(row, pull.state + (pull.running ? " (running)" : "") + (pull.reason ? ": " + pull.reason : ""));
    pullCell(row, pullProgress(pull.progress)).className = "pull-progress";
    pullCell(row, pull.started_by);
    return row;
  }));
}

async function loadPulls() {
  try {
    const response = await fetch("/api/pulls", { cache: "no-store", headers: authorization() });
    if (response.status === 404) { pullSection.hidden = true; return; }  // no sources configured
    if (!response.ok) { pullSection.hidden = true; return; }  // no or a wrong token: the jobs say why
    pullSection.hidden = false;
    renderPulls(await response.json());
  } catch (error) {
    pullMessage.textContent = "cannot load the pulls: " + error.message;
  }
}

pullForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const query = new URLSearchParams();
  for (const input of pullForm.querySelectorAll("input, select")) {
    if (input.type === "checkbox") { if (input.checked) query.append(input.name, "1"); }
    else if (input.value.trim()) query.append(input.name, input.value.trim());
  }
  let response;
  try {
    response = await fetch("/api/pulls?" + query, { method: "POST", headers: authorization() });
  } catch (error) {
    pullMessage.textContent = "the pull was not started: " + error.message;
    return;
  }
  let body = {};
  try { body = await response.json(); } catch (error) { /* not JSON */ }
  pullMessage.textContent = response.ok ? "pull " + body.pull + " started from " + body.source
    : "the pull was refused: HTTP " + response.status + (body.error ? ": " + body.error : "");
  pullMessage.className = response.ok ? "queued" : "refused";
  loadPulls();
});

onTokenChange(loadPulls);
loadPulls();
setInterval(loadPulls, 5000);
