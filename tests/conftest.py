"""Shared pytest set-up (kept minimal).

pytest's default import mode puts ``tests/`` on ``sys.path``, so test modules import the
generators in ``strategies.py`` directly; a tool that wants them adds ``tests/`` itself.
"""
