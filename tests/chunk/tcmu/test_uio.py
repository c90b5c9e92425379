"""Finding a TCMU backstore's uio device by the name the kernel gives it (a sysfs tree in tmp)."""

from chunk.tcmu import uio


def _dev(root, n, name):
    d = root / f"uio{n}"
    d.mkdir()
    (d / "name").write_text(name + "\n")


def test_find_by_exact_name_then_by_device_and_config(tmp_path):
    _dev(tmp_path, 0, "tcm-user/1/zs-a/zstore/a")
    _dev(tmp_path, 1, "tcm-user/3/zs-b/zstore/b")
    _dev(tmp_path, 2, "some-other-uio")
    assert uio.uio_name(1, "zs-a", "zstore/a") == "tcm-user/1/zs-a/zstore/a"
    assert uio.find("tcm-user/1/zs-a/zstore/a", tmp_path) == "uio0"
    # the HBA number differs from what we computed: the device/config suffix still finds it
    assert uio.find("tcm-user/2/zs-b/zstore/b", tmp_path) is None
    assert uio.find("tcm-user/2/zs-b/zstore/b", tmp_path, suffix="zs-b/zstore/b") == "uio1"
    assert uio.find("tcm-user/9/zs-c/zstore/c", tmp_path, suffix="zs-c/zstore/c") is None
    assert uio.find("x", tmp_path / "absent") is None
