# make run   - create the environment and start the node with config.yaml (or CONFIG=FILE)
# make test  - create the environment, install the test peers, run the whole suite
# make test-quick - the same set-up, then every test that neither runs the model nor starts a server

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OHIF         := tests/js/node_modules/@ohif/app
OHIF_VERSION := 3.13.2
OHIF_SHA512  := 5997719a9986eeba85816f5924b71b82bdd70ad2e2d4a0cd3e831a798e4f3deea3e06e1f8c48e393271933a0ba664d85f3b04ac457e9abe8dde715d907d13c10
PEERS  := storescu storescp echoscu dciodvfy Orthanc chromium chromedriver redis-server plastimatch

.PHONY: run test test-quick venv peers js demo-model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this takes the CPU wheel; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# dcmtk (storescu/storescp/echoscu), dicom3tools (dciodvfy), Orthanc with its DICOMweb plugin
# (STOW-RS), Chromium with its driver (the status page test), Redis (the workers) and
# plastimatch (RTSTRUCT read-back), from Debian. The plugin is a file, not a command.
peers:
	@missing=""; for tool in $(PEERS); do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing libOrthancDicomWeb.so"; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers (missing:$$missing)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver redis-server plastimatch; \
	  $$SUDO systemctl disable --now orthanc redis-server >/dev/null 2>&1 || true; \
	fi

# dcmjs (the DICOM library OHIF uses) for the viewer checks, from the npm registry.
js: tests/js/node_modules/.installed $(OHIF)/.installed

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q nodejs npm; }
	cd tests/js && npm ci --no-audit --no-fund
	touch $@

# OHIF v3's prebuilt viewer (tests/test_ohif.py), next to dcmjs: only its dist is kept. npm
# cannot install @ohif/app as a dependency (3.13.2 names @ohif/i18n@3.13.2, which was never
# published), so its pinned tarball is fetched with npm pack and checked against its SHA-512.
$(OHIF)/.installed: tests/js/node_modules/.installed
	rm -rf $(OHIF) && mkdir -p $(OHIF)
	tmp=$$(mktemp -d) && cd $$tmp && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && \
	  echo "$(OHIF_SHA512)  ohif-app-$(OHIF_VERSION).tgz" | sha512sum --check --quiet && \
	  tar -xzf ohif-app-$(OHIF_VERSION).tgz -C $(CURDIR)/$(OHIF) --strip-components=1 package/dist package/package.json package/LICENSE && \
	  rm -rf $$tmp
	touch $@

run: venv  # make run CONFIG=FILE: another config file
	$(VENV)/bin/dicom-node serve --config $(or $(CONFIG),config.yaml)

test: venv peers js
	$(PY) -m pytest

# The quick tests still call dciodvfy (from peers) and dcmjs (from js) to check what the writers make.
test-quick: venv peers js
	$(PY) -m pytest -m "not e2e and not peers"

demo-model: venv
	$(VENV)/bin/dicom-node demo-model --output models/phantom_total_fast

clean:
	rm -rf $(VENV) var .pytest_cache
