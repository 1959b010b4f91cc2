// The token typed into a page (the status page and the review view share it): kept for
// the browser tab only (sessionStorage), sent as "Authorization: Bearer", never in a URL.
// Loaded before the page's own script, which uses tokenInput, authorization() and
// onTokenChange().
"use strict";

const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("dicom-node-token") || "";

function authorization() {
  const token = tokenInput.value.trim();
  return token ? { "Authorization": "Bearer " + token } : {};
}

// changed() runs once a new token is typed (the field left, or Enter) and saved.
function onTokenChange(changed) {
  function saved() {
    sessionStorage.setItem("dicom-node-token", tokenInput.value);
    changed();
  }
  tokenInput.addEventListener("change", saved);
  tokenInput.addEventListener("keydown", (event) => { if (event.key === "Enter") saved(); });
}
