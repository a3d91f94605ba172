pytest_plugins = ["tests.fixtures_data"]
