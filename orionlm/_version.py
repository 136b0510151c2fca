"""The package version, apart from the package root so that modules can record it without importing the rest."""

__version__ = "0.1.0"
