"""The repository's scripts (benchmarks/, tools/) are not packages: tests load them from their files."""
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, module_name: Optional[str] = None) -> ModuleType:
    """The script at `path` (absolute, or relative to the repository) as a fresh module."""
    path = REPO / path
    spec = importlib.util.spec_from_file_location(module_name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
