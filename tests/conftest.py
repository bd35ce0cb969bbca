"""The test kit (tests/kit/) is the suite's pytest plugin: database fixtures, markers, helpers."""

pytest_plugins = ["kit.plugin"]
