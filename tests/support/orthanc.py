"""Orthanc as a peer: the PACS that sends series to the node and takes its SEGs (DIMSE,
REST, and DICOMweb with its plugin)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import requests

from tests.support.dcmtk import loopback_env
from tests.support.paths import LOCALHOST, free_port
from tests.support.wait import wait_for_port, wait_until


class Orthanc:
    """A real Orthanc (Debian package) with storage in a temporary folder.

    ``dicomweb`` loads the DICOMweb plugin (package orthanc-dicomweb) under
    ``dicomweb_url``. ``users`` (name -> password) turns HTTP basic authentication on;
    the class's own REST calls then log in as the first of them. ``lua`` is a Lua script
    Orthanc runs, e.g. a ``ReceivedInstanceFilter`` that refuses some instances.
    """

    DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

    def __init__(self, folder: Path, node_port: int, node_ae: str = "DICOMNODE", *, dicomweb: bool = False,
                 users: dict[str, str] | None = None, lua: str | None = None) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC"
        self.url = f"http://{LOCALHOST}:{self.http_port}"
        self.process: subprocess.Popen | None = None
        self.auth: tuple[str, str] | None = next(iter(users.items())) if users else None
        self.config: dict[str, Any] = {
            "Name": "test-pacs",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {"node": [node_ae, LOCALHOST, node_port]},
            "Plugins": [],
            "HttpsVerifyPeers": False,
        }
        if dicomweb:
            if not self.DICOMWEB_PLUGIN.exists():
                raise RuntimeError(f"{self.DICOMWEB_PLUGIN} is missing: install orthanc-dicomweb (make peers)")
            self.config["Plugins"] = [str(self.DICOMWEB_PLUGIN)]
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if users:
            self.config["AuthenticationEnabled"] = True
            self.config["RegisteredUsers"] = dict(users)
        self.lua = lua
        if lua is not None:
            self.config["LuaScripts"] = [str(folder / "script.lua")]

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (STOW-RS posts to ``{dicomweb_url}/studies``)."""
        if "DicomWeb" not in self.config:
            raise RuntimeError("this Orthanc was started without dicomweb=True")
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.lua is not None:
            (self.folder / "script.lua").write_text(self.lua)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen(
            ["Orthanc", str(config_path)], stdout=self.log, stderr=subprocess.STDOUT, env=loopback_env()
        )
        wait_for_port(self.http_port, process=self.process)
        wait_until(lambda: self._ok("/system"), 30, what="Orthanc's REST API")
        if "DicomWeb" in self.config:
            wait_until(lambda: self._ok("/dicom-web/studies"), 30, what="Orthanc's DICOMweb plugin")
        return self

    def _ok(self, path: str) -> bool:
        try:
            return requests.get(self.url + path, auth=self.auth, timeout=2).ok
        except requests.RequestException:
            return False

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def get_bytes(self, path: str) -> bytes:
        response = requests.get(self.url + path, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.content

    def post(self, path: str, data: Any) -> dict:
        body = data if isinstance(data, (bytes, str)) else json.dumps(data)
        response = requests.post(self.url + path, data=body, auth=self.auth, timeout=300)
        response.raise_for_status()
        return response.json()

    def upload(self, folder: Path) -> list[str]:
        ids = []
        for path in sorted(folder.glob("*.dcm")):
            ids.append(self.post("/instances", path.read_bytes())["ParentSeries"])
        return sorted(set(ids))

    def receptions(self) -> list[tuple[str, str]]:
        """(SOPClassUID, SOPInstanceUID) of every instance Orthanc received, duplicates
        included, in order: logged by ``RECEPTION_LOG`` (start it with ``lua=RECEPTION_LOG``)."""
        text = (self.folder / "orthanc.log").read_text(errors="replace")
        return [tuple(line.split("RECEIVED ", 1)[1].split()[:2]) for line in text.splitlines()  # type: ignore[misc]
                if "Lua says: RECEIVED " in line]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
            self.log.close()


# An Orthanc Lua script that logs every instance it receives (DIMSE, REST or DICOMweb),
# a duplicate too, for ``Orthanc.receptions``; it accepts every instance.
RECEPTION_LOG = """
function ReceivedInstanceFilter(dicom, origin, info)
  print("RECEIVED " .. dicom.SOPClassUID .. " " .. dicom.SOPInstanceUID)
  return true
end
"""
