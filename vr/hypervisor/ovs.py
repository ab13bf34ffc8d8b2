"""The only module that runs Open vSwitch's tools (ovs-vsctl, ovs-ofctl, ovsdb-client).

Every call goes through :mod:`vr.subp` with ``OVS_RUNDIR`` set to the instance's run
directory, so a private ovsdb-server/ovs-vswitchd (the tests') and the system one
are never confused, and with a timeout, so a stopped ovs-vswitchd makes a call fail
(and the controller retry) instead of hanging it.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vr import subp
from vr.hypervisor import flows, ports

LOG = logging.getLogger(__name__)

DEFAULT_RUNDIR = Path("/var/run/openvswitch")
TIMEOUT = 10.0
INTERFACE_COLUMNS = "name,ofport,external_ids,mac_in_use,type"


@dataclass(frozen=True)
class Ovs:
    bridge: str
    rundir: Path = DEFAULT_RUNDIR
    timeout: float = TIMEOUT
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", {"OVS_RUNDIR": str(self.rundir)})

    @property
    def db(self) -> str:
        return f"unix:{self.rundir / 'db.sock'}"

    def vsctl(self, *args: str) -> str:
        t = int(max(1, self.timeout))
        cmd = ["ovs-vsctl", f"--db={self.db}", f"--timeout={t}", *args]
        return subp.run(cmd, env=self.env, timeout=self.timeout + 5).stdout

    def ofctl(self, *args: str, data: bytes | None = None) -> str:
        return subp.run(["ovs-ofctl", *args], env=self.env, timeout=self.timeout, data=data).stdout

    # --- ports ---------------------------------------------------------------------

    def interfaces(self) -> list[ports.Interface]:
        """The Interface rows of this bridge's ports."""
        names = set(self.vsctl("list-ifaces", self.bridge).split())
        text = self.vsctl("--format=json", f"--columns={INTERFACE_COLUMNS}", "list", "Interface")
        return [i for i in ports.parse_interfaces(text) if i.name in names]

    def ensure_meta_port(self, name: str) -> None:
        """Add the internal metadata port ``name`` to the bridge unless it is there."""
        self.vsctl(
            "--may-exist", "add-port", self.bridge, name, "--", "set", "Interface", name,
            "type=internal",
        )  # fmt: skip

    def meta_port(self, name: str) -> flows.MetaPort | None:
        """The metadata port's number and MAC, or None while vswitchd has not set them."""
        for i in self.interfaces():
            if i.name == name and i.ofport is not None and i.ofport > 0 and i.mac_in_use:
                return flows.MetaPort(i.ofport, i.mac_in_use)
        return None

    # --- flows ---------------------------------------------------------------------

    def cookies(self) -> list[int]:
        """Cookies of our flows on the bridge (those with :data:`flows.COOKIE_TAG`)."""
        mask = f"cookie={flows.COOKIE_TAG << flows.COOKIE_SHIFT:#x}/{flows.COOKIE_MASK:#x}"
        return flows.parse_cookies(self.ofctl("dump-flows", "--no-stats", self.bridge, mask))

    def flow_count(self) -> int:
        """How many of our flows the bridge holds (cheap: one aggregate reply)."""
        mask = f"cookie={flows.COOKIE_TAG << flows.COOKIE_SHIFT:#x}/{flows.COOKIE_MASK:#x}"
        out = self.ofctl("dump-aggregate", self.bridge, mask)
        m = re.search(r"\bflow_count=(\d+)", out)
        if m is None:
            raise ports.OvsdbError(f"dump-aggregate {out.strip()!r}: expected flow_count=N")
        return int(m.group(1))

    def apply(self, change: flows.Diff) -> None:
        """Apply ``change`` in one OpenFlow bundle: all of it or, on error, none."""
        self.ofctl("--bundle", "add-flows", self.bridge, "-", data=flows.bundle(change).encode())

    def delete_ours(self) -> None:
        mask = f"cookie={flows.COOKIE_TAG << flows.COOKIE_SHIFT:#x}/{flows.COOKIE_MASK:#x}"
        self.ofctl("del-flows", self.bridge, mask)

    # --- events --------------------------------------------------------------------

    def monitor(self) -> subprocess.Popen[bytes]:
        """``ovsdb-client monitor`` of the Interface table: one JSON line per change.

        The caller owns the process (stop it by PID); it dies with this process.
        """
        return subp.spawn(
            ["ovsdb-client", "monitor", "--format=json", self.db, "Open_vSwitch", "Interface",
             "name,ofport,external_ids,mac_in_use"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            die_with_parent=True,
        )  # fmt: skip
