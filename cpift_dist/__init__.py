"""cpift-dist: Core Parameter Isolation Fine-Tuning (arXiv 2508.21741) at cluster scale."""

__version__ = "0.1.0"
