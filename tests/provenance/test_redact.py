"""Redaction of private keys and AWS secret keys from text bound for logs and the database."""

from __future__ import annotations

import pytest

from provenance.redact import OPEN_KEY, REDACTED_KEY, ends_open, redact, redact_continuation

BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj"


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
