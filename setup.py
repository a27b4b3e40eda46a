"""Package discovery for the mapped layout (see pyproject.toml).

setuptools' automatic discovery does not follow `package-dir` mappings, so the
package list is computed here from the three source roots.
"""

from setuptools import find_packages, setup

ROOTS = {"pdserve": "services", "pdserve.shared": "shared", "pdserve.loadgen": "loadgen"}


def _packages() -> list[str]:
    names: list[str] = []
    for prefix, folder in ROOTS.items():
        names.append(prefix)
        names.extend(f"{prefix}.{sub}" for sub in find_packages(folder))
    # Data-only folder: the demo model's config, tokenizer and weights.
    names.append("pdserve.demo_model")
    return names


setup(packages=_packages())
