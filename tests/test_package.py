"""The installed distribution's public face: `import mobilevision` and its version."""
import importlib.metadata
import subprocess
import sys

import mobilevision


def test_version_is_the_installed_distributions():
    assert mobilevision.__version__ == importlib.metadata.version("mobilevision")


def test_import_works_outside_the_source_tree(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import mobilevision, tasks.train; print(mobilevision.__version__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == importlib.metadata.version("mobilevision")
