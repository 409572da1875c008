"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real backend."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.cluster",
    "tests.fixtures.nodeagent",
    "tests.fixtures.operator",
    "tests.fixtures.e2e",
]
