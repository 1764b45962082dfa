def pytest_configure(config):
    config.addinivalue_line("markers", "browser: JupyterLab in headless Chromium (deselect with -m 'not browser')")
