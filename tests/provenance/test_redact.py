"""Redaction of private keys and AWS secret keys from text bound for logs and the database."""

from __future__ import annotations

import logging
import time

import pytest

from provenance.redact import OPEN_KEY, REDACTED_KEY, ends_open, redact, redact_continuation, redact_logs

BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("label", ["OPENSSH PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY",
                                   "ENCRYPTED PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
def test_private_key_blocks_are_replaced(label: str) -> None:
    text = f"before\n-----BEGIN {label}-----\n{BODY}\n-----END {label}-----\nafter\n"
    assert redact(text) == f"before\n{REDACTED_KEY}\nafter\n"


def test_public_keys_and_ordinary_text_are_kept() -> None:
    text = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl kiln\n" \
           "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\nSetting up apache2 (2.4.62-1)\n"
    assert redact(text) == text


@pytest.mark.parametrize("line", [
    "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    '{"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}',
])
def test_aws_secret_access_keys_are_replaced(line: str) -> None:
    redacted = redact(line)
    assert "wJalrXUtnFEMI" not in redacted and "[REDACTED]" in redacted


def test_a_key_split_over_chunks_is_redacted_whole() -> None:
    first = redact(f"log\n-----BEGIN OPENSSH PRIVATE KEY-----\n{BODY}\n")
    assert first == f"log\n{OPEN_KEY}" and ends_open(first)
    assert redact_continuation(f"{BODY}\n") == ""  # still inside the block
    assert redact_continuation(f"{BODY}\n-----END OPENSSH PRIVATE KEY-----\ndone\n") == "\ndone\n"


def test_the_last_lines_of_a_key_whose_begin_was_cut_off_are_redacted() -> None:
    tail = f"script setup failed with exit code 3; last lines:\n{BODY}\n{BODY[:20]}==\n" \
           "-----END RSA PRIVATE KEY-----\nthe reason"
    assert redact(tail) == f"script setup failed with exit code 3; last lines:\n{REDACTED_KEY}\nthe reason"


def test_a_long_log_without_key_ends_is_redacted_in_linear_time() -> None:
    log = f"{BODY}\n" * 20000 + "not a key line\n" + "-----END PRIVATE KEY-----\n"
    started = time.perf_counter()
    assert redact(log) == f"{BODY}\n" * 20000 + f"not a key line\n{REDACTED_KEY}\n"
    assert time.perf_counter() - started < 1


def test_the_log_filter_redacts_messages_and_tracebacks_before_any_handler_formats_them() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("kiln.test-redaction")
    handler = Keep()
    logger.addHandler(handler)
    logger.propagate = False
    redact_logs("kiln")
    try:
        logger.warning("output: %s", f"-----BEGIN PRIVATE KEY-----\n{BODY}\n-----END PRIVATE KEY-----")
        try:
            raise RuntimeError(f"aws_secret_access_key={SECRET}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert records[0] == f"output: {REDACTED_KEY}"
    assert SECRET not in records[1] and "aws_secret_access_key=[REDACTED]" in records[1]
    assert "Traceback" in records[1]
