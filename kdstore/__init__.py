"""kdstore: label a transfer set with teachers once, then distill students at any temperature."""

from __future__ import annotations

__version__ = "0.1.0"
