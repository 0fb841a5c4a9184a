"""Guest image assembly from Debian packages (used by initrd/build.py)."""
