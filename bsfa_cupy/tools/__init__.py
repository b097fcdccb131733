"""The ``bsfa`` command and its harnesses (demo, bench, accuracy, calibrate from dumps, plots).

Built on the library's public API; the library core never imports this subpackage.
"""
