"""The graphpress version (one place; the package root and saved manifests read it)."""

__version__ = "0.1.0"
