"""sha256_of: the digest of a file's bytes, read in chunks."""

import hashlib

from dit.files import sha256_of


def test_sha256_of_equals_hashlib_over_the_whole_file(tmp_path):
    data = bytes(range(256)) * 70_000  # larger than one read chunk (16 MiB)
    (tmp_path / "f").write_bytes(data)
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()
