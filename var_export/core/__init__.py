"""The torch-free core at the bottom of var-export.

``contract`` (bundle file names, graph I/O names, prefixes), ``settings`` (the VAR knobs),
``errors`` (the exception family) and ``calibration_schema`` (calibration.json). Modules here
import nothing else of the project; everything else imports them (docs/ARCHITECTURE.md).
"""
