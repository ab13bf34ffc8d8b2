"""cloud-init's EC2 data source run in a guest namespace against a VR, as a guest
image runs it: Debian's cloud-init (``python3-cloud-init``) under the system Python."""

from __future__ import annotations

import contextlib
import json
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

from tests.helpers import netns

CLOUD_INIT_PYTHON = "/usr/bin/python3"

# cloud-init's EC2 data source, pointed at the VR. ``platform`` is what cloud-init's
# identify_platform() would conclude from DMI: "unknown" on a CloudStack guest
# (strict_id false lets the source run there), "aws" where DMI says EC2 — then it
# asks for an IMDSv2 token first and gives up on any 4xx, never falling back to
# plain GETs. Every HTTP attempt is recorded through requests.Session.request.
EC2_DRIVER = textwrap.dedent(
    """
    import base64, json, sys
    import requests
    from cloudinit import distros, helpers
    from cloudinit.sources import DataSourceEc2 as ec2

    work, url, platform = sys.argv[1], sys.argv[2], sys.argv[3]
    calls = []  # [method, url, status, names of the headers sent]
    _request = requests.Session.request

    def request(self, method, url, **kw):
        entry = [method, url, None, sorted(kw.get("headers") or {})]
        calls.append(entry)
        response = _request(self, method, url, **kw)
        entry[2] = response.status_code
        return response

    requests.Session.request = request
    paths = helpers.Paths({"cloud_dir": work + "/cloud", "run_dir": work + "/run"})
    distro = distros.fetch("debian")("debian", {}, paths)
    ds_cfg = {"metadata_urls": [url], "strict_id": False, "max_wait": 20, "timeout": 5}
    ds = ec2.DataSourceEc2({"datasource": {"Ec2": ds_cfg}}, distro, paths)
    ds._cloud_name = platform
    ok = ds.get_data()
    md = ds.metadata or {}
    print(json.dumps({
        "ok": ok,
        "address": ds.metadata_address,
        "instance_id": ds.get_instance_id() if ok else None,
        "local_hostname": md.get("local-hostname"),
        "placement": md.get("placement"),
        "availability_zone": ds.availability_zone if ok else None,
        "public_keys": ds.get_public_ssh_keys() if ok else None,
        "userdata": base64.b64encode(ds.get_userdata_raw() or b"").decode(),
        "identity": getattr(ds, "identity", None),
        "calls": calls,
    }))
    """
)


@contextlib.contextmanager
def no_dns(guest: netns.Namespace) -> Iterator[None]:
    """No DNS in the guest and no name but localhost: per-namespace /etc files
    (``ip netns exec`` bind-mounts /etc/netns/<ns>), removed on exit."""
    etc = Path("/etc/netns") / guest.name
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        yield
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def run_ec2_datasource(
    guest: netns.Namespace, work: Path, url: str, platform: str
) -> tuple[dict[str, Any], CompletedProcess[str]]:
    """Run :data:`EC2_DRIVER` in ``guest`` against ``url`` as on ``platform``, with
    ``work`` for its files: what it printed (parsed) and the finished process."""
    driver = work / "ec2_driver.py"
    driver.write_text(EC2_DRIVER)
    res = guest.run(CLOUD_INIT_PYTHON, str(driver), str(work), url, platform, timeout=300)
    got: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return got, res
