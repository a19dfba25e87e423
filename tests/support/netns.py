"""Test hosts on one machine: Linux network namespaces joined by a bridge.

`hosts(workers, workdir)` makes, for the length of a `with` block:

- a bridge `myh<tag>` in the machine's own namespace, holding the run's first address
  (the *runner*: the test process reaches the hosts through it);
- a control host and `workers` worker hosts, each a network namespace `myh-<tag>-<name>`
  with loopback up and one veth pair: `eth0` inside, `myh<tag>v<i>` on the bridge;
- a data directory per host under `workdir/<name>`; no host is given another's.

Addresses come from 10.213.47.0/24, which this module owns: nothing else on the test machines
uses 10.213/16 (it is checked before each run: an address or route of the machine that
overlaps the range refuses the run). Each run takes one free /28 of it (16 runs at once, so
two pytest-xdist processes never collide): .1 the runner, .2 the control host, .3 on the
worker hosts (12 at most). The namespaces get no default route and forwarding is left as it
is, so a host can reach only the run's own addresses and its own loopback; IPv6 is off on the
run's links. `tag` is random per run.

Cleanup: everything is removed on the way out of the block, whatever happened inside it
(processes still running in the namespaces are killed, the namespaces go with their veth
pairs, then the bridge). A run that could not clean up (the test process was killed) leaves
its bridge named with the prefix and an alias naming its process; the next run removes what
a dead process left behind. Making and removing happen under a lock file, so a run never
sees another's half-made hosts.

`cut(host)` / `restore(host)` take the host's link on the bridge down and up again: the
host stays up but is cut off from every other host (its packets go nowhere, as with a pulled
cable). Needs root and `ip` (iproute2); `require_hosts()` skips a test without them, or
fails it under CI=true.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.services import missing_service

logger = logging.getLogger(__name__)

RANGE = ipaddress.IPv4Network("10.213.47.0/24")
SLOT_PREFIX = 28
PREFIX = "myh"  # every link and namespace this module makes starts with it
ALIAS = "modelyard-test-hosts"
LOCK_FILE = Path("/run/lock/modelyard-test-hosts.lock")
MAX_WORKERS = 2 ** (32 - SLOT_PREFIX) - 4  # network, runner, control and broadcast excluded
ROUTE_TYPES = frozenset({"unicast", "blackhole", "unreachable", "prohibit", "throw", "multicast"})


def _ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def require_hosts() -> None:
    """Skip the calling test (fail it under CI=true) unless namespaces can be made here."""
    if os.geteuid() != 0:
        missing_service("root, for network namespaces (tests/support/netns.py)")
    if shutil.which("ip") is None:
        missing_service("`ip` (iproute2), for network namespaces")


@dataclass
class Host:
    """One test host: a network namespace with one address and a data directory."""

    name: str
    netns: str
    address: str
    link: str  # its veth end on the bridge, in the machine's namespace
    data_dir: Path

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this host (the process keeps its id: `ip` execs it)."""
        return ["ip", "netns", "exec", self.netns, *command]

    def popen(
        self, command: Sequence[str], env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Start `command` inside this host with `env`, its output appended to `log`."""
        with log.open("ab") as out:
            return subprocess.Popen(
                self.argv(*command), env=dict(env), stdout=out, stderr=subprocess.STDOUT
            )


@dataclass
class Hosts:
    """The hosts of one run (see the module docstring)."""

    tag: str
    bridge: str
    network: ipaddress.IPv4Network
    runner: str  # the bridge's address, through which this process reaches the hosts
    control: Host
    workers: list[Host] = field(default_factory=list)

    @property
    def all(self) -> list[Host]:
        return [self.control, *self.workers]

    def cut(self, host: Host) -> None:
        """Take `host`'s link down: nothing it sends reaches anyone, nothing reaches it."""
        logger.info("cutting off %s (%s)", host.name, host.address)
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        """Bring `host`'s link up again."""
        logger.info("reconnecting %s (%s)", host.name, host.address)
        _ip("link", "set", host.link, "up")

    @contextmanager
    def cut_off(self, host: Host) -> Iterator[None]:
        """`host` cut off for the body; its link comes back on the way out."""
        self.cut(host)
        try:
            yield
        finally:
            self.restore(host)


@contextmanager
def _locked() -> Iterator[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alias() -> str:
    pid = os.getpid()
    return f"{ALIAS} pid={pid} start={_start_time(pid)}"


def _owner_alive(alias: str) -> bool:
    fields = dict(part.split("=", 1) for part in alias.split()[1:] if "=" in part)
    if not alias.startswith(ALIAS) or "pid" not in fields:
        return False
    return _start_time(int(fields["pid"])) == fields.get("start")


def _bridges() -> dict[str, tuple[str, list[ipaddress.IPv4Interface]]]:
    """This module's bridges: name -> (alias, addresses)."""
    found: dict[str, tuple[str, list[ipaddress.IPv4Interface]]] = {}
    for line in _ip("-o", "link", "show", "type", "bridge").splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if not name.startswith(PREFIX):
            continue
        detail = _ip("-o", "-4", "addr", "show", "dev", name)
        addresses = [ipaddress.IPv4Interface(w) for w in detail.split() if "/" in w]
        alias_line = _ip("link", "show", "dev", name)
        alias = next(
            (ln.strip()[len("alias ") :] for ln in alias_line.splitlines() if "alias " in ln), ""
        )
        found[name] = (alias, addresses)
    return found


def _namespaces() -> list[str]:
    return [
        line.split()[0]
        for line in _ip("netns", "list").splitlines()
        if line.startswith(f"{PREFIX}-")
    ]


def _kill_inside(netns: str) -> None:
    for pid in (int(p) for p in _ip("netns", "pids", netns, check=False).split()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _links(start: str) -> list[str]:
    names = (line.split(":", 2)[1].strip() for line in _ip("-o", "link", "show").splitlines())
    return [name.split("@")[0] for name in names if name.startswith(start)]


def _remove(tag: str) -> None:
    """Everything of the run `tag`: its processes, veth pairs (deleted here: a namespace's
    own go only once the kernel has let the namespace go), namespaces and bridge."""
    for netns in _namespaces():
        if netns.startswith(f"{PREFIX}-{tag}-"):
            _kill_inside(netns)
    for link in _links(f"{PREFIX}{tag}v"):
        _ip("link", "delete", link, check=False)
    for netns in _namespaces():
        if netns.startswith(f"{PREFIX}-{tag}-"):
            _ip("netns", "delete", netns, check=False)
    _ip("link", "delete", f"{PREFIX}{tag}", check=False)


def remove_leftovers() -> None:
    """Remove the hosts of runs whose process is gone (call it holding the lock)."""
    live_tags = set()
    for bridge, (alias, _) in _bridges().items():
        tag = bridge[len(PREFIX) :]
        if _owner_alive(alias):
            live_tags.add(tag)
        else:
            logger.warning("removing test hosts %s left by a run that ended (%s)", tag, alias)
            _remove(tag)
    for netns in _namespaces():
        tag = netns.split("-")[1]
        if tag not in live_tags:
            logger.warning("removing namespace %s left by a run that ended", netns)
            _remove(tag)


def _check_range_unused(ours: set[str]) -> None:
    """Refuse to run if the machine uses any part of RANGE on a link that is not ours."""
    for line in _ip("-o", "-4", "addr", "show").splitlines():
        parts = line.split()
        dev, address = parts[1], parts[3]
        if dev not in ours and ipaddress.IPv4Interface(address).network.overlaps(RANGE):
            raise RuntimeError(f"{RANGE} is in use on this machine ({dev} {address})")
    for line in _ip("-4", "route", "show").splitlines():
        parts = line.split()
        dev = parts[parts.index("dev") + 1] if "dev" in parts else ""
        if parts[0] in ROUTE_TYPES:  # `blackhole 10.0.0.0/8`, `unreachable ...`
            parts = parts[1:]
        if parts[0] == "default" or dev in ours:
            continue
        if ipaddress.IPv4Network(parts[0], strict=False).overlaps(RANGE):
            raise RuntimeError(f"{RANGE} is routed on this machine: {line}")


def _free_slot(bridges: dict[str, tuple[str, list[ipaddress.IPv4Interface]]]) -> int:
    used = {address.network for _, addresses in bridges.values() for address in addresses}
    for slot, network in enumerate(RANGE.subnets(new_prefix=SLOT_PREFIX)):
        if network not in used:
            return slot
    raise RuntimeError(f"every /{SLOT_PREFIX} of {RANGE} is taken by a running test")


def _ipv6_off(conf: str, netns: str | None = None) -> None:
    """No IPv6 (nor its link-local chatter) on a link of the run: `conf` is a link's name or
    `default` (links made later), in `netns` or the machine's own; nothing without IPv6."""
    path = f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"
    if not Path("/proc/sys/net/ipv6").exists():
        return
    if netns is None:
        Path(path).write_text("1")
        return
    command = ["ip", "netns", "exec", netns, "sh", "-c", f"echo 1 > {path}"]
    subprocess.run(command, check=True, capture_output=True)


def _make(tag: str, workers: int, workdir: Path) -> Hosts:
    bridges = _bridges()
    _check_range_unused({*bridges, *(f"{PREFIX}{tag}",)})
    network = list(RANGE.subnets(new_prefix=SLOT_PREFIX))[_free_slot(bridges)]
    addresses = [str(a) for a in network.hosts()]
    bridge = f"{PREFIX}{tag}"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("link", "set", bridge, "alias", _owner_alias())
    _ipv6_off(bridge)
    _ip("addr", "add", f"{addresses[0]}/{SLOT_PREFIX}", "dev", bridge)
    _ip("link", "set", bridge, "up")
    made: list[Host] = []
    for i, name in enumerate(["control", *(f"w{n}" for n in range(1, workers + 1))]):
        netns, link = f"{PREFIX}-{tag}-{name}", f"{PREFIX}{tag}v{i}"
        _ip("netns", "add", netns)
        _ipv6_off("default", netns)  # before its eth0 is made there
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ipv6_off(link)
        _ip("link", "set", link, "master", bridge)
        _ip("link", "set", link, "up")
        _ip("-n", netns, "addr", "add", f"{addresses[i + 1]}/{SLOT_PREFIX}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        data_dir = workdir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        made.append(Host(name, netns, addresses[i + 1], link, data_dir))
    return Hosts(tag, bridge, network, addresses[0], made[0], made[1:])


@contextmanager
def hosts(workers: int, workdir: Path) -> Iterator[Hosts]:
    """A control host and `workers` worker hosts for the block (see the module docstring)."""
    require_hosts()
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"1 to {MAX_WORKERS} worker hosts, not {workers}")
    tag = secrets.token_hex(3)
    try:
        with _locked():
            remove_leftovers()
            made = _make(tag, workers, workdir)
        logger.info(
            "test hosts %s on %s: %s",
            tag,
            made.network,
            ", ".join(f"{h.name} {h.address}" for h in made.all),
        )
        yield made
    finally:
        with _locked():
            _remove(tag)
