"""Launchers that tests start write no compilation cache into the user's home (a test that
checks the cache names its own folder)."""
import os

os.environ["BSMAMBA2_COMPILATION_CACHE"] = "0"
