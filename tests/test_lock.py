"""constraints.txt, the exact versions CI installs, against setup.py's compatible ranges."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def setup_requirements() -> list[Requirement]:
    """setup.py's install_requires and its test extra, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    install = ast.literal_eval(keywords["install_requires"])
    test_extra = ast.literal_eval(keywords["extras_require"])["test"]
    return [Requirement(line) for line in [*install, *test_extra]]


def locked_lines() -> list[str]:
    return [line.strip() for line in LOCK.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def locked_versions() -> dict[str, Version]:
    """Package name (canonical) -> the one version the lock pins."""
    pins = {}
    for line in locked_lines():
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def test_every_line_of_the_lock_pins_one_exact_version():
    for line in locked_lines():
        requirement = Requirement(line)
        assert [s.operator for s in requirement.specifier] == ["=="], line
        assert not requirement.marker and not requirement.url, line
        # No +cpu or other local label: the same pin resolves from the public index too.
        assert Version(next(iter(requirement.specifier)).version).local is None, line
    names = [canonicalize_name(Requirement(line).name) for line in locked_lines()]
    assert len(names) == len(set(names))
    assert "spacetime-jax" not in names  # the project itself is installed from the checkout


def test_the_lock_pins_every_requirement_setup_py_names():
    pins = locked_versions()
    missing = [str(r) for r in setup_requirements() if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in constraints.txt (refresh it: see its header): {missing}"


@pytest.mark.parametrize("requirement", setup_requirements(), ids=str)
def test_the_locked_version_is_inside_setup_py_range(requirement):
    version = locked_versions()[canonicalize_name(requirement.name)]
    assert requirement.specifier.contains(version, prereleases=True), (requirement, version)


def test_the_jax_stack_has_upper_bounds_in_setup_py():
    requirements = {canonicalize_name(r.name): r for r in setup_requirements()}
    for name in JAX_STACK:
        operators = {s.operator for s in requirements[name].specifier}
        assert ">=" in operators and "<" in operators, requirements[name]


def test_ci_and_the_readme_install_with_the_lock():
    ci_install = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                  if "pip install" in line and "-e" in line]
    assert ci_install and all("-c constraints.txt" in line for line in ci_install), ci_install
    readme_install = (REPO / "README.md").read_text().split("## Two commands", 1)[1]
    readme_install = next(line for line in readme_install.splitlines() if "pip install" in line)
    assert "pip install -c constraints.txt" in readme_install, readme_install
