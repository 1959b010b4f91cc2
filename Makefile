# make run   - create the environment and start the node with config.yaml (or CONFIG=FILE)
# make test  - create the environment, install the test peers, run the whole suite
# make test-quick - the same set-up, then every test that neither runs the model nor starts a server

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
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
js: tests/js/node_modules/.installed

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	@command -v npm >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q nodejs npm; }
	cd tests/js && npm ci --no-audit --no-fund
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
