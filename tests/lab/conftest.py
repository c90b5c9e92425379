"""Registers the ``lab`` marker (kernel lab tests: root + qemu, minutes, see README.md), so
``pytest -m 'not lab'`` skips them and ``--strict-markers`` accepts them."""


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: boots the kernel lab VM (root + qemu; minutes)")
