"""OHIF v3, the viewer radiologists open, as a peer: its prebuilt dist (``make js`` keeps
only that of the npm package ``@ohif/app``) served from one origin with Orthanc's
DICOMweb behind ``/dicom-web`` (Orthanc sends no CORS headers), and driven in headless
Chromium (``tests.support.chromium``) through OHIF's own state: ``window.services``
and cornerstone's cache."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.paths import LOCALHOST, REPO, free_port
from tests.support.wait import wait_until

OHIF_PACKAGE = REPO / "tests" / "js" / "node_modules" / "@ohif" / "app"
OHIF_DIST = OHIF_PACKAGE / "dist"
SOURCE_NAME = "orthanc"

# Extensions the dist holds whose type Python's mimetypes may not know, or knows wrongly
# for a browser (a .wasm module must come as application/wasm to be streamed).
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
          ".png": "image/png", ".ico": "image/x-icon", ".woff2": "font/woff2", ".woff": "font/woff",
          ".ttf": "font/ttf", ".map": "application/json", ".xml": "application/xml", ".txt": "text/plain",
          ".onnx": "application/octet-stream"}
# Request headers passed on to Orthanc (the Accept of a multipart WADO-RS request matters).
_FORWARDED = ("Accept", "Content-Type", "Range")


def ohif_version() -> str:
    """The version of the dist ``make js`` installed (its package.json)."""
    manifest = OHIF_PACKAGE / "package.json"
    if not (OHIF_DIST / "index.html").is_file() or not manifest.is_file():
        raise FileNotFoundError(f"{OHIF_DIST} is missing: `make js` fetches OHIF's prebuilt viewer")
    return str(json.loads(manifest.read_text())["version"])


def app_config() -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source on this origin (``/dicom-web``),
    no study-list-less start, no investigational-use dialog, no tour."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": SOURCE_NAME,
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": SOURCE_NAME,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": False,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": SOURCE_NAME,
        "dataSources": [source],
    }
    roots = ", ".join(f"{key}: window.location.origin + '/dicom-web'" for key in ("wadoUriRoot", "qidoRoot", "wadoRoot"))
    return (f"window.config = {json.dumps(config, indent=1)};\n"
            f"Object.assign(window.config.dataSources[0].configuration, {{{roots}}});\n")


class OhifServer:
    """The dist on 127.0.0.1 and a free port: its files, ``index.html`` for every other
    path (OHIF routes in the page), the ``app-config.js`` of ``app_config`` and
    ``/dicom-web/*`` passed on to ``dicomweb_url`` (Orthanc's plugin root).
    ``requests`` counts what was proxied and ``failures`` lists the proxied requests
    Orthanc answered with an error."""

    def __init__(self, dicomweb_url: str, dist: Path = OHIF_DIST) -> None:
        ohif_version()  # a clear message when `make js` was not run
        self.dist = dist.resolve()
        self.upstream = urlsplit(dicomweb_url)
        self.port = free_port()
        self.url = f"http://{LOCALHOST}:{self.port}"
        self.config_js = app_config().encode()
        self.proxied = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OhifServer:
        server = ThreadingHTTPServer((LOCALHOST, self.port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-static", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def file_for(self, path: str) -> Path:
        """The dist's file for a URL path, ``index.html`` when there is none."""
        candidate = (self.dist / path.lstrip("/")).resolve()
        if candidate.is_relative_to(self.dist) and candidate.is_file():
            return candidate
        return self.dist / "index.html"

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request passed on to Orthanc: its status, headers and body."""
        target = self.upstream.path.rstrip("/") + path[len("/dicom-web"):]
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() in ("content-type", "etag", "last-modified", "cache-control")]
            status = response.status
        finally:
            connection.close()
        with self._lock:
            self.proxied += 1
            if status >= 400:
                self.failures.append(f"{method} {path}: {status}")
        return status, kept, data


def _handler(server: OhifServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's names)
            self._answer("GET")

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer("HEAD")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def _answer(self, method: str) -> None:
            path = self.path.split("#", 1)[0]
            if path.startswith("/dicom-web/") or path == "/dicom-web":
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: self.headers[k] for k in _FORWARDED if self.headers.get(k)}
                status, kept, data = server.forward(method, path, headers, body)
                self._send(status, kept, data, method)
                return
            if method == "POST":
                self._send(405, [("Content-Type", "text/plain")], b"read-only", method)
                return
            route = path.split("?", 1)[0]
            if route == "/app-config.js":
                self._send(200, [("Content-Type", "text/javascript"), ("Cache-Control", "no-store")], server.config_js, method)
                return
            file = server.file_for(route)
            self._send(200, [("Content-Type", _TYPES.get(file.suffix, "application/octet-stream"))],
                       file.read_bytes(), method)

        def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, method: str) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads its own counters
            pass

    return Handler


# Recorded in the page before OHIF's own scripts run: console errors, uncaught errors and
# unhandled rejections (OHIF's error boundary catches some and logs them only at DEBUG).
_ERROR_HOOK = """
window.__testErrors = [];
(() => {
  const text = a => a && a.stack ? String(a.stack) : (a && typeof a === 'object' ? (() => { try { return JSON.stringify(a); } catch (e) { return String(a); } })() : String(a));
  const record = (kind, args) => window.__testErrors.push((kind + ': ' + args.map(text).join(' ')).slice(0, 2000));
  const original = console.error;
  console.error = function (...args) { record('console.error', args); return original.apply(console, args); };
  window.addEventListener('error', e => record('error', [e.error || e.message]));
  window.addEventListener('unhandledrejection', e => record('unhandled rejection', [e.reason]));
})();
"""

# Error notifications OHIF shows (a toast), recorded once its services exist.
_NOTIFICATIONS = """
const service = window.services.uiNotificationService;
if (service && !service.__testWrapped) {
  const show = service.show.bind(service);
  service.show = options => {
    if (options && options.type === 'error') window.__testErrors.push('notification: ' + (options.title || '') + ' ' + String(options.message || ''));
    return show(options);
  };
  service.__testWrapped = true;
}
"""

# Every series asked for has its display set and its thumbnail (OHIF adds them as each
# series' metadata arrives).
_READY = """
const s = window.services;
if (!s || !s.displaySetService || !s.segmentationService || !window.cornerstone) return false;
const sets = s.displaySetService.getActiveDisplaySets();
return arguments[0].every(uid => sets.some(d => d.SeriesInstanceUID === uid && document.getElementById('thumbnail-' + d.displaySetInstanceUID)));
"""

_DISPLAY_SETS = """
return window.services.displaySetService.getActiveDisplaySets().map(d => ({
  uid: d.displaySetInstanceUID, series: d.SeriesInstanceUID, modality: d.Modality,
  referenced: d.referencedDisplaySetInstanceUID || null, loaded: !!d.isLoaded}));
"""

_PROMPT = "const b = document.querySelector('[data-cy=yes-hydrate-btn]'); return !!(b && b.offsetParent);"

# The segmentations OHIF holds: each segment's index and label; for a labelmap, the voxels
# of each segment on each source image (read from cornerstone's cache, image by image);
# for contours, the annotations (one per contour) of each segment.
_SEGMENTATIONS = """
const cache = window.cornerstone.cache;
return window.services.segmentationService.getSegmentations().map(s => {
  const segments = Object.values(s.segments || {}).filter(Boolean).map(x => [x.segmentIndex, String(x.label)]);
  const result = {segments, voxels: null, contours: null, pending: 0};
  const labelmap = s.representationData && s.representationData.Labelmap;
  if (labelmap) {
    result.voxels = {};
    const layers = labelmap.labelmaps ? Object.values(labelmap.labelmaps)
      : [{imageIds: labelmap.imageIds || [], referencedImageIds: labelmap.referencedImageIds || [], labelToSegmentIndex: null}];
    for (const layer of layers) {
      (layer.imageIds || []).forEach((imageId, k) => {
        const image = cache.getImage(imageId);
        if (!image) { result.pending += 1; return; }
        const source = (layer.referencedImageIds || [])[k] || image.referencedImageId;
        const data = image.getPixelData();
        const tally = new Map();
        for (let i = 0; i < data.length; i++) { const v = data[i]; if (v) tally.set(v, (tally.get(v) || 0) + 1); }
        for (const [value, n] of tally) {
          const index = String(layer.labelToSegmentIndex && layer.labelToSegmentIndex[value] !== undefined ? layer.labelToSegmentIndex[value] : value);
          result.voxels[index] = result.voxels[index] || {};
          result.voxels[index][source] = (result.voxels[index][source] || 0) + n;
        }
      });
    }
  }
  const contour = s.representationData && s.representationData.Contour;
  if (contour && contour.annotationUIDsMap) {
    const map = contour.annotationUIDsMap;
    const entries = map instanceof Map ? [...map.entries()] : Object.entries(map);
    result.contours = Object.fromEntries(entries.map(([k, v]) => [String(k), v.size !== undefined ? v.size : v.length]));
  }
  return result;
});
"""

# The active viewport as OHIF holds it (a viewport hydration replaced is destroyed).
_ACTIVE = """
const services = window.services;
const viewport = services.cornerstoneViewportService.getCornerstoneViewport(services.viewportGridService.getActiveViewportId());
"""

_VIEWPORT = _ACTIVE + """
if (!viewport) return null;
const imageId = viewport.getCurrentImageId && viewport.getCurrentImageId();
const image = imageId && window.cornerstone.cache.getImage(imageId);
if (!image) return null;
const data = image.getPixelData();
let sum = 0;
const components = data.length / (image.rows * image.columns);
for (let i = 0; i < data.length; i++) { if (components !== 4 || i % 4 !== 3) sum += data[i]; }
return {imageId, index: viewport.getCurrentImageIdIndex(), count: viewport.getImageIds().length,
        rows: image.rows, columns: image.columns, color: !!image.color, sum};
"""

_REPORT = """
const d = window.services.displaySetService.getDisplaySetByUID(arguments[0]);
if (!d) return null;
return {loaded: !!d.isLoaded, measurements: (d.measurements || []).map(m => [String(m.TrackingIdentifier || m.label || ''), !!m.loaded])};
"""


def instance_key(image_id: str) -> str:
    """``SOPInstanceUID:frame`` of a WADO-RS image id (``.../instances/UID/frames/N``)."""
    tail = image_id.split("/instances/", 1)[1]
    uid, _, rest = tail.partition("/frames/")
    return f"{uid}:{int(rest.split('/')[0] or 1) if rest else 1}"


class OhifViewer:
    """One Chromium page on an ``OhifServer``: opens a study, opens one of its series from
    the study browser as a user does (a double-click on its thumbnail, then "Yes" when
    OHIF asks whether to hydrate) and reads OHIF's own state back."""

    def __init__(self, driver, server: OhifServer) -> None:
        self.driver = driver
        self.server = server
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _ERROR_HOOK})
        driver.get(server.url + "/app-config.js")  # an origin for localStorage: no first-visit tour
        driver.execute_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self._drain()

    def open_study(self, study_uid: str, series: list[str], timeout: float = 60) -> list[dict]:
        """The viewer on one study, once each of ``series`` has its thumbnail in the study
        browser; logs and counters start again here."""
        self.driver.get(f"{self.server.url}/viewer?StudyInstanceUIDs={study_uid}")
        wait_until(lambda: self.driver.execute_script(_READY, list(series)), timeout, 0.1,
                   "every series in OHIF's study browser")
        self.driver.execute_script(_NOTIFICATIONS)
        self._drain()
        return self.display_sets()

    def display_sets(self) -> list[dict]:
        return self.driver.execute_script(_DISPLAY_SETS)

    def display_set(self, series_uid: str) -> dict | None:
        return next((d for d in self.display_sets() if d["series"] == series_uid), None)

    def double_click(self, series_uid: str) -> dict:
        """A double-click on the series' thumbnail; its display set."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        found = self.display_set(series_uid)
        if found is None:
            raise LookupError(f"series {series_uid} is not in OHIF's study browser")
        ActionChains(self.driver).double_click(self.driver.find_element(By.ID, f"thumbnail-{found['uid']}")).perform()
        return found

    def hydrate(self, timeout: float = 30) -> bool:
        """Answers "Yes" when OHIF asks whether to open the segmentation; False when it never asks."""
        from selenium.webdriver.common.by import By

        try:
            wait_until(lambda: self.driver.execute_script(_PROMPT), timeout, 0.1, "OHIF's hydration prompt")
        except TimeoutError:
            return False
        self.driver.find_element(By.CSS_SELECTOR, "[data-cy=yes-hydrate-btn]").click()
        return True

    def segmentations(self) -> list[dict]:
        return self.driver.execute_script(_SEGMENTATIONS)

    def wait_for_segmentation(self, timeout: float = 60) -> dict:
        """The one segmentation OHIF holds, once every labelmap image is in the cache."""
        def ready():
            found = self.segmentations()
            return found[0] if len(found) == 1 and found[0]["pending"] == 0 and (
                found[0]["voxels"] or found[0]["contours"]) else None
        return wait_until(ready, timeout, 0.1, "OHIF's segmentation")

    def viewport_image(self) -> dict | None:
        return self.driver.execute_script(_VIEWPORT)

    def scroll_to(self, index: int) -> None:
        self.driver.execute_script(_ACTIVE + "viewport.setImageIdIndex(arguments[0]);", index)

    def report(self, display_set_uid: str) -> dict | None:
        return self.driver.execute_script(_REPORT, display_set_uid)

    def problems(self) -> list[str]:
        """What went wrong in the page since the study was opened: console errors, uncaught
        errors, error notifications, failed requests (the browser's and the proxy's)."""
        found = list(self.driver.execute_script("return window.__testErrors || []"))
        found += [f"console: {e['message'][:500]}" for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            params = message.get("params", {})
            if message.get("method") == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"request {params['response']['url']}: {params['response']['status']}")
            elif message.get("method") == "Network.loadingFailed" and not params.get("canceled"):
                found.append(f"request failed: {params.get('errorText')} ({params.get('type')})")
        found += [f"proxy: {failure}" for failure in self.server.failures]
        self.server.failures.clear()
        self.driver.execute_script("window.__testErrors = []")
        return found

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise RuntimeError(f"no screenshot written to {path}")
        return path

    def _drain(self) -> None:
        self.driver.get_log("browser")
        self.driver.get_log("performance")
        self.server.failures.clear()
