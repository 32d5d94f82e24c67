"""The secret scanner finds a planted key in every place it looks (so its silence after a build means something),
and a log redacted by kiln's redactor passes it."""

from __future__ import annotations

import sqlite3

from clouds.base import KeyPair
from provenance.redact import LineRedactor, redact
from tests.secret_scan import key_needles, scan_bytes, scan_database, scan_files

KEY = KeyPair.generate("kiln-scan-test")
NEEDLES = key_needles(KEY)


def test_the_key_is_found_whole_by_line_and_as_its_raw_seed(tmp_path):
    one_line = KEY.private_key.splitlines()[2]
    assert {h.what for h in scan_bytes("x", KEY.private_key.encode(), NEEDLES)} >= {
        "private key (PEM)", "private key block"}  # fmt: skip
    assert [h.what for h in scan_bytes("x", f"log: {one_line}\n".encode(), NEEDLES)] == ["private key body line 2"]
    seed = NEEDLES["private seed (raw)"]
    assert [h.what for h in scan_bytes("x", b"\0" * 100 + seed + b"\0", NEEDLES)] == ["private seed (raw)"]


def test_known_secret_patterns_are_found_but_redacted_ones_are_not():
    secret = b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert [h.what for h in scan_bytes("x", secret, {})] == ["aws secret access key"]
    assert scan_bytes("x", redact(secret.decode()).encode(), {}) == []
    assert [h.what for h in scan_bytes("x", b"id AKIAIOSFODNN7EXAMPLE", {})] == ["aws access key id"]


def test_a_key_planted_in_any_text_column_of_the_database_is_found(tmp_path):
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("create table steprun (id integer primary key, log text)")
        conn.execute("insert into steprun (log) values (?)", ("clean line",))
        conn.execute("insert into steprun (log) values (?)", (f"oops {KEY.private_key}",))

    hits = scan_database(f"sqlite:///{path}", NEEDLES)

    assert {h.where for h in hits} == {"database steprun.log"}
    assert "private key (PEM)" in {h.what for h in hits}


def test_a_log_through_the_line_redactor_holds_no_key_and_files_are_scanned(tmp_path):
    redactor = LineRedactor()
    lines = [redactor(line) for line in f"before\n{KEY.private_key}after".splitlines()]
    (tmp_path / "log.txt").write_text("\n".join(line for line in lines if line is not None))
    (tmp_path / "leak.txt").write_text(KEY.private_key)

    hits = scan_files(sorted(tmp_path.iterdir()), NEEDLES)

    assert {h.where for h in hits} == {str(tmp_path / "leak.txt")}
