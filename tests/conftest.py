"""Shared pytest set-up. Its presence puts ``tests/`` on ``sys.path`` (pytest's rootdir
conftest rule), so test modules and tools import ``strategies`` directly."""
