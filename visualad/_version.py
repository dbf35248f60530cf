"""The package version, importable without torch (the CLI's --version and --help read it)."""
__version__ = "0.2.0"
