"""A local base image for building the project's Dockerfile with podman, where no
container registry is reachable (see ../shared/reference/containers.md).

    python -m tests.container.base      # tools, and the base rootfs (cached per machine)

The Debian rootfs (the host's own suite, from the host's own mirror, with Debian's Python
3, venv and pip) is made once per machine by mmdebstrap and cached as a tar under
`$SLUICEWAY_CACHE_DIR/container/`. Each test session imports it (once per podman store)
and adds, on top, a layer with this machine's TLS CAs for pip: the package index is
reached through an intercepting proxy whose CA differs per machine, so that layer is
rebuilt every session and never goes into the project's Dockerfile.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.machine import cache_root, ensure_debian_packages, locked, log, run_logged

TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap",
         "slirp4netns": "slirp4netns",
         "/usr/lib/cni/bridge": "containernetworking-plugins"}
PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
ROOTFS_IMAGE = "localhost/sluiceway-debian:v1"
BASE_IMAGE = "localhost/sluiceway-test-base:latest"  # the rootfs + this machine's CAs
CA_DIR = Path("/usr/local/share/ca-certificates")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def container_dir() -> Path:
    return cache_root() / "container"


def podman_env() -> dict[str, str]:
    """podman as this sandbox needs it: runc (crun fails on its hybrid cgroups) and
    rlimits it is allowed to set."""
    conf = container_dir() / "containers.conf"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    text = (f'[engine]\nruntime = "runc"\n\n[containers]\n'
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n')
    if not conf.exists() or conf.read_text() != text:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout_s: float = 600
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=podman_env(), capture_output=True,
                          text=True, check=check, timeout=timeout_s)


def _suite_and_mirror() -> tuple[str, str]:
    release = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\S+)", release, re.M)
    if not match:
        raise RuntimeError("no VERSION_CODENAME in /etc/os-release")
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d")
                                                      .glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        found = re.search(r"^URIs:\s*(\S+)", text, re.M) or \
            re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
        if found and "security" not in found.group(1):
            return match.group(1), found.group(1)
    raise RuntimeError("no Debian mirror found in the host's apt sources")


def rootfs_tar() -> Path:
    """The cached Debian rootfs tar, made by mmdebstrap the first time (1-3 min)."""
    suite, mirror = _suite_and_mirror()
    target = container_dir() / f"debian-{suite}-{'-'.join(PACKAGES)}.tar"
    with locked(container_dir()):
        if target.is_file():
            return target
        ensure_debian_packages(TOOLS, "container base")
        started = time.monotonic()
        log("container base", f"mmdebstrap {suite} from {mirror} (once per machine)")
        partial = target.with_suffix(".partial")
        run_logged(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
                    "--include=" + ",".join(PACKAGES),
                    "--customize-hook=rm -f \"$1\"/usr/lib/python3*/EXTERNALLY-MANAGED",
                    "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
                    suite, str(partial), mirror],
                   container_dir() / "mmdebstrap.log", timeout_s=900)
        partial.rename(target)
        log("container base", f"rootfs {target.stat().st_size >> 20} MiB in "
            f"{time.monotonic() - started:.0f} s")
    return target


def base_image() -> str:
    """The test's base image in the local podman store: the rootfs, imported once, and
    this machine's CAs on top (rebuilt each time: a few seconds)."""
    ensure_debian_packages(TOOLS, "container base")
    tar = rootfs_tar()
    with locked(container_dir() / "podman"):
        if podman("image", "exists", ROOTFS_IMAGE, check=False).returncode != 0:
            podman("import", str(tar), ROOTFS_IMAGE)
        with tempfile.TemporaryDirectory() as context:
            crts = sorted(CA_DIR.glob("*.crt"))
            for crt in crts:
                shutil.copy(crt, Path(context) / crt.name)
            lines = [f"FROM {ROOTFS_IMAGE}"]
            if crts:
                lines += ["COPY *.crt /usr/local/share/ca-certificates/",
                          "RUN update-ca-certificates"]
            lines.append(f"ENV PIP_CERT={CA_BUNDLE} SSL_CERT_FILE={CA_BUNDLE} "
                         f"REQUESTS_CA_BUNDLE={CA_BUNDLE}")
            (Path(context) / "Containerfile").write_text("\n".join(lines) + "\n")
            result = podman("build", "--quiet", "-t", BASE_IMAGE, context, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"building {BASE_IMAGE} failed:\n{result.stderr[-3000:]}")
    return BASE_IMAGE


if __name__ == "__main__":
    print(base_image())
