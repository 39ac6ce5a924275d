"""hlm.manifest: what the signature covers, how the key is read, which sizes are refused."""

from __future__ import annotations

import pytest

from hlm.manifest import (
    MAX_CHUNKS,
    ManifestError,
    canonical_bytes,
    check_bounds,
    sign,
    signing_key_from_env,
    verify,
)

KEY = b"0123456789abcdef0123456789abcdef"
MANIFEST = {"version": "v1", "index": "ads", "size": 2500, "n_chunks": 3, "chunk_bytes": 1024, "sha256": "ab" * 32,
            "source": "nightly ü"}


def test_the_signature_covers_every_field_but_itself_whatever_the_key_order() -> None:
    signed = sign(MANIFEST, KEY)
    verify(dict(reversed(list(signed.items()))), KEY)  # key order and the signature field do not matter
    assert canonical_bytes(signed) == canonical_bytes(MANIFEST)
    assert canonical_bytes(MANIFEST) == (  # the documented form (docs/design.md): sorted, compact, ASCII
        b'{"chunk_bytes":1024,"index":"ads","n_chunks":3,"sha256":"' + b"ab" * 32
        + b'","size":2500,"source":"nightly \\u00fc","version":"v1"}')
    for field, value in [("sha256", "cd" * 32), ("version", "v2"), ("index", "other"), ("size", 2501)]:
        with pytest.raises(ManifestError, match="signature does not match"):
            verify({**signed, field: value}, KEY)
    with pytest.raises(ManifestError, match="signature does not match"):
        verify(signed, KEY[::-1])
    with pytest.raises(ManifestError, match="unsigned"):
        verify(MANIFEST, KEY)


def test_the_key_comes_from_a_file_or_the_environment_and_must_be_long_enough(tmp_path) -> None:
    (tmp_path / "key").write_bytes(KEY + b"\n")  # as `kubectl create secret --from-file` may store it
    assert signing_key_from_env({"HLM_MANIFEST_KEY_FILE": str(tmp_path / "key")}) == KEY
    assert signing_key_from_env({"HLM_MANIFEST_KEY": KEY.decode()}) == KEY
    assert signing_key_from_env({}) is None
    with pytest.raises(ValueError, match="at least 32 are needed"):
        signing_key_from_env({"HLM_MANIFEST_KEY": "short"})
    with pytest.raises(ValueError, match="both"):
        signing_key_from_env({"HLM_MANIFEST_KEY": KEY.decode(), "HLM_MANIFEST_KEY_FILE": str(tmp_path / "key")})
    with pytest.raises(ValueError, match="cannot read the manifest key"):
        signing_key_from_env({"HLM_MANIFEST_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(("sizes", "refusal"), [
    ({"n_chunks": 4}, "do not agree"),
    ({"n_chunks": True, "size": 1, "chunk_bytes": 1024}, "must be integers"),
    ({"size": "2500"}, "must be integers"),
    ({"chunk_bytes": 0}, "chunk_bytes 0 is outside"),
    ({"size": 65 << 30, "chunk_bytes": 64 << 20, "n_chunks": 1040}, "size 69793218560 is outside"),
    ({"size": (MAX_CHUNKS + 1) * 1024, "n_chunks": MAX_CHUNKS + 1}, f"n_chunks {MAX_CHUNKS + 1} is outside"),
])
def test_sizes_that_disagree_or_exceed_the_bounds_are_refused(sizes: dict, refusal: str) -> None:
    check_bounds(MANIFEST)
    with pytest.raises(ManifestError, match=refusal):
        check_bounds({**MANIFEST, **sizes})
