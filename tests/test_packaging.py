"""The package declares what it imports: every third-party module imported anywhere in mue_fairseq/
and data_utils/ (tests/: with the test extra) belongs to a declared distribution, and every
declared bound admits the version of constraints.txt that the suite runs with."""
import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Dict, Iterable, List, Set

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"mue_fairseq", "data_utils"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extra: str = "") -> List[Requirement]:
    declared = project()["dependencies"] + (project()["optional-dependencies"][extra] if extra else [])
    return [Requirement(line) for line in declared]


def imported_modules(directories: Iterable[Path]) -> Dict[str, Set[str]]:
    """Top-level module name -> files importing it, over every absolute import (also those inside
    functions) in the .py files below `directories`."""
    found: Dict[str, Set[str]] = {}
    for directory in directories:
        for path in sorted(directory.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(directory.parent)))
    return found


def undeclared_imports(directories: Iterable[Path], declared: Iterable[Requirement],
                       local: Set[str] = frozenset()) -> Dict[str, str]:
    """Third-party modules imported below `directories` whose distribution is not in `declared`:
    module -> why, naming a file that imports it."""
    declared_names = {canonicalize_name(req.name) for req in declared}
    distributions = packages_distributions()
    missing = {}
    for module, files in sorted(imported_modules(directories).items()):
        if module in sys.stdlib_module_names or module in FIRST_PARTY or module in local or module == "__future__":
            continue
        owners = {canonicalize_name(dist) for dist in distributions.get(module, [])}
        if not owners:
            missing[module] = f"imported by {min(files)}, but no installed distribution provides it"
        elif not owners & declared_names:
            missing[module] = f"imported by {min(files)}, provided by {sorted(owners)}, which is not declared"
    return missing


def constraint_versions() -> Dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_third_party_import_of_the_package_is_declared():
    missing = undeclared_imports([REPO / "mue_fairseq", REPO / "data_utils"], requirements())
    assert not missing, f"add to pyproject.toml's dependencies: {missing}"


def test_every_third_party_import_of_the_tests_is_declared_with_the_test_extra():
    local = {path.stem for folder in ("tests", "benchmarks") for path in (REPO / folder).glob("*.py")}
    missing = undeclared_imports([REPO / "tests"], requirements("test"), local)
    assert not missing, f"add to pyproject.toml's test extra: {missing}"


def test_an_undeclared_import_is_reported(tmp_path):
    source = tmp_path / "plugin"
    source.mkdir()
    (source / "module.py").write_text("import os\nimport numpy as np\n\ndef plot():\n    import matplotlib.pyplot\n")
    numpy_only = [Requirement("numpy")]
    missing = undeclared_imports([source], numpy_only)
    assert list(missing) == ["matplotlib"] and "plugin/module.py" in missing["matplotlib"]
    assert undeclared_imports([source], numpy_only + [Requirement("matplotlib")]) == {}
    (source / "other.py").write_text("import surely_not_an_installed_module\n")
    assert "no installed distribution" in undeclared_imports([source], numpy_only)["surely_not_an_installed_module"]


def test_declared_bounds_admit_the_tested_versions():
    pins = constraint_versions()
    for req in requirements("test"):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but constraints.txt pins no tested version of it"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"pyproject.toml's {req} excludes the tested {req.name} {pins[name]} of constraints.txt"


def test_the_plugin_does_not_depend_on_data_utils():
    """mue_fairseq/ reads the synthetic task's words and metric from its own metrics; only the
    quickstart, which writes the task before training on it, calls the generator in data_utils/."""
    importers = imported_modules([REPO / "mue_fairseq"]).get("data_utils", set())
    assert importers == {"mue_fairseq/cli/quickstart.py"}
